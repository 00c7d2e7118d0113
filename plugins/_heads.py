"""Moved to the public module ``plugtune.heads`` (plugin API 1.1); this name keeps old imports
working."""
from plugtune.heads import *  # noqa: F401,F403
