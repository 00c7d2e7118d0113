"""Moved to the public module ``plugtune.plugins.kbit_family`` (plugin API 1.1); this name keeps
old imports working."""
from plugtune.plugins.kbit_family import *  # noqa: F401,F403
