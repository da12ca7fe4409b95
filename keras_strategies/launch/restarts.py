"""Restarting this machine's ranks when one dies, hangs or is preempted: `--max-restarts`.

Each attempt is a whole `launch()`: new environments, and a fresh free port
for the ranks' rendezvous when the launcher picks it (a port left in
`TIME_WAIT` by the last attempt is never reused). With several machines each
launcher restarts its own ranks; the ranks of the other machines lose their
peers, fail (a `WorkerError`, or the watchdog's exit code 75) and are
restarted by their own launcher; the new ranks meet again at `--master`.

This module imports no backend.
"""

import time

from keras_strategies.cluster.spec import split_address
from keras_strategies.errors import LaunchError
from keras_strategies.launch.job import TIMEOUT_EXIT_CODE, last_outcome, say, term_grace
from keras_strategies.launch.ports import port_in_use
from keras_strategies.launch.ranks import launch

# A restart on node 0 waits this long for the --master port: a server without
# SO_REUSEADDR leaves it in TIME_WAIT (60 s on Linux) when it closes first.
PORT_WAIT_SECONDS = 120.0
RESTART_COUNT_VARIABLE = "KERAS_STRATEGIES_RESTART_COUNT"
MAX_RESTARTS_VARIABLE = "KERAS_STRATEGIES_MAX_RESTARTS"
# torchrun's names for the same two numbers: a script written for torchrun reads them unchanged.
_TORCHRUN_VARIABLES = {RESTART_COUNT_VARIABLE: "TORCHELASTIC_RESTART_COUNT",
                       MAX_RESTARTS_VARIABLE: "TORCHELASTIC_MAX_RESTARTS"}


def launch_with_restarts(command, max_restarts=0, timeout=None, env=None, **options):
    """Starts this machine's ranks (as `launch`) and starts them all again,
    up to `max_restarts` times, when one fails.

    A rank fails when it exits non-zero or by a signal (a hung rank's
    watchdog and a preempted rank exit 75). Every rank of this machine is
    then stopped and all start again, those that had exited 0 too (a
    synchronous job needs every rank; `BackupAndRestore` resumes them).
    Nothing restarts after the launcher got SIGINT, SIGTERM or SIGHUP, nor
    after `timeout`. Each rank gets `KERAS_STRATEGIES_RESTART_COUNT` (0, 1,
    ...) and `KERAS_STRATEGIES_MAX_RESTARTS`, and the same as torchrun's
    `TORCHELASTIC_RESTART_COUNT` and `TORCHELASTIC_MAX_RESTARTS`.

    Args:
        command: the full argv of each rank, as for `launch`.
        max_restarts: how many times the ranks may be started again
            (default 0: a failure ends the job, as `launch`).
        timeout: seconds for the whole job, restarts included, after which
            every rank is stopped and 124 returned; `None` waits for ever.
        env: variables to add to (or override in) `os.environ` for the ranks.
        **options: the other arguments of `launch` (`nproc_per_node`,
            `nnodes`, `node_rank`, `master`, `prefix_output`, `num_ps`).

    Returns:
        The exit code: 0 when every rank of the last run exited 0; the last
        failed rank's code when the restarts are used up (128 + N for a
        signal N); 124 on timeout; 75 when the launcher got a stop signal and
        the ranks saved and exited 75 (else 130, 143 or 129).

    Raises:
        LaunchError: bad options (as `launch`), a `max_restarts` that is not
            an integer >= 0, or a bad `KERAS_STRATEGIES_TERM_GRACE`.

    Example:
    ```python
    import sys
    from keras_strategies.launch import launch_with_restarts
    code = launch_with_restarts([sys.executable, "train.py"], max_restarts=3, nproc_per_node=2)
    ```
    """
    _check_max_restarts(max_restarts)
    term_grace()  # a bad KERAS_STRATEGIES_TERM_GRACE fails before anything starts
    deadline = None if timeout is None else time.monotonic() + timeout
    restart = 0
    while True:
        remaining = timeout if deadline is None or not restart else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            say(f"timed out after {timeout:g} s (--timeout, restarts included); exiting with "
                f"{TIMEOUT_EXIT_CODE}.")
            return TIMEOUT_EXIT_CODE
        code = _run(command, restart, max_restarts, remaining, env, options)
        if code is None:
            return 130
        outcome = last_outcome()
        if _finished(code, outcome, restart, max_restarts):
            return code
        restart += 1
        say(restart_message(restart, max_restarts, outcome))


def _run(command, restart, max_restarts, remaining, env, options):
    """One run of every rank of this machine: its exit code (`None` after a
    Ctrl-C between two runs)."""
    try:
        if restart and options.get("master") and options.get("node_rank", 0) == 0:
            wait_for_port(options["master"], min(PORT_WAIT_SECONDS, remaining or PORT_WAIT_SECONDS))
        return launch(command, timeout=remaining, env=attempt_environment(env, restart, max_restarts), **options)
    except KeyboardInterrupt:  # Ctrl-C between two runs (a rank runs only inside launch's handlers)
        say("got SIGINT between two runs, when no rank was running; exiting with 130.")
        return None


def _finished(code, outcome, restart, max_restarts):
    """Whether the job ends with this run (else it is started again)."""
    if outcome is None or outcome.reason != "failed" or max_restarts == 0:
        return True
    if restart == max_restarts:
        say(f"gave up after {max_restarts} restart{'s' if max_restarts > 1 else ''}: the last run "
            f"ended because {outcome.description}; exiting with {code}.")
        return True
    return False


def restart_message(restart, max_restarts, outcome):
    """What the launcher says before restart `restart` (1-based)."""
    message = (f"restart {restart} of {max_restarts}: the last run ended because "
               f"{outcome.description}; starting every rank of this machine again "
               f"({RESTART_COUNT_VARIABLE}={restart}).")
    if outcome.finished:
        verb = "is" if len(outcome.finished) == 1 else "are"
        message += (f" {', '.join(outcome.finished)} had exited 0 and {verb} started again too: a "
                    "synchronous job needs every rank.")
    return message


def wait_for_port(master, seconds):
    """Waits up to `seconds` until nothing on this machine holds `master`'s
    port (the last run's rank 0 may have left it in `TIME_WAIT`).

    Returns:
        `True` once it is free, `False` when it is still held at the end
        (the restart then fails with `launch`'s error for a busy port).
    """
    addr, port = split_address(master, "--master")
    deadline = time.monotonic() + seconds
    if not port_in_use(addr, port):
        return True
    say(f"--master {master}: port {port} is still held (left in TIME_WAIT by the last run, or by a "
        f"process it started); waiting up to {seconds:g} s for it before restarting.")
    while port_in_use(addr, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def attempt_environment(env, restart, max_restarts):
    """`env` plus the restart count and the maximum, under our names and torchrun's."""
    environment = dict(env or {})
    for name, value in ((RESTART_COUNT_VARIABLE, restart), (MAX_RESTARTS_VARIABLE, max_restarts)):
        environment[name] = environment[_TORCHRUN_VARIABLES[name]] = str(value)
    return environment


def _check_max_restarts(max_restarts):
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise LaunchError(
            f"--max-restarts must be an integer >= 0 (how many times the ranks are started again "
            f"after one fails); got {max_restarts!r}."
        )
