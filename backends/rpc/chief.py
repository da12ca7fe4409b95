"""The chief's coordinator: gives updates to workers, one in flight each,
and collects their reports.

A worker that does not answer (it died: its call fails at once; it hung:
after `timeout`) is given up: its update goes back to the queue for another
worker, and it is removed from the group so that, restarted with the same
role, it can join again (`register` then adds it back). A parameter server
that fails ends the job: every process gets a `WorkerError` naming it.
"""

import collections
import queue
import threading
import time

import torch.distributed.rpc as rpc

from keras_strategies.backends.rpc import group, worker
from keras_strategies.errors import StrategyError, WorkerError

_coordinator = [None]  # this process's Coordinator (the chief's)


def register(name, rank, signature):
    """Called by a worker entering its fit: it is ready for updates."""
    return _coordinator[0].register(name, rank, signature)


def _mismatch(name, theirs, ours):
    """Why worker `name` cannot compute the chief's updates."""
    what = " and ".join(key for key in ("model", "input") if theirs[key] != ours[key])
    return (f"ParameterServer: {name} computes with another {what} than this fit of the chief. A worker trains "
            f"the model and input its own script passed to its fit() (the first one), for the whole job: run one "
            f"model and one training input per job, the same on every process (validation data, callbacks and "
            f"optimizer settings may change between the chief's fits).")


class Coordinator:
    """Dispatch of updates to the workers.

    Args:
        implementation: the chief's ParameterServer implementation.
    """

    def __init__(self, implementation):
        self.implementation = implementation
        self.timeout = implementation.timeout
        self.lock = threading.Lock()
        self.ranks = {}  # worker name -> rank of its live incarnation
        self.signature = None  # what the workers' models and inputs must be (`_signature`)
        self.signatures = {}  # worker name -> its signature
        self.fit_index = 0  # the chief's fits so far: a worker reads a new pass of its input for each
        self.idle = collections.deque()  # ready workers without an update
        self.busy = {}  # worker name -> step id in flight
        self.pending = collections.deque()  # step ids not yet given out
        self.reports = queue.Queue()  # (worker, step id, future) as calls complete
        self.done = {}  # step id -> StepResult, not yet collected
        self.lost = []  # (name, reason) of workers given up
        self.outstanding = set()  # step ids scheduled and not reported
        self.health = threading.Thread(target=self._watch_idle, daemon=True, name="keras-strategies-ps-health")
        self.health.start()

    # -- workers joining and leaving -------------------------------------------
    def register(self, name, rank, signature):
        with self.lock:
            if self.signature is not None and signature != self.signature:
                return _mismatch(name, signature, self.signature)
            self.ranks[name] = rank
            self.signatures[name] = signature
            if name not in self.idle and name not in self.busy:
                self.idle.append(name)
        self.reports.put((None, None, None))  # wakes the dispatcher
        return None

    def expect(self, signature):
        """The model and input every worker's must match (the chief's, at
        each fit); a `StrategyError` when a worker that joined already
        computes with another."""
        with self.lock:
            self.signature = signature
            self.fit_index += 1
            wrong = [(name, theirs) for name, theirs in self.signatures.items()
                     if name in self.ranks and theirs != signature]
        if wrong:
            raise StrategyError(_mismatch(wrong[0][0], wrong[0][1], signature))

    def _give_up(self, name, reason):
        with self.lock:
            rank = self.ranks.pop(name, None)
            if name in self.idle:
                self.idle.remove(name)
            step = self.busy.pop(name, None)
            members = [n for n in self.ranks] + group.server_names(self.implementation.cluster)
        if step is not None:
            self.pending.appendleft(step)  # another worker runs it
        self.lost.append((name, reason))
        if rank is not None:
            group.evict(name, rank, members, timeout=5.0)

    def _watch_idle(self):
        """Notices a worker that died while it had nothing to do."""
        while True:
            time.sleep(2.0)
            with self.lock:
                idle = list(self.idle)
            for name in idle:
                if not group.alive(name, timeout=5.0):
                    self.reports.put((name, None, "it does not answer"))

    # -- updates ---------------------------------------------------------------
    def schedule(self, step_id):
        self.outstanding.add(step_id)
        self.pending.append(step_id)
        self._dispatch()

    def _dispatch(self):
        while True:
            with self.lock:
                if not self.pending or not self.idle:
                    return
                name = self.idle.popleft()
                step = self.pending.popleft()
                self.busy[name] = step
            call = rpc.rpc_async(name, worker.run_step, args=(step, self.fit_index), timeout=self.timeout)
            call.add_done_callback(lambda done, name=name, step=step: self.reports.put((name, step, done)))

    def results(self, wait_for=None):
        """Reports of applied updates; waits until `wait_for` (or every
        scheduled update) is done."""
        from keras_strategies.implementation.parameter_server import StepResult

        def finished():
            return not self.outstanding if wait_for is None else wait_for not in self.outstanding

        deadline = time.monotonic() + self.timeout
        while not finished():
            self._handle(self._next_report(deadline))
            self._dispatch()
        collected = [StepResult(**self.done.pop(step)) for step in sorted(self.done)]
        return collected

    def _next_report(self, deadline):
        while True:
            with self.lock:
                stuck = not self.idle and not self.busy and self.pending
            remaining = deadline - time.monotonic()
            if remaining <= 0 and stuck:
                lost = "; ".join(f"{n}: {r}" for n, r in self.lost[-3:]) or "none joined"
                raise WorkerError(
                    f"ParameterServer on the {self.implementation.backend} backend: no worker took "
                    f"the remaining {len(self.pending)} update(s) within {self.timeout:.0f}s "
                    f"(workers lost: {lost}). Start the workers (the same script, their roles)."
                )
            try:
                return self.reports.get(timeout=max(0.05, min(1.0, remaining)))
            except queue.Empty:
                continue

    def _handle(self, report):
        name, step, done = report
        if name is None:
            return  # a registration: dispatch
        if step is None:  # the health check: an idle worker died
            self._give_up(name, done)
            return
        try:
            answer = done.value()
        except Exception as error:  # noqa: BLE001 - the worker died or hung
            self._give_up(name, str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
            return
        if "error" in answer:
            self._failed(name, answer)
        with self.lock:
            self.busy.pop(name, None)
            if name in self.ranks:
                self.idle.append(name)
        self.outstanding.discard(step)
        answer["metric_state"] = [self.implementation.from_wire(v) for v in answer["metric_state"]]
        self.done[step] = answer

    def _failed(self, name, answer):
        b = self.implementation
        if answer["server"] is not None:
            raise WorkerError(
                f"ParameterServer on the {b.backend} backend: parameter server "
                f"{answer['server'][2:]} ({answer['server']}) was lost: {name} could not reach it "
                f"({answer['error']}). Its variables are gone; rerun the job (with BackupAndRestore "
                "it resumes from the last backup)."
            )
        raise RuntimeError(f"ParameterServer: the update on {name} failed: {answer['error']}")
