"""JAX implementations: `keras.distribution` meshes and `jax.distributed` (see `base.py`)."""
