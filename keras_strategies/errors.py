"""Errors raised by keras-strategies, all under one base class.

```
KerasStrategiesError
├── StrategyError            (also a ValueError): bad input -- device, batch size, model
│   └── ClusterError         the environment's cluster description is wrong
│       └── LaunchError      the launcher was asked for something it cannot start
├── UnsupportedStrategyError (also a RuntimeError): this backend or machine cannot run it
└── WorkerError              (also a RuntimeError): a peer process died, hung or was unreachable
```

`except keras_strategies.KerasStrategiesError` catches every one of them.
"""


class KerasStrategiesError(Exception):
    """The base class of every error this package raises."""


class StrategyError(KerasStrategiesError, ValueError):
    """A strategy was given something it cannot work with (bad device, batch...)."""


class ClusterError(StrategyError):
    """The environment's cluster description is incomplete or contradicts itself.

    The message names the variable and says what to change.
    """


class LaunchError(ClusterError):
    """The launcher was asked for something it cannot start (bad options, busy port)."""


class UnsupportedStrategyError(KerasStrategiesError, RuntimeError):
    """A strategy cannot run on this backend or machine.

    The message always names the strategy, the backend and what is missing.
    """


class WorkerError(KerasStrategiesError, RuntimeError):
    """A peer worker died, hung or could not be reached.

    Raised on every surviving worker within the strategy's `timeout`. Where the
    engine waits for a hung peer inside native code that no Python exception
    can interrupt (JAX's gloo collectives), the process cannot raise it: it
    prints this error's text to stderr and exits with code 75
    (`WORKER_LOST_EXIT_CODE`) instead, which `except WorkerError` cannot catch.
    """


WORKER_LOST_EXIT_CODE = 75  # EX_TEMPFAIL: the launcher may restart the job
PREEMPTED_EXIT_CODE = 75
"""The exit code of every process of a job stopped by SIGTERM after writing its
`BackupAndRestore` backup: run the job again and it resumes at the step it
stopped at. The same value as a lost peer's (75, `EX_TEMPFAIL`): both mean
"temporary failure, run me again"; `keras-strategies launch --max-restarts N`
restarts after it."""


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
