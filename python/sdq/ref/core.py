"""Reference of the core routines."""
