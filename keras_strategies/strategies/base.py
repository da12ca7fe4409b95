"""`Strategy`, the base of every strategy, and the scope stack.

Each strategy says *what* happens (replicate the model, split the batch, reduce
the gradients, place the variables); its implementation for the active backend
(`keras_strategies.backends.<backend>`) says *how*, with that engine's own
machinery.
"""

import contextlib
import threading

from keras_strategies import loader
from keras_strategies.implementation.data import is_array_like
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

    _family = None  # the module of keras_strategies.backends.<backend> implementing it

    def __init__(self, devices=None, **options):
        self._backend = loader.backend_name()
        self._impl = loader.implementation(self, devices, **options)

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
        return self._impl.is_chief

    @property
    def role(self):
        """This process's part in the job: `"chief"` (the only one in a
        one-process job), `"worker"` or `"ps"` (a parameter server)."""
        return self._impl.role

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
        model.__dict__["_ks_running"] = self
        try:
            return self._impl.run(model, method, original, arguments, attached=bound is self)
        finally:
            model.__dict__.pop("_ks_running", None)

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
