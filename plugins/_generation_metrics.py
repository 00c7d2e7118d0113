"""Moved to the public module ``plugtune.generation_metrics`` (plugin API 1.1); this name
keeps old imports working."""
from plugtune.generation_metrics import *  # noqa: F401,F403
