"""Templates of the files ``plugtune new-plugin`` writes (``str.format`` fields)."""
