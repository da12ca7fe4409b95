"""JAX implementations: `keras.distribution` meshes and `jax.distributed` (see `local.py`)."""
