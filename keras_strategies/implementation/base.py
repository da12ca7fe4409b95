"""`Implementation`: one backend's implementation of one strategy.

Each backend module in `keras_strategies.backends.<backend>` defines one
subclass per strategy (`IMPLEMENTATIONS` there maps the strategy's class name
to it). A subclass says what it is -- its devices, its replica count, the
engine's object (`native`) -- and overrides the hooks it needs; `run` calls
them in one fixed order for every fit/evaluate/predict.
"""

import abc
import contextlib

from keras_strategies import patches
from keras_strategies.devices import check_available, normalize_devices, parse_device
from keras_strategies.errors import unsupported
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.resume import exact_backups


class Implementation(abc.ABC):
    """One backend's implementation of one strategy.

    Args:
        strategy: the user-facing `keras_strategies.Strategy`.
        devices: the devices the user asked for, or `None`.
    """

    backend = None  # the Keras backend, set by each backend's base class
    keras_patches = ()  # names of "run" patches (keras_strategies.patches) active during a run
    epoch_patches = ("epoch-spare-iterator",)  # run patches of every distributing strategy
    batch_patches = ("unread-batch-logs",)  # and these too (not Default: plain Keras's own fit)
    exact_resume = True  # a fit's BackupAndRestore resumes exactly (implementation.resume)
    _seed_call = None  # (method, arguments) of the call `run` is in, for `call_seed`
    _call_seed = None

    @classmethod
    def create(cls, strategy, devices, **options):
        """Builds the implementation (a subclass may return another class's)."""
        return cls(strategy, devices, **options)

    def __init__(self, strategy, devices):
        self.strategy = strategy
        self.name = type(strategy).__name__
        self.devices = self.resolve_devices(
            None if devices is None else normalize_devices(devices, self.name)
        )
        self.native = None

    # -- who am I (one process unless a subclass says otherwise) -------------
    num_workers = 1
    worker_index = 0
    is_chief = True
    role = "chief"

    def describe(self):
        """This process in messages: `"the chief"`, `"worker 1"`, `"ps 0"`."""
        return "the chief" if self.role == "chief" else f"{self.role} {self.worker_index}"

    @property
    def num_replicas_in_sync(self):
        """How many replicas each global batch is split over."""
        return len(self.devices)

    def resolve_devices(self, requested):
        """Returns the devices to use, as canonical Keras names.

        Args:
            requested: canonical names the user asked for, or `None`.

        Returns:
            `default_devices()` when none were asked for; else the ones asked
            for, checked against `available_devices`.
        """
        if requested is None:
            return self.default_devices()
        kind = parse_device(requested[0])[0]
        available, hint = self.available_devices(kind, requested)
        check_available(requested, available, self.name, self.backend, hint)
        return requested

    @abc.abstractmethod
    def default_devices(self):
        """The devices used when none are asked for (canonical names)."""

    def available_devices(self, kind, requested):
        """`(names, hint)`: the devices of one type this backend has here, and
        a sentence for the error when a requested one is missing.

        Args:
            kind: `"cpu"`, `"gpu"` or `"tpu"`.
            requested: the canonical names asked for (a backend may make more
                CPU devices for them while it has not started).
        """
        return [], ""

    def unsupported(self, missing, fix=None):
        """The `UnsupportedStrategyError` naming this strategy and backend."""
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

    def call_context(self, model, method):
        """The context one call runs in: `run_context` unless a subclass
        runs some calls differently (a split `predict`)."""
        return self.run_context(model)

    # -- collectives across the job's processes (one process: nothing to do)
    def broadcast_bytes(self, data):
        """The chief's `data` (bytes), on every worker.

        Args:
            data: the bytes to send (read on the chief only).

        Returns:
            The chief's bytes.
        """
        return data

    def any_worker(self, flag):
        """Whether `flag` is true on any worker (a collective every worker
        calls at the same point).

        Args:
            flag: this worker's boolean.

        Returns:
            The same boolean on every worker.
        """
        return bool(flag)

    # -- one fit/evaluate/predict --------------------------------------------
    @property
    def call_seed(self):
        """The shuffle seed of the call `run` is in (`data.fit_seed`: new
        for each fit that shuffles arrays, the chief's on every worker),
        drawn when first read: a strategy that leaves shuffling to Keras
        leaves numpy's generator as Keras expects it. Every worker reads it
        at the same point (across processes, the draw is a collective)."""
        if self._call_seed is None:
            if self._seed_call is None:  # outside a call
                return data_lib.shuffle_seed()
            self._call_seed = data_lib.fit_seed(*self._seed_call, self.broadcast_bytes)
        return self._call_seed

    def run(self, model, method, original, arguments, attached):
        """Runs Keras's own `original` method under this strategy.

        Args:
            model: the Keras model.
            method: `"fit"`, `"evaluate"` or `"predict"`.
            original: Keras's own unbound method.
            arguments: the call's `inspect.BoundArguments`.
            attached: whether the model was built in this strategy's scope
                (then there is nothing to attach or detach).

        Returns:
            What the original method returns.
        """
        self._seed_call, self._call_seed = (method, arguments), None
        try:
            arguments = self.prepare_call(model, method, arguments)
            with patches.active(self.keras_patches + self.epoch_patches + self.batch_patches), \
                    exact_backups(self, model, method, arguments):
                if not attached:
                    self.attach(model)
                try:
                    with self.call_context(model, method):
                        result = original(*arguments.args, **arguments.kwargs)
                except BaseException:
                    if not attached:
                        with contextlib.suppress(Exception):  # the first error is the one to see
                            self.detach(model)
                    raise
                if not attached:
                    self.detach(model)
        finally:
            self._seed_call = self._call_seed = None  # the call's input is not kept past it
        return result


class NoDistribution:
    """A mixin for `Default`: no scope, nothing to lay out, nothing to fix."""

    keras_patches = ()
    epoch_patches = ()
    batch_patches = ()

    def scope(self):
        return contextlib.nullcontext()

    def attach(self, model):
        pass

    def detach(self, model):
        pass

    def run_context(self, model):
        return contextlib.nullcontext()
