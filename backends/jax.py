"""JAX backend: the strategies are `keras.distribution.DataParallel` meshes.

- Variables are replicated on the mesh, each global batch is sharded over its
  devices, and XLA's SPMD partitioner inserts the gradient all-reduce.
- A model built before the distribution was active gets its variables laid
  out on the mesh for the run, and moved back to the default device after.
- A batch that cannot be split over the devices (the last, smaller batch of an
  epoch) is replicated instead of sharded: every device computes it whole, so
  the result equals one device and Keras's `IndivisibleError` never surfaces.
"""

import contextlib

import jax
import keras
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from keras.src.backend.jax import distribution_lib as jax_distribution_lib
from keras.src.distribution import TensorLayout

from keras_strategies.backend_base import BackendStrategy
from keras_strategies.backend_base import reset_compiled_functions
from keras_strategies.backend_base import state_variables
from keras_strategies.devices import check_available
from keras_strategies.devices import parse_device
from keras_strategies.errors import StrategyError


def create(strategy, devices, **options):
    """Returns the JAX implementation of `strategy`."""
    return JaxStrategy(strategy, devices, **options)


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


def _ensure_cpu_devices(count, strategy_name):
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


class JaxStrategy(BackendStrategy):
    backend = "jax"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        if self.kind == "default":
            self.native = None
        elif self.kind in ("one_device", "mirrored"):
            self.native = keras.distribution.DataParallel(devices=self.devices)
        else:
            raise self.unsupported(f"unknown strategy kind {self.kind!r}")

    def resolve_devices(self, requested):
        if requested is None:
            platform = jax.default_backend()
            if self.kind == "mirrored" and platform in ("gpu", "tpu"):
                return keras.distribution.list_devices(platform)
            return [keras.distribution.list_devices(platform)[0]]
        kind = parse_device(requested[0])[0]
        if kind == "cpu":
            _ensure_cpu_devices(max(parse_device(d)[1] for d in requested) + 1, self.name)
        try:
            available = keras.distribution.list_devices(kind)
        except RuntimeError:
            available = []  # JAX has no such platform here
        check_available(requested, available, self.name, self.backend)
        return requested

    def scope(self):
        return self.native.scope() if self.native else contextlib.nullcontext()

    def attach(self, model):
        if self.native is None:
            return
        for variable in state_variables(model):
            if variable._value is None:
                continue
            layout = self.native.get_variable_layout(variable)
            variable._layout = layout
            variable._value = jax.device_put(variable._value, layout.backend_layout)
        reset_compiled_functions(model)

    def detach(self, model):
        if self.native is None:
            return
        home = jax.devices()[0]
        for variable in state_variables(model):
            if variable._value is None:
                continue
            variable._layout = None
            variable._value = jax.device_put(variable._value, home)
        reset_compiled_functions(model)
