"""The backend-neutral strategy classes.

Each strategy says *what* happens (replicate the model, split the batch, reduce
the gradients, place the variables); the module for the active backend in
`keras_strategies.backends` says *how*, with that engine's own machinery.
"""

import contextlib
import threading

from keras_strategies import backend as backend_lib
from keras_strategies.data import is_array_like
from keras_strategies.errors import StrategyError

_state = threading.local()


def _scope_stack():
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def current_strategy():
    """Returns the strategy whose `scope()` is innermost, or `None`."""
    stack = _scope_stack()
    return stack[-1] if stack else None


def model_strategy(model):
    """Returns the strategy a model was built under, or `None`."""
    return model.__dict__.get("_ks_strategy")


class Strategy:
    """Base class of every strategy.

    A strategy is used in one of two ways, on every backend:

    ```python
    model.fit(x, y, batch_size=256, distribution=strategy)  # pattern 1
    with strategy.scope():                                   # pattern 2
        model = build(); model.compile(...)
    model.fit(x, y, batch_size=256)
    ```

    `batch_size` is always the global batch: it is split over
    `num_replicas_in_sync` replicas.
    """

    kind = None  # set by each subclass; the backends dispatch on it
    implementation = "local"  # module in keras_strategies.backends.<backend>

    def __init__(self, devices=None, **options):
        self._backend = backend_lib.backend_name()
        module = backend_lib.implementation_module(self)
        self._impl = module.create(self, devices, **options)

    # -- what a user reads ---------------------------------------------------
    @property
    def backend(self):
        """The Keras backend this strategy runs on."""
        return self._backend

    @property
    def devices(self):
        """The local devices holding replicas, as Keras-style names."""
        return list(self._impl.devices)

    @property
    def num_replicas_in_sync(self):
        """How many replicas each global batch is split over."""
        return self._impl.num_replicas_in_sync

    @property
    def num_workers(self):
        """How many worker processes take part (1 for one-process strategies)."""
        return self._impl.num_workers

    @property
    def worker_index(self):
        """This process's index among the workers (0 for the chief)."""
        return self._impl.worker_index

    @property
    def is_chief(self):
        """Whether this process is the one that writes checkpoints and logs."""
        return self.worker_index == 0

    @property
    def native(self):
        """The engine's own object (a `tf.distribute.Strategy`, a
        `keras.distribution.Distribution`, a torch device), for advanced use."""
        return self._impl.native

    def __repr__(self):
        return (
            f"{type(self).__name__}(backend={self._backend!r}, "
            f"devices={self.devices})"
        )

    # -- the tf.distribute idiom ----------------------------------------------
    @contextlib.contextmanager
    def scope(self):
        """Context manager: models built inside it belong to this strategy.

        Returns:
            A context manager yielding the strategy.

        Example:
        ```python
        strategy = keras_strategies.Mirrored()
        with strategy.scope():
            model = build_model()
            model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=64)
        ```
        """
        stack = _scope_stack()
        stack.append(self)
        try:
            with self._impl.scope():
                yield self
        finally:
            stack.pop()

    # -- what `Model.fit(distribution=...)` calls -----------------------------
    def _run(self, model, method, original, arguments):
        """Runs `original(model, ...)` (fit/evaluate/predict) under this strategy.

        Args:
            model: the Keras model.
            method: `"fit"`, `"evaluate"` or `"predict"`.
            original: Keras's own unbound method.
            arguments: an `inspect.BoundArguments` of the call.

        Returns:
            What the original method returns.
        """
        bound = model_strategy(model)
        if bound is not None and bound is not self:
            raise StrategyError(
                f"This model was built under {bound!r} and cannot be run with "
                f"{self!r}. Call {method}() without `distribution=` (it then "
                f"uses {type(bound).__name__}), or build and compile the model "
                f"again under `{type(self).__name__}(...).scope()`."
            )
        self._check_batch_sizes(method, arguments)
        arguments = self._prepare_call(model, method, arguments)
        attached = bound is self
        model.__dict__["_ks_running"] = self
        try:
            if not attached:
                self._impl.attach(model)
            try:
                with self._impl.run_context(model):
                    result = original(*arguments.args, **arguments.kwargs)
            except BaseException:
                if not attached:
                    try:
                        self._impl.detach(model)
                    except Exception:  # noqa: BLE001 - the first error is the one to see
                        pass
                raise
            if not attached:
                self._impl.detach(model)
            return result
        finally:
            model.__dict__.pop("_ks_running", None)

    def _prepare_call(self, model, method, arguments):
        """Rewrites the call's arguments (data split, callbacks); the
        strategy's backend may rewrite them further."""
        return self._impl.prepare_call(model, method, arguments)

    def _check_batch_sizes(self, method, arguments):
        replicas = self.num_replicas_in_sync
        if replicas == 1:
            return
        args = arguments.arguments
        checks = [("batch_size", args.get("x"))]
        if method == "fit" and args.get("validation_data") is not None:
            val_x = args["validation_data"]
            val_x = val_x[0] if isinstance(val_x, (tuple, list)) else val_x
            checks.append(("validation_batch_size", val_x))
        for name, x in checks:
            if not is_array_like(x):
                continue  # datasets carry their own batch size
            size = args.get(name)
            if size is None and name == "validation_batch_size":
                size, name = args.get("batch_size"), "batch_size"
            size = 32 if size is None else size  # Keras's default
            if size % replicas:
                lower = (size // replicas) * replicas or replicas
                upper = lower + replicas if lower < size else lower
                raise StrategyError(
                    f"{self!r} splits each global batch over {replicas} "
                    f"replicas, but {name}={size} is not a multiple of "
                    f"{replicas}. Use a multiple of {replicas}, such as "
                    f"{lower} or {upper}."
                )


class Default(Strategy):
    """No distribution: one replica on the backend's default device.

    The same code path as the other strategies, so a script can switch
    strategies with one argument.

    Example:
    ```python
    model.fit(x, y, distribution=keras_strategies.Default())
    ```
    """

    kind = "default"

    def __init__(self):
        super().__init__(None)

    def __repr__(self):
        return f"Default(backend={self._backend!r}, devices={self.devices})"


class OneDevice(Strategy):
    """Everything (variables and computation) on one device.

    Args:
        device: a Keras-style device name such as `"cpu:0"` or `"gpu:1"`.

    Example:
    ```python
    model.fit(x, y, distribution=keras_strategies.OneDevice("gpu:0"))
    ```
    """

    kind = "one_device"

    def __init__(self, device):
        if isinstance(device, (list, tuple)):
            raise StrategyError(
                f"OneDevice takes one device name, got {device!r}; use "
                "Mirrored(devices=...) for several."
            )
        super().__init__([device])


class Mirrored(Strategy):
    """Synchronous data parallelism over the devices of one machine.

    The model is replicated on every device, each global batch is split
    evenly over the replicas, and the gradients are all-reduced each step,
    so training gives the same weights as one device on the whole batch.
    Batch-normalisation statistics are computed over the global batch.

    Args:
        devices: Keras-style device names, e.g. `["gpu:0", "gpu:1"]`.
            `None` means every local GPU (or TPU core), or one CPU when
            there is none. On a CPU-only machine `["cpu:0", "cpu:1"]` gives
            two real replicas on TensorFlow and JAX when the strategy is
            created before the backend has started.

    Example:
    ```python
    with keras_strategies.Mirrored(["gpu:0", "gpu:1"]).scope():
        model = build_model(); model.compile(...)
    model.fit(x, y, batch_size=256)
    ```
    """

    kind = "mirrored"

    def __init__(self, devices=None):
        super().__init__(devices)
