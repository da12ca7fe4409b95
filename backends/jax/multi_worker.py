"""JAX MultiWorkerMirrored: `jax.distributed` and a global mesh.

`jax.distributed.initialize` joins the processes (gloo collectives on CPU),
then a `keras.distribution.DataParallel` over every device of every process
replicates the variables and shards each global batch; XLA inserts the
gradient all-reduce. Every process reads the whole input and each device
takes its slice of each global batch, so numpy, tf.data, PyDataset and
DataLoader inputs all work and each example is used once per step.
Metrics live in replicated arrays, so every worker reports global values.
"""

import collections
import contextlib
import functools

import jax
import keras
import numpy as np
from jax.experimental import multihost_utils
from keras.src.backend.jax import distribution_lib as jax_distribution_lib

from keras_strategies.backends.jax.base import JaxImplementation
from keras_strategies.backends.jax.keras_fixes import input_mode
from keras_strategies.errors import StrategyError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.model_state import state_variables
from keras_strategies.patches import overriding
from keras_strategies.implementation.multi_process import (
    MultiProcessImplementation,
    join_error,
    loopback_only,
    own_coordinator,
)


def _initialize(cluster, timeout, name):
    from jax._src import distributed

    if distributed.global_state.client is not None:
        return  # the user (or Keras) joined already
    # CPU collectives across processes need gloo; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator = own_coordinator(cluster)
    local, host = loopback_only(cluster)
    if local:  # every process is here: listen on loopback only (JAX's default is every interface)
        _gloo_on(host)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            coordinator_bind_address=_address(host, coordinator.rsplit(":", 1)[1]) if local else None,
            num_processes=cluster.world_size,
            process_id=cluster.rank,
            initialization_timeout=int(timeout),
            heartbeat_timeout_seconds=max(10, int(timeout)),
        )
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise join_error(name, "jax", cluster, timeout, error) from error
    check_devices_per_process(name)
    jax_distribution_lib.initialize_rng()  # the same Keras seed on every process


def check_devices_per_process(name):
    """Raises a clear `StrategyError` when the processes do not all hold the
    same number of devices of this process's platform (every process sees
    the same global device list of its platform, so they decide alike,
    before any collective).

    JAX itself compiles a step over a mesh of 2 + 1 devices, but the
    multi-process helpers Keras relies on assume the same number everywhere:
    `jax.pmap` in Keras's `initialize_rng` (a bare AssertionError), and
    `jax.device_put` of a host value onto the mesh, whose cross-process check
    reshapes the devices as processes x local devices (ValueError). A
    process with no device of the platform (a machine without the GPUs the
    others have) is missing from the list altogether.
    """
    platform = jax.default_backend()
    counts = collections.Counter(device.process_index for device in jax.devices())
    missing = sorted(set(range(jax.process_count())) - set(counts))
    if missing:
        raise StrategyError(
            f"{name} on the jax backend: process(es) {', '.join(map(str, missing))} have no {platform} device, "
            f"and one JAX job runs on one platform ({platform} here). Give every machine the same kind of "
            "accelerator, or run every process on its CPU (JAX_PLATFORMS=cpu on every machine)."
        )
    if len(set(counts.values())) > 1:
        each = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
        raise StrategyError(
            f"{name} on the jax backend: the processes have different numbers of {platform} devices ({each}), "
            "and the JAX functions Keras uses across processes (jax.pmap, jax.device_put) need the same number "
            "in every process. Give every process the same number of devices "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=N on CPUs, CUDA_VISIBLE_DEVICES on GPUs), or "
            "run one process per device (--nproc-per-node set to the machine's devices, each process seeing one)."
        )


def _address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _gloo_on(host):
    """JAX's gloo CPU collectives listen on `host` (JAX passes no address:
    gloo takes the one this machine's hostname resolves to)."""
    from jax._src import xla_bridge

    make = xla_bridge._jax.make_gloo_tcp_collectives
    if not getattr(make, "_ks_host", None):
        bound = functools.partial(make, hostname=host)
        bound._ks_host = host
        xla_bridge._jax.make_gloo_tcp_collectives = bound


class JaxMultiWorkerMirrored(MultiProcessImplementation, JaxImplementation):
    """A `DataParallel` mesh over every device of every process."""

    keras_patches = JaxImplementation.keras_patches + ("jax-callbacks-local",)
    lost_contact_markers = ("Gloo", "gloo", "Connection", "DEADLINE", "heartbeat", "UNAVAILABLE")

    def __init__(self, strategy, devices, cluster, timeout):
        if cluster.world_size > 1:  # before anything starts JAX's backend
            _initialize(cluster, timeout, type(strategy).__name__)
        super().__init__(strategy, devices, cluster, timeout)
        self._method = None

    def make_distribution(self):
        return keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False
        )

    @property
    def num_replicas_in_sync(self):
        return len(keras.distribution.list_devices())

    def default_devices(self):
        return [f"{d.platform}:{d.id}" for d in jax.local_devices()]

    def place(self, value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def to_home(self, value):
        return jax.device_put(np.asarray(value), jax.local_devices()[0])  # replicated: addressable

    def prepare_call(self, model, method, arguments):
        self._method = method
        return data_lib.shuffle_globally(method, arguments, data_lib.shuffle_seed())

    def _lay_out_synced(self, model):
        """`lay_out` with rank 0's values everywhere (models built with
        different seeds, or changed by hand on one worker, start from the
        same weights)."""
        if jax.process_count() == 1:
            return self.lay_out(model)
        for variable in state_variables(model):
            if variable._value is not None:
                layout = self.native.get_variable_layout(variable)
                value = multihost_utils.broadcast_one_to_all(np.asarray(variable._value))
                variable._layout = layout
                variable._value = self.place(value, layout.backend_layout)

    @contextlib.contextmanager
    def run_context(self, model):
        self._lay_out_synced(model)
        previous = input_mode.global_batches
        input_mode.global_batches = True
        try:
            with super().run_context(model), contextlib.ExitStack() as stack:
                if self._method == "predict" and jax.process_count() > 1:
                    # each device computes its slice of each batch; every
                    # process then gathers the whole batch's outputs
                    stack.enter_context(overriding(model, "make_predict_function", _gathering_maker(model),
                                                   "jax-gathered-predict"))
                yield
        finally:
            input_mode.global_batches = previous


def _gathering_maker(model):
    """A per-model `make_predict_function` whose outputs, sharded over every
    process's devices, are gathered to every process (Keras turns them into
    numpy arrays, which needs them whole on each)."""
    make = model.make_predict_function

    def make_predict_function(force=False):
        make(force=force)  # Keras sets `model.predict_function` (and returns nothing)
        function = model.predict_function
        if getattr(function, "_ks_gathered", False):
            return function

        def gathered(state, data):
            outputs, state = function(state, data)
            return multihost_utils.process_allgather(outputs, tiled=True), state

        gathered._ks_gathered = True
        model.predict_function = gathered
        return gathered

    return make_predict_function


IMPLEMENTATIONS = {"MultiWorkerMirrored": JaxMultiWorkerMirrored}
