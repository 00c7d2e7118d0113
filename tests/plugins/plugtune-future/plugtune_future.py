"""A plugin written for a plugin API this plugtune does not provide (2.x)."""
from plugtune import hookimpl

PLUGTUNE_API = ">=2.0,<3"


@hookimpl
def plugtune_step_end(step):
    pass
