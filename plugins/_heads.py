"""Moved to the public module ``plugtune.plugins.head_family`` (plugin API 1.1); this name keeps
old imports working."""
from plugtune.plugins.head_family import *  # noqa: F401,F403
