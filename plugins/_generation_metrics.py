"""Moved to the public module ``plugtune.plugins.generation_metrics`` (plugin API 1.1); this name keeps
old imports working."""
from plugtune.plugins.generation_metrics import *  # noqa: F401,F403
