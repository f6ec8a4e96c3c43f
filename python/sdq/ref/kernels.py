"""Reference of the add-only inference path (filled in with the CPU kernels)."""
