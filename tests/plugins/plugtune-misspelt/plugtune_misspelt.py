"""A plugin with a misspelt hook name: plugtune_step_ends is not a hook."""


def plugtune_step_ends(step):
    pass
