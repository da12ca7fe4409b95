"""The one multi-process layer: what every strategy whose replicas span
processes does the same way on every backend.

MultiWorkerMirrored, Mirrored over several devices on PyTorch (one process
per device) and ParameterServer build on `MultiProcessImplementation`:
the cluster and the timeout, who is the chief, the chief-only callbacks, a
scratch directory per worker, the watchdog, and one `WorkerError` wording
for a peer that died or hung.
"""

import contextlib
import os
import shutil
import socket
import tempfile

from keras_strategies.cluster import resolve_cluster
from keras_strategies.cluster.spec import is_loopback
from keras_strategies.errors import StrategyError, WorkerError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.base import Implementation
from keras_strategies.implementation.chief_only import for_this_worker
from keras_strategies.implementation.watchdog import Heartbeat, Watchdog

DEFAULT_TIMEOUT = 1800.0
TIMEOUT_VARIABLE = "KERAS_STRATEGIES_TIMEOUT"


def default_timeout():
    """Seconds a worker waits for its peers before failing: the
    `KERAS_STRATEGIES_TIMEOUT` environment variable, else 1800."""
    return float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT))


def own_coordinator(cluster, environ=None):
    """The `host:port` an engine other than torch binds for its coordinator.

    Under torchrun the agent's store already listens on MASTER_PORT (torch's
    own process group reuses it); JAX's coordinator and TensorFlow's
    rendezvous then take the next port, the same on every worker.
    """
    environ = os.environ if environ is None else environ
    if cluster.coordinator and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        host, port = cluster.coordinator.rsplit(":", 1)
        return f"{host}:{int(port) + 1}"
    return cluster.coordinator


def loopback_only(cluster):
    """Whether every process of the job is on this machine: the coordinator
    is a loopback address (no other machine could reach it). The engines are
    then told to listen on loopback only.

    Returns:
        `(True, host)` with the coordinator's host, or `(False, None)`.
    """
    if not cluster.coordinator:
        return False, None
    host = cluster.coordinator.rsplit(":", 1)[0].strip("[]")
    return (True, "127.0.0.1" if host == "localhost" else host) if is_loopback(host) else (False, None)


def loopback_interface():
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def join_error(strategy_name, backend, cluster, timeout, error):
    """The `WorkerError` for a process group that could not be formed (before
    the implementation exists: JAX joins before it sees its devices)."""
    return WorkerError(
        f"{strategy_name} on the {backend} backend: worker {cluster.rank} could not "
        f"form a group of {cluster.world_size} workers at {cluster.coordinator} within "
        f"{timeout:.0f}s ({error}). Check that every worker started, that they agree "
        "on the address, and that the port is free."
    )


def gather_parts(outputs, examples, world, all_gather):
    """Every worker's `predict` outputs for its contiguous part of `examples`
    (`data.chunk_bounds`), concatenated in input order on every worker.

    Args:
        outputs: this worker's outputs (a structure of numpy arrays).
        examples: the number of examples of the whole input.
        world: the number of workers.
        all_gather: the backend's gather of one numpy array of one shape on
            every worker (each part is padded to the longest).

    Returns:
        The outputs' structure, each array over all `examples`.
    """
    import keras
    import numpy as np

    bounds = [data_lib.chunk_bounds(examples, rank, world) for rank in range(world)]
    longest = max(hi - lo for lo, hi in bounds)

    def gather(part):
        part = np.asarray(part)
        padded = np.zeros((longest, *part.shape[1:]), part.dtype)
        padded[:len(part)] = part
        every = all_gather(padded)
        return np.concatenate([piece[:hi - lo] for piece, (lo, hi) in zip(every, bounds)])

    return keras.tree.map_structure(gather, outputs)


def processes_for_devices(devices, strategy_name, backend):
    """The cluster of a strategy that runs one process per local device.

    Started by a launcher (or torchrun), this process is one of them. Started
    as a plain `python train.py`, the script is started again as one process
    per device (`keras_strategies.launch.relaunch_this_script`) and this
    process only waits for them and exits with their code.

    Args:
        devices: the canonical device names, one process each.
        strategy_name, backend: used in messages.

    Returns:
        This process's `ClusterSpec`.
    """
    cluster = resolve_cluster()
    if cluster.world_size == 1:
        from keras_strategies.launch import relaunch_this_script

        relaunch_this_script(len(devices), strategy_name, backend)
    if cluster.world_size != len(devices):
        raise StrategyError(
            f"{strategy_name}(devices={devices}) on the {backend} backend runs one "
            f"process per device, but this job has {cluster.world_size} processes "
            f"(from {cluster.source}). Start it with --nproc-per-node {len(devices)}, "
            "or use MultiWorkerMirrored() for one process per device across machines."
        )
    return cluster


class MultiProcessImplementation(Implementation):
    """An implementation whose replicas span processes (one cluster).

    Subclasses name the engine's errors that mean a peer is gone:
    `lost_contact_errors` (exception types) and `lost_contact_markers`
    (fragments of their messages); such an error becomes a `WorkerError`.

    Args:
        strategy: the user-facing strategy.
        devices: the devices asked for, or `None`.
        cluster: a `keras_strategies.cluster.ClusterSpec`.
        timeout: seconds to wait for a peer before failing.
    """

    lost_contact_errors = ()
    lost_contact_markers = ()
    splits_predict = False  # predict on arrays: each worker its part, one gather (see `run`)

    def __init__(self, strategy, devices, cluster, timeout):
        self.cluster = cluster
        self.timeout = timeout
        self._scratch = None
        self._predict_part = None  # the number of examples while a split predict runs
        super().__init__(strategy, devices)

    @property
    def num_workers(self):
        return self.cluster.world_size

    @property
    def worker_index(self):
        return self.cluster.rank

    @property
    def is_chief(self):
        return self.cluster.rank == 0

    @property
    def role(self):
        return "chief" if self.is_chief else "worker"

    @property
    def multi_process(self):
        """Whether this job has more than one process."""
        return self.cluster.world_size > 1

    def run(self, model, method, original, arguments, attached):
        if not self.multi_process:
            return self._one_call(model, method, original, arguments, attached)
        for_this_worker(arguments, self.is_chief, self._scratch_dir, [Heartbeat()])
        try:
            with Watchdog(self), self.peer_failures():
                return self._one_call(model, method, original, arguments, attached)
        finally:
            self._cleanup_scratch()

    def _one_call(self, model, method, original, arguments, attached):
        """`Implementation.run`, but a `predict` on array input is split:
        each worker predicts its contiguous part on its own devices
        (`local_predict_context`, no collective per batch), then one
        all-gather per output puts every prediction, in input order, on
        every worker."""
        examples = None
        if method == "predict" and self.splits_predict_for(model):
            examples = data_lib.shard_predict(arguments, self.worker_index, self.num_workers)
        if examples is None:
            return super().run(model, method, original, arguments, attached)
        self._predict_part = examples
        try:
            part = super().run(model, method, original, arguments, attached)
        finally:
            self._predict_part = None
        if not self.multi_process:
            return part
        return gather_parts(part, examples, self.num_workers, self.all_gather)

    def splits_predict_for(self, model):
        """Whether a `predict` of `model` on array input is split (`splits_predict`
        unless a backend needs more, such as a model already built)."""
        return self.splits_predict

    def call_context(self, model, method):
        if self._predict_part is not None:
            return self.local_predict_context(model)
        return super().call_context(model, method)

    def local_predict_context(self, model):
        """Entered instead of `run_context` around a split `predict`: this
        process's part runs on its own devices, without collectives."""
        return self.run_context(model)

    def all_gather(self, array):
        """Every worker's `array` (a numpy array, one shape and dtype on
        every worker), as a list in worker order, on every worker."""
        raise NotImplementedError(f"{type(self).__name__} splits predict but gathers nothing")

    @contextlib.contextmanager
    def peer_failures(self):
        """Turns the engine's errors for a lost peer into a `WorkerError`."""
        try:
            yield
        except WorkerError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised, translated or not
            text = str(error)
            if isinstance(error, self.lost_contact_errors) or any(
                marker in text for marker in self.lost_contact_markers
            ):
                raise self.lost_contact(error) from error
            raise

    def lost_contact(self, error):
        """The `WorkerError` every survivor raises when a peer dies or hangs."""
        text = str(error).strip().splitlines()
        return WorkerError(
            f"{self.name} on the {self.backend} backend: {self.describe()} lost "
            f"contact with its peers (one died or hung; waited up to {self.timeout:.0f}s): "
            f"{text[0] if text else repr(error)}. See the other workers' output; timeout= "
            "(or KERAS_STRATEGIES_TIMEOUT) sets how long to wait."
        )

    def join_error(self, error):
        """The `WorkerError` for a process group that could not be formed."""
        cluster = self.cluster
        return WorkerError(
            f"{self.name} on the {self.backend} backend: {self.describe()} could not join the job's "
            f"{cluster.world_size + cluster.num_ps} processes at {cluster.coordinator} within "
            f"{self.timeout:.0f}s ({error}). Check that every process started (the chief first: it "
            "hosts the meeting point), that they agree on the address, and that the port is free."
        )

    def _scratch_dir(self):
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix=f"keras-strategies-worker{self.worker_index}-")
        return self._scratch

    def _cleanup_scratch(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
