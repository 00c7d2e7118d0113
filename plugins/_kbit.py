"""Moved to the public module ``plugtune.kbit`` (plugin API 1.1); this name keeps old imports
working."""
from plugtune.kbit import *  # noqa: F401,F403
