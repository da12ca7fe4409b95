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


def _distribute_data_input(per_process_batch, layout, batch_dim_name):
    sharding = layout.backend_layout if isinstance(layout, TensorLayout) else layout
    if (
        jax.process_count() == 1
        and isinstance(sharding, NamedSharding)
        and per_process_batch.ndim
        and per_process_batch.shape[0] % _batch_partitions(sharding)
    ):
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        return jax.device_put(per_process_batch, replicated)
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
