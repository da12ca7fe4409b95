"""Adds `distribution=` to `keras.Model.fit`, `evaluate` and `predict`.

Installed by `import keras_strategies` (the `"installed"` patches of
`keras_strategies.patches`), removed by `keras_strategies.uninstall()`.
Keras's own methods are kept and called; the wrapper only picks the strategy
and hands the call to it:

- `distribution=` given: that strategy (pattern 1);
- else the strategy the model was built under (pattern 2, tf.distribute idiom);
- else the strategy whose `scope()` is active;
- else Keras's method runs untouched.
"""

import functools
import inspect

from keras_strategies import patches
from keras_strategies.errors import StrategyError
from keras_strategies.strategies import base as strategies

INSTALLED = ("distribution-argument", "scope-ownership")


def _add_distribution_parameter(original):
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    new = inspect.Parameter("distribution", inspect.Parameter.KEYWORD_ONLY, default=None)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, new)
    else:
        params.append(new)
    return signature.replace(parameters=params)


def with_distribution_argument(original):
    """`Model.fit`/`evaluate`/`predict` with a `distribution=` argument."""
    name = original.__name__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def method(self, *args, distribution=None, **kwargs):
        if distribution is not None and not isinstance(distribution, strategies.Strategy):
            raise StrategyError(
                f"{name}(distribution=...) takes a keras_strategies strategy "
                f"such as keras_strategies.Mirrored(); got {distribution!r}."
            )
        running = self.__dict__.get("_ks_running")
        if running is not None:
            # A nested call, e.g. the evaluate() that fit(validation_data=...)
            # makes: the strategy is already in place.
            return original(self, *args, **kwargs)
        strategy = (
            distribution
            or strategies.model_strategy(self)
            or strategies.current_strategy()
        )
        if strategy is None:
            return original(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs)
        return strategy._run(self, name, original, arguments)

    method.__signature__ = _add_distribution_parameter(original)
    del method.__wrapped__  # so inspect.signature shows `distribution`
    return method


def recording_scope_owner(original):
    """`Trainer.__init__` that records the strategy whose scope is active."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        strategy = strategies.current_strategy()
        if strategy is not None:
            # Plain __dict__ entry: Keras (and torch.nn.Module) do not track it.
            self.__dict__["_ks_strategy"] = strategy

    return __init__


def install():
    """Adds `distribution=` to Keras (once; later calls do nothing)."""
    patches.install(INSTALLED)


def uninstall():
    """Restores Keras exactly as it was before `import keras_strategies`.

    `fit`/`evaluate`/`predict` lose `distribution=`, models built in a
    strategy's scope afterwards no longer remember it, and any Keras function
    replaced for a run in progress is put back. `install()` adds them again.
    """
    patches.remove(patches.applied())
