"""JAX backend: the strategies are `keras.distribution.DataParallel` meshes.

- Variables are replicated on the mesh, each global batch is sharded over its
  devices, and XLA's SPMD partitioner inserts the gradient all-reduce.
- A model built before the distribution was active gets its variables laid
  out on the mesh for the run, and moved back to the default device after.
- A batch that cannot be split over the devices (the last, smaller batch of an
  epoch) is replicated instead of sharded: every device computes it whole, so
  the result equals one device and Keras's `IndivisibleError` never surfaces.
"""
