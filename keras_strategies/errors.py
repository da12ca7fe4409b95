"""Errors raised by keras-strategies."""


class StrategyError(ValueError):
    """A strategy was given something it cannot work with (bad device, batch...)."""


class UnsupportedStrategyError(RuntimeError):
    """A strategy cannot run on this backend or machine.

    The message always names the strategy, the backend and what is missing.
    """


class WorkerError(RuntimeError):
    """A peer worker died, hung or could not be reached.

    Raised on every surviving worker within the strategy's `timeout`.
    """


def unsupported(strategy_name, backend, missing, fix=None):
    """Builds an `UnsupportedStrategyError` with the standard wording.

    Args:
        strategy_name: the strategy's class name, e.g. `"TPU"`.
        backend: the Keras backend name.
        missing: what is missing, e.g. `"no TPU devices were found"`.
        fix: optional sentence saying what to do instead.

    Returns:
        An `UnsupportedStrategyError` instance, ready to raise.
    """
    message = f"{strategy_name} on the {backend} backend: {missing}."
    if fix:
        message += f" {fix}"
    return UnsupportedStrategyError(message)
