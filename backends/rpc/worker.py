"""A worker: inside its own `fit`, it computes updates for the chief until
the chief is done.

The chief asks for one update at a time (`run_step`, answered with a future
that the worker's main thread completes: Keras's global state is per
thread, so the step runs there, and no RPC thread blocks). For each: read the
servers' current values, run the model's own Keras train step on the
worker's next batch with the optimizer's apply captured, send the gradients
(and the new BatchNormalization statistics) to the servers, and report the
staleness and the batch's metric state. Each worker reads its own pass over
its input (its own shuffle), as TensorFlow's per-worker datasets do.
"""

import queue
import time

import torch
import torch.distributed.rpc as rpc

from keras_strategies.backends.rpc import group, server
from keras_strategies.backends.rpc.group import to_wire

_jobs = queue.Queue()  # (step id, fit index, future) from the chief, for the main thread


@rpc.functions.async_execution
def run_step(step_id, fit_index=0):
    """Called by the chief: queues one update of its `fit_index`-th fit; the
    future holds its report."""
    future = torch.futures.Future()
    _jobs.put((step_id, fit_index, future))
    return future


def synchronised(model):
    """The variables the parameter servers hold, in a fixed order: every
    trainable one, then the float non-trainable ones (BatchNormalization
    statistics; not the random generators' states, which stay per worker)."""
    import keras

    others = [v for v in model.non_trainable_variables
              if keras.backend.is_float_dtype(v.dtype) and "seed_generator" not in v.path]
    return list(model.trainable_variables) + others


def owner(index, servers):
    """The parameter server of variable `index` (round robin)."""
    return index % servers


class Worker:
    """One worker's loop.

    Args:
        backend: the ParameterServer implementation of this process (its
            `compute(model, batch, values)`, `from_wire`, and names).
        model: the worker's own model.
        batches: a callable returning an endless iterator over the worker's
            batches; each fit of the chief reads from a new one, so every
            fit starts at the beginning of a pass, as on one device.
        delay: seconds added to each step (a test-only hook).
    """

    def __init__(self, backend, model, batches, delay=0.0):
        self.backend = backend
        self.model = model
        self.new_batches = batches
        self.batches, self.fit_index = None, None
        self.delay = delay
        self.variables = synchronised(model)
        self.servers = group.server_names(backend.cluster)
        self.timeout = backend.timeout

    def serve(self, watch):
        """Runs updates until the chief is done (`watch.finished`)."""
        while not watch.finished.is_set():
            try:
                step_id, fit_index, future = _jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if fit_index != self.fit_index:
                self.batches, self.fit_index = self.new_batches(), fit_index
            future.set_result(self.step(step_id))

    def step(self, step_id):
        """One update: `{"worker", "staleness", "metric_state"}`, or
        `{"error", "server"}` when it failed (`server`: the parameter server
        that did not answer, `None` for an error of the step itself)."""
        try:
            versions, reads = [], {}
            calls = [rpc.rpc_async(name, server.pull, timeout=self.timeout) for name in self.servers]
            for name, call in zip(self.servers, calls):
                version, values = _answer(name, call)
                versions.append(version)
                reads.update(values)
            if self.delay:
                time.sleep(self.delay)
            values = [self.backend.from_wire(reads[i]) for i in range(len(self.variables))]
            gradients, updated, metric_state = self.backend.compute(self.model, next(self.batches), values)
            staleness = self._push(step_id, versions, gradients, updated)
        except _ServerFailure as failure:
            return {"error": failure.message, "server": failure.name}
        except Exception as error:  # noqa: BLE001 - reported to the chief, which raises it
            return {"error": f"{type(error).__name__}: {error}", "server": None}
        return {"worker": self.backend.worker_index, "staleness": staleness,
                "metric_state": [to_wire(v) for v in metric_state]}

    def _push(self, step_id, versions, gradients, updated):
        trainable, servers = len(gradients), len(self.servers)
        calls = []
        for j, name in enumerate(self.servers):
            grads = {i: to_wire(g) for i, g in enumerate(gradients) if owner(i, servers) == j}
            values = {i: to_wire(updated[i - trainable]) for i in range(trainable, len(self.variables))
                      if owner(i, servers) == j}
            calls.append(rpc.rpc_async(name, server.push, args=(step_id, versions[j], grads, values),
                                       timeout=self.timeout))
        stale = [_answer(name, call) for name, call in zip(self.servers, calls)]
        applied = [s for s in stale if s is not None]
        return max(applied) if applied else 0


class _ServerFailure(Exception):
    def __init__(self, name, error):
        super().__init__(name)
        self.name = name
        self.message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _answer(name, call):
    """The call's result; a `_ServerFailure` naming the server when it failed."""
    try:
        return call.wait()
    except Exception as error:  # noqa: BLE001 - a transport error or a timeout
        raise _ServerFailure(name, error) from error
