"""JAX backend: MultiWorkerMirrored with `jax.distributed` and a global mesh.

`jax.distributed.initialize` joins the processes (gloo collectives on CPU),
then a `keras.distribution.DataParallel` over every device of every process
replicates the variables and shards each global batch; XLA inserts the
gradient all-reduce. Every process reads the whole input and each device
takes its slice of each global batch, so numpy, tf.data, PyDataset and
DataLoader inputs all work and each example is used once per step.
Metrics live in replicated arrays, so every worker reports global values.
"""

import contextlib

import jax
import keras
import numpy as np
from jax.experimental import multihost_utils
from keras.src.backend.jax import distribution_lib as jax_distribution_lib
from keras.src.callbacks.callback_list import CallbackList
from keras.src.distribution import distribution_lib

from keras_strategies import data as data_lib
from keras_strategies.backend_base import MultiProcessBackendStrategy
from keras_strategies.backend_base import join_error
from keras_strategies.backend_base import own_coordinator
from keras_strategies.backend_base import restore_compiled_functions
from keras_strategies.backend_base import stash_compiled_functions
from keras_strategies.backend_base import state_variables
from keras_strategies.backends.jax.common import input_mode
from keras_strategies.errors import WorkerError
from keras_strategies.multi_worker import shuffle_seed


def create(strategy, devices, cluster, timeout, **options):
    """Returns the JAX implementation of a multi-process strategy."""
    return JaxMultiWorker(strategy, devices, cluster, timeout, **options)


def _initialize(cluster, timeout, name):
    from jax._src import distributed

    if distributed.global_state.client is not None:
        return  # the user (or Keras) joined already
    # CPU collectives across processes need gloo; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=own_coordinator(cluster),
            num_processes=cluster.world_size,
            process_id=cluster.rank,
            initialization_timeout=int(timeout),
            heartbeat_timeout_seconds=max(10, int(timeout)),
        )
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise join_error(name, "jax", cluster, timeout, error) from error
    jax_distribution_lib.initialize_rng()  # the same Keras seed on every process


class JaxMultiWorker(MultiProcessBackendStrategy):
    backend = "jax"

    def __init__(self, strategy, devices, cluster, timeout):
        if cluster.world_size > 1:
            _initialize(cluster, timeout, type(strategy).__name__)
        super().__init__(strategy, devices, cluster, timeout)
        self.native = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False
        )



    @property
    def num_replicas_in_sync(self):
        return len(keras.distribution.list_devices())

    def resolve_devices(self, requested):
        return [f"{d.platform}:{d.id}" for d in jax.local_devices()]

    def scope(self):
        return self.native.scope()

    def _lay_out(self, model, sync):
        for variable in state_variables(model):
            if variable._value is None:
                continue
            value = variable._value
            if sync and jax.process_count() > 1:
                value = multihost_utils.broadcast_one_to_all(np.asarray(value))
            layout = self.native.get_variable_layout(variable)
            variable._layout = layout
            host = np.asarray(value)
            variable._value = jax.make_array_from_callback(
                host.shape, layout.backend_layout, lambda index, host=host: host[index]
            )

    def attach(self, model):
        self._lay_out(model, sync=False)  # synced in run_context
        restore_compiled_functions(model, self)  # same mesh, same layouts: no new compile

    def detach(self, model):
        home = jax.local_devices()[0]
        for variable in state_variables(model):
            if variable._value is None:
                continue
            host = np.asarray(variable._value)  # replicated: addressable here
            variable._layout = None
            variable._value = jax.device_put(host, home)
        stash_compiled_functions(model, self)

    def prepare_call(self, model, method, arguments):
        self._method = method
        return data_lib.shuffle_globally(method, arguments, shuffle_seed())

    @contextlib.contextmanager
    def run_context(self, model):
        # rank 0's values everywhere (models built with different seeds, or
        # changed by hand on one worker, start from the same weights)
        self._lay_out(model, sync=True)
        previous = (input_mode.global_batches, input_mode.replicate)
        input_mode.global_batches = True
        # predict: every device computes whole batches, so every process
        # holds every prediction, in input order
        input_mode.replicate = getattr(self, "_method", None) == "predict"
        try:
            with self.scope(), _callbacks_outside_distribution():
                yield
        except WorkerError:
            raise
        except Exception as error:
            text = str(error)
            if any(m in text for m in ("Gloo", "gloo", "Connection", "DEADLINE", "heartbeat", "UNAVAILABLE")):
                raise self.lost_contact(error) from error
            raise
        finally:
            input_mode.global_batches, input_mode.replicate = previous


@contextlib.contextmanager
def _callbacks_outside_distribution():
    """Callbacks run with no distribution active: what they create (Keras's
    saving code builds a throw-away Optimizer, for one) stays local, instead of
    becoming a cross-process array that only the chief creates, which would
    leave the other workers out of the collective."""
    originals = {
        name: getattr(CallbackList, name) for name in dir(CallbackList) if name.startswith("on_")
    }

    def local(method):
        def hook(self, *args, **kwargs):
            active = distribution_lib.distribution()
            distribution_lib.set_distribution(None)
            try:
                return method(self, *args, **kwargs)
            finally:
                distribution_lib.set_distribution(active)

        return hook

    for name, method in originals.items():
        setattr(CallbackList, name, local(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(CallbackList, name, method)
