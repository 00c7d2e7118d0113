"""Moved to the public module ``plugtune.adapters`` (plugin API 1.1); this name keeps old imports
working."""
from plugtune.adapters import *  # noqa: F401,F403
