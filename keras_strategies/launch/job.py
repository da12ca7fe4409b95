"""Supervising this machine's rank processes: start, prefix their output,
watch, stop every one when one fails or on a signal, reap.

This module imports no backend.
"""

import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple

from keras_strategies.errors import WORKER_LOST_EXIT_CODE, LaunchError

GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL when stopping the others after a failure
TERM_GRACE_VARIABLE = "KERAS_STRATEGIES_TERM_GRACE"
DEFAULT_TERM_GRACE = 60.0  # seconds ranks get to save and exit after a forwarded SIGTERM
PREEMPTED_EXIT_CODE = WORKER_LOST_EXIT_CODE  # 75: preempted (backup written) or lost its peers
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
_POLL_SECONDS = 0.05
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_last_run = threading.local()


def say(message):
    sys.stderr.write(f"keras-strategies launch: {message}\n")
    sys.stderr.flush()


def _describe_exit(code):
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}", 128 - code
    if code == PREEMPTED_EXIT_CODE:
        return (f"exited with code {code} (preempted: it saved a backup after SIGTERM, or it "
                "lost its peers)"), code
    return f"exited with code {code}", code


def term_grace(environ=None):
    """Seconds the ranks get to save and exit after the launcher forwards
    SIGTERM to them: `KERAS_STRATEGIES_TERM_GRACE`, default 60.

    Args:
        environ: where to read the variable; `os.environ` when `None`.

    Returns:
        A number of seconds >= 0 (float).

    Raises:
        LaunchError: the variable is set but is not a number >= 0.

    Example:
    >>> term_grace({"KERAS_STRATEGIES_TERM_GRACE": "30"})
    30.0
    """
    value = (os.environ if environ is None else environ).get(TERM_GRACE_VARIABLE, "").strip()
    if not value:
        return DEFAULT_TERM_GRACE
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not (grace >= 0 and math.isfinite(grace)):
        raise LaunchError(
            f"{TERM_GRACE_VARIABLE}={value!r} must be a number of seconds >= 0: how long the ranks "
            f"get to save and exit after SIGTERM before they are killed (default {DEFAULT_TERM_GRACE:g})."
        )
    return grace


class Outcome(NamedTuple):
    """How one run of a `Job` ended.

    `reason` is `"done"` (every rank exited 0), `"failed"` (a rank failed),
    `"signal"` (the launcher got SIGINT, SIGTERM or SIGHUP) or `"timeout"`;
    `code` the launcher's exit code for it; `description` says which rank
    and how, in words; `finished` the labels of the ranks that had exited 0.
    """

    reason: str
    code: int
    description: str = ""
    finished: tuple = ()


def last_outcome():
    """The `Outcome` of the last `Job.run` in this thread (`None` before any)."""
    return getattr(_last_run, "outcome", None)


class Job:
    """The ranks of this machine: start, watch, stop, reap."""

    def __init__(self, command, environments, prefix_output, labels=None, expendable=()):
        self.command = command
        self.environments = environments
        self.prefix_output = prefix_output
        self.ranks = [int(e["RANK"]) for e in environments]
        # how each rank's output lines are prefixed ("rank 3", "worker 1", "ps 0")
        self.labels = labels or [f"rank {rank}" for rank in self.ranks]
        # ranks whose failure the job survives (ParameterServer workers)
        self.expendable = set(expendable)
        self.lost = set()
        self.procs = []
        self.readers = []
        self.write_lock = threading.Lock()
        self.signals = []  # signal numbers received, in order
        self.term_grace = term_grace()
        self.outcome = None

    def run(self, timeout):
        """Starts the ranks, waits for them, stops them all; returns the exit
        code (`self.outcome.code`; `last_outcome()` gives the whole `Outcome`)."""
        _last_run.outcome = None
        previous = self._install_handlers()
        try:
            self._start()
            self.outcome = self._watch(timeout)
        finally:
            try:
                self._stop(self._stop_grace())
            finally:
                self._restore_handlers(previous)
        if self.outcome.reason == "signal":
            self.outcome = self._after_forwarded_signal()
        _last_run.outcome = self.outcome
        return self.outcome.code

    def _stop_grace(self):
        """The launcher was told to stop, or a rank was preempted (the others
        are likely writing their backup too): they get the long grace."""
        if self.outcome is not None and (
            self.outcome.reason == "signal"
            or (self.outcome.reason == "failed" and self.outcome.code == PREEMPTED_EXIT_CODE)
        ):
            return self.term_grace
        return GRACE_SECONDS

    def _after_forwarded_signal(self):
        """Exit 75 when the ranks saved and exited 75 after the forwarded
        SIGTERM (a supervisor may run the job again), else 128 + N."""
        codes = [proc.returncode for proc in self.procs]
        if PREEMPTED_EXIT_CODE in codes and all(c in (0, PREEMPTED_EXIT_CODE) for c in codes):
            say(f"every rank exited with 0 or {PREEMPTED_EXIT_CODE} (preempted, its backup written); "
                f"exiting with {PREEMPTED_EXIT_CODE}: run the job again to resume. No restart: the "
                "launcher itself was told to stop.")
            return self.outcome._replace(code=PREEMPTED_EXIT_CODE)
        return self.outcome

    # -- signals: the handler only records; the loops act on it.

    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def _install_handlers(self):
        previous = {}
        if threading.current_thread() is not threading.main_thread():
            return previous
        for name in _STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, self._on_signal)
        return previous

    def _restore_handlers(self, previous):
        for number, handler in previous.items():
            signal.signal(number, handler)

    # -- start and watch.

    def _start(self):
        pipe = subprocess.PIPE if self.prefix_output else None
        for rank, environment in zip(self.ranks, self.environments):
            if self.signals:
                return
            try:
                proc = subprocess.Popen(
                    self.command,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=pipe,
                    stderr=pipe,
                    start_new_session=True,  # its own process group, to stop it whole
                )
            except OSError as error:
                raise LaunchError(
                    f"cannot start rank {rank} with {self.command!r}: {error}."
                ) from None
            self.procs.append(proc)
            if self.prefix_output:
                for stream, target in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                    reader = threading.Thread(
                        target=self._copy_lines,
                        args=(stream, target, f"[{self.labels[len(self.procs) - 1]}] "),
                        daemon=True,
                    )
                    reader.start()
                    self.readers.append(reader)

    def _copy_lines(self, stream, target, prefix):
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if not line.endswith("\n"):
                    line += "\n"
                with self.write_lock:
                    out = getattr(sys, target)
                    out.write(prefix + line)
                    out.flush()

    def _watch(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.signals:
                return self._on_stop_signal(self.signals[0])
            codes = [proc.poll() for proc in self.procs]
            for rank, label, proc, code in zip(self.ranks, self.labels, self.procs, codes):
                if code in (None, 0) or rank in self.lost:
                    continue
                what, exit_code = _describe_exit(code)
                if rank in self.expendable:
                    self.lost.add(rank)
                    say(f"{label} (rank {rank}, pid {proc.pid}) {what}; the job goes on without it "
                        f"(its last output is above, prefixed with [{label}]).")
                    continue
                say(
                    f"{label} (pid {proc.pid}) {what}; stopping the other "
                    "ranks. Its last output is above, prefixed with "
                    f"[{label}]."
                )
                return self._outcome("failed", exit_code, f"{label} (pid {proc.pid}) {what}", codes)
            done = [c == 0 or r in self.lost for r, c in zip(self.ranks, codes)]
            if len(self.procs) == len(self.ranks) and all(done):
                return self._outcome("done", 0, "every rank exited with code 0", codes)
            if deadline is not None and time.monotonic() >= deadline:
                say(
                    f"timed out after {round(timeout, 1):g} s (--timeout); stopping all "
                    f"ranks and exiting with {TIMEOUT_EXIT_CODE}."
                )
                return self._outcome("timeout", TIMEOUT_EXIT_CODE, "--timeout", codes)
            time.sleep(_POLL_SECONDS)

    def _on_stop_signal(self, signum):
        name = signal.Signals(signum).name
        say(f"got {name}; sending SIGTERM to every rank and waiting up to {self.term_grace:g} s "
            f"({TERM_GRACE_VARIABLE}) for them to save and exit.")
        codes = [proc.poll() for proc in self.procs]
        return self._outcome("signal", 128 + signum, f"the launcher got {name}", codes)

    def _outcome(self, reason, code, description, codes):
        finished = tuple(label for label, c in zip(self.labels, codes) if c == 0)
        return Outcome(reason, code, description, finished)

    # -- stop: SIGTERM to every rank's process group, SIGKILL after a grace.

    def _group_alive(self, proc):
        proc.poll()  # reap the leader first: a zombie still counts as a member
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_groups(self, signum):
        for proc in self.procs:
            if proc.poll() is None or self._group_alive(proc):
                try:
                    os.killpg(proc.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass

    def _stop(self, grace):
        self._signal_groups(signal.SIGTERM)
        stop_by = time.monotonic() + grace
        signals_before = len(self.signals)
        while any(self._group_alive(p) for p in self.procs):
            # A further Ctrl-C while stopping skips the grace period.
            if time.monotonic() >= stop_by or len(self.signals) > signals_before:
                break
            time.sleep(_POLL_SECONDS)
        self._signal_groups(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # unkillable (D state): report it
                say(f"rank process {proc.pid} did not exit after SIGKILL.")
        for reader in self.readers:
            reader.join(timeout=2)


