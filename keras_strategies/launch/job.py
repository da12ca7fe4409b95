"""Supervising this machine's rank processes: start, prefix their output,
watch, stop every one when one fails or on a signal, reap.

This module imports no backend.
"""

import os
import signal
import subprocess
import sys
import threading
import time

from keras_strategies.errors import LaunchError

GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL when stopping ranks
TIMEOUT_EXIT_CODE = 124  # as timeout(1)
_POLL_SECONDS = 0.05
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


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
    return f"exited with code {code}", code


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

    def run(self, timeout):
        previous = self._install_handlers()
        try:
            self._start()
            return self._watch(timeout)
        finally:
            try:
                self._stop()
            finally:
                self._restore_handlers(previous)

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
                signum = self.signals[0]
                say(f"got {signal.Signals(signum).name}; stopping all ranks.")
                return 128 + signum
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
                return exit_code
            done = [c == 0 or r in self.lost for r, c in zip(self.ranks, codes)]
            if len(self.procs) == len(self.ranks) and all(done):
                return 0
            if deadline is not None and time.monotonic() >= deadline:
                say(
                    f"timed out after {timeout:g} s (--timeout); stopping all "
                    f"ranks and exiting with {TIMEOUT_EXIT_CODE}."
                )
                return TIMEOUT_EXIT_CODE
            time.sleep(_POLL_SECONDS)

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

    def _stop(self):
        self._signal_groups(signal.SIGTERM)
        stop_by = time.monotonic() + GRACE_SECONDS
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


