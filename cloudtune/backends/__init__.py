"""Places to train. `registry` maps names to backends; each backend's module is imported only when chosen."""
