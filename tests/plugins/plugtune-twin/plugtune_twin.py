"""A plugin whose name, ``twin``, plugtune-stranger registers too."""
