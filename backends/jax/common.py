"""Helpers shared by the jax strategies."""

import jax
from jax.sharding import NamedSharding, PartitionSpec
from keras.src.backend.jax import distribution_lib as jax_distribution_lib
from keras.src.distribution import TensorLayout

from keras_strategies.errors import StrategyError

# -- indivisible batches are replicated, not sharded ------------------------
_original_distribute_data_input = jax_distribution_lib.distribute_data_input


def _batch_partitions(sharding):
    spec = sharding.spec
    if not spec or spec[0] is None:
        return 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    parts = 1
    for name in names:
        parts *= sharding.mesh.shape[name]
    return parts


class _InputMode:
    """How batches become global arrays while one of our strategies runs.

    `global_batches`: every process holds the whole global batch (the
    multi-process strategies feed each process the full input), and each
    device takes its slice of it. `replicate`: every device gets the whole
    batch (used for predict, so outputs are addressable on every process).
    """

    global_batches = False
    replicate = False


input_mode = _InputMode()


def _distribute_data_input(per_process_batch, layout, batch_dim_name):
    sharding = layout.backend_layout if isinstance(layout, TensorLayout) else layout
    if not isinstance(sharding, NamedSharding) or not per_process_batch.ndim:
        return _original_distribute_data_input(per_process_batch, layout, batch_dim_name)
    indivisible = per_process_batch.shape[0] % _batch_partitions(sharding)
    if input_mode.replicate or (indivisible and (jax.process_count() == 1 or input_mode.global_batches)):
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    if input_mode.global_batches or jax.process_count() == 1:
        batch = per_process_batch
        return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
    return _original_distribute_data_input(per_process_batch, layout, batch_dim_name)


jax_distribution_lib.distribute_data_input = _distribute_data_input


# -- devices ----------------------------------------------------------------
def _backend_started():
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def ensure_cpu_devices(count, strategy_name):
    """Gives JAX `count` host devices if its backend has not started yet."""
    if not _backend_started():
        if jax.config.jax_num_cpu_devices < count:
            jax.config.update("jax_num_cpu_devices", count)
        return
    have = len(jax.devices("cpu"))
    if have < count:
        raise StrategyError(
            f"{strategy_name} on the jax backend needs {count} CPU devices, but "
            f"JAX has already started with {have}. Create the strategy before "
            "anything runs JAX (before building a model), or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} in the "
            "environment, or call "
            f'jax.config.update("jax_num_cpu_devices", {count}) before JAX starts.'
        )
