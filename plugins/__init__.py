"""Built-in plugtune plugins: each module is one plugin, registered through the `plugtune` entry-point group."""
