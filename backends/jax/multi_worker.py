"""JAX MultiWorkerMirrored: `jax.distributed` and a global mesh.

`jax.distributed.initialize` joins the processes (gloo collectives on CPU),
then a `keras.distribution.DataParallel` over every device of every process
replicates the variables and shards each global batch; XLA inserts the
gradient all-reduce. Every process reads the whole input and each device
takes its slice of each global batch, so numpy, tf.data, PyDataset and
DataLoader inputs all work and each example is used once per step.
Metrics live in replicated arrays, so every worker reports global values.
"""

import contextlib
import functools
import importlib.abc
import importlib.util
import random
import sys

import jax
import keras
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from keras.src.utils import rng_utils

from keras_strategies.backends.jax.base import JaxImplementation
from keras_strategies.backends.jax.keras_fixes import input_mode
from keras_strategies.errors import StrategyError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.model_state import cached_predict_function, state_variables
from keras_strategies import patches
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
    _agree_seed()  # the same Keras seed on every process


def check_devices_per_process(name):
    """Raises a clear `StrategyError` when a process has no device of this
    process's platform (a machine without the GPUs the others have): every
    process sees the same global device list of its platform, so the
    processes that have one decide alike, before any collective. Processes
    with different numbers of devices are fine (see `from_process_zero`
    and the `jax-uneven-device-put` patch)."""
    platform = jax.default_backend()
    owners = {device.process_index for device in jax.devices()}
    missing = sorted(set(range(jax.process_count())) - owners)
    if missing:
        raise StrategyError(
            f"{name} on the jax backend: process(es) {', '.join(map(str, missing))} have no {platform} device, "
            f"and one JAX job runs on one platform ({platform} here). Give every machine the same kind of "
            "accelerator, or run every process on its CPU (JAX_PLATFORMS=cpu on every machine)."
        )


def _agree_seed():
    """Process 0's Keras seed on every process, unless one was set: what
    Keras's `initialize_rng` does with a `jax.pmap`, which needs the same
    number of devices in every process (a bare AssertionError otherwise)."""
    if rng_utils.get_random_seed() is None:
        from keras.src.random import seed_generator

        seed = from_process_zero([np.asarray(seed_generator.make_default_seed(), np.uint32)])[0]
        set_random_seed(int(seed))


def set_random_seed(seed):
    """`keras.utils.set_random_seed`, without importing TensorFlow: Keras's
    imports it to seed it (~5 s and ~0.5 GB in each process of a JAX job
    that never uses it). TensorFlow, when it is or gets imported, is seeded
    all the same (tf.data shuffles then agree between the processes)."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].random.set_seed(seed)
    elif importlib.util.find_spec("tensorflow") is not None:
        sys.meta_path.insert(0, _SeedTensorFlowOnImport(seed))


class _SeedTensorFlowOnImport(importlib.abc.MetaPathFinder):
    """Seeds TensorFlow right after its first import, then steps aside."""

    def __init__(self, seed):
        self.seed = seed

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module, seed = spec.loader.exec_module, self.seed

        def exec_and_seed(module):
            exec_module(module)
            module.random.set_seed(seed)

        spec.loader.exec_module = exec_and_seed
        return spec


def from_process_zero(values):
    """Process 0's `values` on every process, whatever the number of devices
    of each (JAX's `broadcast_one_to_all` needs the same number everywhere):
    one compiled selection per dtype.

    Args:
        values: numpy arrays, the same shapes and dtypes on every process.

    Returns:
        A list of numpy arrays: process 0's values.
    """
    results = [None] * len(values)
    for dtype in sorted({np.asarray(v).dtype for v in values}, key=str):  # one order on every process
        chosen = [i for i, v in enumerate(values) if np.asarray(v).dtype == dtype]
        flat = np.concatenate([np.asarray(values[i]).ravel() for i in chosen])
        picked, offset = over_processes(flat, "first"), 0
        for i in chosen:
            size = np.asarray(values[i]).size
            results[i] = picked[offset:offset + size].reshape(np.shape(values[i]))
            offset += size
    return results


_COMBINE = {}  # (how, devices) -> the compiled combination


def over_processes(flat, how):
    """Every process's `flat` combined over the processes, on every process:
    `"first"` gives process 0's, `"max"` the elementwise largest, `"all"`
    every process's (stacked in process order). Any number of devices per
    process (each device's row holds its process's values).

    Args:
        flat: a 1-D numpy array, the same shape and dtype on every process.
        how: `"first"`, `"max"` or `"all"`.

    Returns:
        A numpy array shaped like `flat` (`"all"`: one row per process).
    """
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("processes",))
    rows = np.broadcast_to(flat, (len(devices), flat.size))
    stacked = jax.make_array_from_callback(rows.shape, NamedSharding(mesh, PartitionSpec("processes")),
                                           lambda index: rows[index])
    key = (how, tuple(devices))
    if key not in _COMBINE:
        firsts = np.array([next(i for i, device in enumerate(devices) if device.process_index == process)
                           for process in range(jax.process_count())])
        combine = {"first": lambda a: a[firsts[0]], "max": lambda a: a.max(axis=0),
                   "all": lambda a: a[firsts]}[how]
        _COMBINE[key] = jax.jit(combine, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return np.asarray(_COMBINE[key](stacked).addressable_data(0))


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

    keras_patches = JaxImplementation.keras_patches + ("jax-callbacks-local", "jax-uneven-device-put")
    splits_predict = True
    lost_contact_markers = ("Gloo", "gloo", "Connection", "DEADLINE", "heartbeat", "UNAVAILABLE")

    def __init__(self, strategy, devices, cluster, timeout):
        if cluster.world_size > 1:  # before anything starts JAX's backend
            _initialize(cluster, timeout, type(strategy).__name__)
        super().__init__(strategy, devices, cluster, timeout)
        self._method = None

    @contextlib.contextmanager
    def scope(self):
        with super().scope(), patches.active(("jax-uneven-device-put",)):  # variables are created here
            yield

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
        return data_lib.shuffle_globally(method, arguments, self.call_seed)

    def broadcast_bytes(self, data):
        if jax.process_count() == 1:
            return data
        length = np.frombuffer(len(data).to_bytes(8, "little") if self.is_chief else bytes(8), np.uint8)
        size = int.from_bytes(over_processes(length, "first").tobytes(), "little")
        payload = np.frombuffer(data, np.uint8) if self.is_chief else np.zeros(size, np.uint8)
        return over_processes(payload, "first").tobytes()

    def any_worker(self, flag):
        if jax.process_count() == 1:
            return bool(flag)
        return bool(over_processes(np.array([int(bool(flag))], np.int32), "max")[0])

    def splits_predict_for(self, model):
        # a model not yet built: Keras's own predict over the mesh (the split
        # would create its variables with this process's layout)
        return model.built

    def all_gather(self, array):
        return list(over_processes(array.ravel(), "all").reshape(-1, *array.shape))

    @contextlib.contextmanager
    def local_predict_context(self, model):
        """This process's part of a split `predict` on its own devices (a
        `DataParallel` over them): rank 0's weights, copied off the global
        mesh for the call. Keras's predict over the global mesh would gather
        every batch's outputs across the processes."""
        self._lay_out_synced(model)
        local = keras.distribution.DataParallel(devices=self.default_devices(), auto_shard_dataset=False)
        variables = [v for v in state_variables(model) if v._value is not None]
        kept = [(v._layout, v._value) for v in variables]
        try:
            for variable in variables:
                variable._layout = None  # else Keras answers with the layout a variable has
                variable._layout = local.get_variable_layout(variable)
                # a copy of its own (device_put may alias the shard on its device): Keras's
                # predict step donates it, and the mesh's array is put back after
                copy = jax.numpy.array(variable._value.addressable_data(0), copy=True)
                variable._value = jax.device_put(copy, variable._layout.backend_layout)
            with local.scope(), cached_predict_function(model, self):
                yield
        finally:
            for variable, (layout, value) in zip(variables, kept):
                variable._layout, variable._value = layout, value

    def _lay_out_synced(self, model):
        """`lay_out` with rank 0's values everywhere (models built with
        different seeds, or changed by hand on one worker, start from the
        same weights)."""
        if jax.process_count() == 1:
            return self.lay_out(model)
        variables = [v for v in state_variables(model) if v._value is not None]
        for variable, value in zip(variables, from_process_zero([np.asarray(v._value) for v in variables])):
            layout = self.native.get_variable_layout(variable)
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
