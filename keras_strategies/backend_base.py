"""What every backend implementation shares; the backends subclass it."""

import abc
import contextlib
import os

from keras_strategies.devices import normalize_devices
from keras_strategies.errors import WorkerError, unsupported


def state_variables(model):
    """Every variable a training step touches: model, optimizer and metrics.

    Args:
        model: a Keras model.

    Returns:
        A list of Keras variables without duplicates, in a stable order.
    """
    found, seen = [], set()
    groups = [model.variables, getattr(model, "metrics_variables", [])]
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        groups.append(optimizer.variables)
    for group in groups:
        for variable in group:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def reset_compiled_functions(model):
    """Drops the model's traced/jitted step functions so they are built anew."""
    model.train_function = None
    model.test_function = None
    model.predict_function = None


_STASH = "_ks_compiled_functions"


def _compiled_with(model, values):
    # What a compiled step bakes in: Keras's compile() replaces these objects
    # (and a step that creates state adds variables), so any change means the
    # stashed functions are stale. Compared by identity, the objects held.
    # `values`: the backend variables too, where a traced step captures them
    # (TensorFlow), so that re-created variables mean a new trace.
    variables = state_variables(model)
    return [getattr(model, "optimizer", None), getattr(model, "_compile_loss", None),
            getattr(model, "_compile_metrics", None), *variables,
            *([v._value for v in variables] if values else [])]


def stash_compiled_functions(model, owner, values=False):
    """Keeps the step functions compiled under `owner` for its next run of the
    model, and leaves the model without them (plain Keras builds its own).

    Args:
        model: the Keras model, after a fit/evaluate/predict under `owner`.
        owner: the backend strategy that compiled them.
        values: whether the functions captured the backend variables
            (TensorFlow's traced steps do; JAX's take them as arguments).
    """
    model.__dict__[_STASH] = (owner, _compiled_with(model, values),
                              (model.train_function, model.test_function, model.predict_function))
    reset_compiled_functions(model)


def drop_compiled_functions(model):
    """Forgets stashed step functions (and what they hold on to)."""
    model.__dict__.pop(_STASH, None)
    reset_compiled_functions(model)


def restore_compiled_functions(model, owner, values=False):
    """The step functions `owner` compiled for this model in an earlier
    fit/evaluate/predict, so that calling them again does not compile again;
    none when another strategy compiled them or the model was compiled anew
    (or, with `values`, its variables were re-created) since.

    Args:
        model: the Keras model, before a fit/evaluate/predict under `owner`.
        owner: the backend strategy about to run it.
        values: as given to `stash_compiled_functions`.

    Returns:
        True if the functions were restored.
    """
    stash = model.__dict__.pop(_STASH, None)
    if stash is not None and stash[0] is owner:
        before, now = stash[1], _compiled_with(model, values)
        if len(before) == len(now) and all(a is b for a, b in zip(before, now)):
            model.train_function, model.test_function, model.predict_function = stash[2]
            return True
    reset_compiled_functions(model)
    return False


class BackendStrategy(abc.ABC):
    """One backend's implementation of one strategy.

    Subclasses resolve the devices in `__init__` and override the hooks.

    Args:
        strategy: the user-facing `keras_strategies.Strategy`.
        devices: the devices the user asked for, or `None`.
    """

    def __init__(self, strategy, devices):
        self.strategy = strategy
        self.name = type(strategy).__name__
        self.kind = strategy.kind
        self.devices = self.resolve_devices(
            None if devices is None else normalize_devices(devices, self.name)
        )
        self.native = None

    backend = None  # set by subclasses

    # -- who am I (one process unless a subclass says otherwise) -------------
    num_workers = 1
    worker_index = 0

    @property
    def num_replicas_in_sync(self):
        return len(self.devices) if self.kind == "mirrored" else 1

    @abc.abstractmethod
    def resolve_devices(self, requested):
        """Returns the devices to use, as canonical Keras names.

        Args:
            requested: canonical names the user asked for, or `None`.

        Returns:
            A list of canonical device names.
        """

    def unsupported(self, missing, fix=None):
        return unsupported(self.name, self.backend, missing, fix)

    # -- hooks ---------------------------------------------------------------
    def scope(self):
        """Entered by `Strategy.scope()`: models built inside belong to it."""
        return contextlib.nullcontext()

    def attach(self, model):
        """Lays out a model built outside the scope for this strategy."""

    def detach(self, model):
        """Undoes `attach`, leaving an ordinary single-device model."""

    def prepare_call(self, model, method, arguments):
        """Rewrites a fit/evaluate/predict call's `inspect.BoundArguments`."""
        return arguments

    def run_context(self, model):
        """Entered around each fit/evaluate/predict of the model."""
        return self.scope()


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


def join_error(strategy_name, backend, cluster, timeout, error):
    """The `WorkerError` for a process group that could not be formed."""
    return WorkerError(
        f"{strategy_name} on the {backend} backend: worker {cluster.rank} could not "
        f"form a group of {cluster.world_size} workers at {cluster.coordinator} within "
        f"{timeout:.0f}s ({error}). Check that every worker started, that they agree "
        "on the address, and that the port is free."
    )


class MultiProcessBackendStrategy(BackendStrategy):
    """A backend strategy whose replicas span processes (one cluster).

    Args:
        strategy: the user-facing strategy.
        devices: the devices asked for, or `None`.
        cluster: a `keras_strategies.cluster.ClusterSpec`.
        timeout: seconds to wait for a peer before failing.
    """

    def __init__(self, strategy, devices, cluster, timeout):
        self.cluster = cluster
        self.timeout = timeout
        super().__init__(strategy, devices)

    @property
    def num_workers(self):
        return self.cluster.world_size

    @property
    def worker_index(self):
        return self.cluster.rank

    def lost_contact(self, error):
        """The `WorkerError` every survivor raises when a peer dies or hangs."""
        from keras_strategies.errors import WorkerError

        text = str(error).strip().splitlines()
        return WorkerError(
            f"{self.name} on the {self.backend} backend: worker {self.cluster.rank} lost "
            f"contact with its peers (one died or hung; waited up to {self.timeout:.0f}s): "
            f"{text[0] if text else repr(error)}. See the other workers' output; timeout= "
            "(or KERAS_STRATEGIES_TIMEOUT) sets how long to wait."
        )
