"""Save on SIGTERM: what schedulers, Kubernetes and spot-VM reclaimers send
before they kill a process.

While a `fit` with a `BackupAndRestore` runs under one of this package's
strategies, SIGTERM only raises a flag. The workers agree on it (one scalar
collective every `resume.AGREE_EVERY` steps, after every step in a single
process; any worker's flag counts), so every worker stops after the same
step: each finishes its steps up to there, the chief writes the backup, and
every process exits with `PREEMPTED_EXIT_CODE` (75, "temporary failure, run
me again"). TensorFlow's
`PreemptionCheckpointHandler` agrees the same way (a step at which every
worker saves), through the coordination service.
"""

import contextlib
import os
import signal
import threading

from keras_strategies.errors import PREEMPTED_EXIT_CODE

__all__ = ["PREEMPTED_EXIT_CODE", "SigtermFlag"]


class SigtermFlag:
    """Turns SIGTERM into a flag while entered (in the main thread only:
    Python delivers signals there; elsewhere nothing changes).

    On exit the previous handler is put back. A SIGTERM that arrived but was
    not acted on (`handled` left False: the run ended first, or failed) is
    delivered again to that handler, so the process ends as it would have.

    Example:
    ```python
    with SigtermFlag() as flag:
        for step in steps:
            train(step)
            if flag.received:
                save(); flag.handled = True; raise SystemExit(PREEMPTED_EXIT_CODE)
    ```
    """

    def __init__(self):
        self.received = False
        self.handled = False
        self._previous = None

    def _handler(self, signum, frame):
        self.received = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc_info):
        if self._previous is None:
            return False
        signal.signal(signal.SIGTERM, self._previous)
        if self.received and not self.handled:
            with contextlib.suppress(OSError):
                os.kill(os.getpid(), signal.SIGTERM)
        return False


def preempted_exit(where, backup_dir):
    """The `SystemExit` every worker raises after the preemption backup.

    Args:
        where: `"epoch E, step S"`, where training will resume.
        backup_dir: the backup's directory, in words.

    Returns:
        A `SystemExit` with `PREEMPTED_EXIT_CODE` (not an `Exception`: a
        script's `except Exception` does not swallow it).
    """
    import sys

    sys.stderr.write(
        f"keras_strategies: SIGTERM received; every worker finished the step, the backup in "
        f"{backup_dir} resumes at {where}. Exiting with code {PREEMPTED_EXIT_CODE}: run the "
        "job again (keras-strategies launch --max-restarts N does) to continue.\n"
    )
    sys.stderr.flush()
    return SystemExit(PREEMPTED_EXIT_CODE)
