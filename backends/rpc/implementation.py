"""ParameterServer over `torch.distributed.rpc`: what the PyTorch and JAX
implementations share.

Every process joins the job's RPC group when it creates the strategy. A
parameter server then serves inside the constructor until the chief is done,
and exits. A worker returns, builds its model like every process of the job
(the same script) and serves inside its `fit`, then exits: nothing after its
`fit` runs, so it writes none of the user's files. The chief runs the fit
loop of `keras_strategies.implementation.parameter_server`, and at its exit
tells every other process that the job is done.

A subclass adds its backend's `from_wire`, `compute` (one update's gradients
from the model's own train step) and `apply` (a server's optimizer step).
"""

import abc
import atexit
import os

from keras_strategies.backends.rpc import chief, group, server
from keras_strategies.backends.rpc.worker import Worker, synchronised
from keras_strategies.errors import StrategyError, WorkerError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.multi_process import own_coordinator
from keras_strategies.implementation.parameter_server import (
    ParameterServerImplementation,
    PeerWatch,
    describe_error,
    first_batch,
    fit_plan,
    input_fingerprint,
    slow_worker_delay,
    wait_until,
    worker_batches,
)

_watch = [None]  # this process's PeerWatch (workers and parameter servers)


def finish(reason):
    """Called by the chief on every other process: the job is over (`reason`
    `None`: it finished; else why it ended)."""
    _watch[0].done(reason)
    return True


def _signature(model, plan):
    """What a worker's fit must share with the chief's: the model (its layers,
    dtype policies and variables) and the input (`input_fingerprint`)."""
    layers = [(type(layer).__name__, layer.dtype_policy.name) for layer in model._flatten_layers(include_self=False)]
    return {"model": (layers, [(tuple(v.shape), str(v.dtype)) for v in synchronised(model)]),
            "input": input_fingerprint(plan)}


class RpcParameterServer(ParameterServerImplementation):
    """ParameterServer with `torch.distributed.rpc` as its engine."""

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        self._pulled = None  # the servers' versions at the chief's last pull
        coordinator = own_coordinator(cluster)
        try:
            self.member, self.rank = group.join(cluster, coordinator, timeout)
        except Exception as error:  # noqa: BLE001 - re-raised with context
            raise self.join_error(error) from error
        self._finished = False
        if self.role == "chief":
            self.coordinator = chief._coordinator[0] = chief.Coordinator(self)
            atexit.register(self.finish_at_exit)
            return
        self.watch = _watch[0] = PeerWatch(self, lambda: group.alive("chief", timeout=min(10.0, timeout)))
        self.watch.start()
        if self.role == "ps":
            server._server[0] = server.VariableServer(self)
            self.serve_in_background(self.watch)

    # -- what the backend adds -----------------------------------------------
    @abc.abstractmethod
    def from_wire(self, tensor):
        """A received torch tensor as this backend's value."""

    @abc.abstractmethod
    def compute(self, model, batch, values):
        """One update: the model's own train step on `batch` against `values`
        (of `synchronised(model)`), with the optimizer's apply captured.

        Returns:
            `(gradients, updated, metric_state)`: one gradient per trainable
            variable, the new values of the other synchronised variables, and
            the values of the model's metric variables for this batch.
        """

    @abc.abstractmethod
    def apply(self, optimizer, gradients, variables):
        """A parameter server's optimizer step."""

    def to_batch(self, batch):
        """A batch of numpy arrays as the model's train step takes it."""
        return batch

    # -- chief -----------------------------------------------------------------
    def prepare_fit(self, model, plan):
        model._symbolic_build(data_batch=first_batch(plan.x, plan.y, plan.sample_weight, plan.batch_size))
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        self.coordinator.expect(_signature(model, plan))

    def start_fit(self, model):
        servers = group.server_names(self.cluster)
        wait_until(lambda: all(group.alive(name, 5.0) for name in servers), self.timeout,
                   "every parameter server joining")
        self._set_up_servers(model, servers)
        # every worker, as TensorFlow's coordinator waits for every task;
        # after a grace period, those that came (at least one)
        everyone = len(group.worker_names(self.cluster))
        try:
            wait_until(lambda: len(self.coordinator.ranks) >= everyone, min(self.timeout, 120.0),
                       "every worker entering its fit")
        except TimeoutError:
            wait_until(lambda: self.coordinator.ranks, self.timeout, "a worker entering its fit")

    def _set_up_servers(self, model, servers):
        import keras

        variables = synchronised(model)
        self._pulled = None
        config = keras.optimizers.serialize(model.optimizer)
        optimizer_values = {v.name: group.to_wire(v.value) for v in model.optimizer.variables}
        shares = [[(i, v.path, v.trainable, group.to_wire(v.value)) for i, v in enumerate(variables)
                   if i % len(servers) == j] for j in range(len(servers))]
        names = self.on_servers(server.setup, [(share, config) for share in shares])
        self.on_servers(server.load, [({n: optimizer_values[n] for n in wanted if n in optimizer_values},)
                                      for wanted in names])

    def on_servers(self, function, arguments=None):
        """`function` run on every parameter server (with `arguments[i]` on
        server i; none when `None`); their answers in server order. A server
        that cannot be reached ends the job with a `WorkerError` naming it."""
        import torch.distributed.rpc as rpc

        names = group.server_names(self.cluster)
        calls, name = [], None
        try:
            for name, args in zip(names, arguments or [()] * len(names)):
                calls.append(rpc.rpc_async(name, function, args=args, timeout=self.timeout))
            answers = []
            for name, call in zip(names, calls):
                answers.append(call.wait())
            return answers
        except Exception as error:  # noqa: BLE001 - re-raised
            if "On WorkerInfo(" in str(error):
                raise  # the server answered with its own exception: it is not lost
            raise self._server_lost(name, error) from error

    def _server_lost(self, name, error):
        lost = WorkerError(
            f"ParameterServer on the {self.backend} backend: parameter server {name[2:]} ({name}) was lost: "
            f"the chief could not reach it ({describe_error(error)}). Its variables are gone; rerun the job "
            "(with BackupAndRestore it resumes from the last backup)."
        )
        self.finish(str(lost))
        return lost

    def push_settings(self, model):
        settings = {v.name: group.to_wire(v.value) for v in model.optimizer.variables
                    if len(v.shape) == 0 and v.name not in ("iteration", "iterations")}
        self.on_servers(server.load, [(settings,)] * self.num_ps)

    def schedule(self, step_id):
        self.coordinator.schedule(step_id)

    def results(self, wait_for=None):
        try:
            return self.coordinator.results(wait_for)
        except WorkerError as error:
            self.finish(str(error))
            raise

    def pull(self, model):
        variables = synchronised(model)
        states = self.on_servers(server.state)
        versions = [version for _, _, version in states]
        if versions == self._pulled:
            return  # nothing applied since: the chief's values stand (after fit, `use_ema`'s averages)
        self._pulled = versions
        by_name = {v.name: v for v in model.optimizer.variables} if model.optimizer else {}
        for values, optimizer_values, _ in states:
            for index, value in values.items():
                variables[index].assign(self.from_wire(value))
            for name, value in optimizer_values.items():
                if name in by_name:
                    by_name[name].assign(self.from_wire(value))

    def updates_applied(self):
        """The updates every parameter server has applied."""
        return min(self.on_servers(server.updates))

    def variables_by_server(self, model):
        return self.on_servers(server.holdings)

    def finish(self, reason=None):
        """Chief: tells every other process the job is over, once, and leaves."""
        import torch.distributed.rpc as rpc

        if self._finished:
            return
        self._finished = True
        peers = group.worker_names(self.cluster) + group.server_names(self.cluster)
        calls = []
        for name in peers:
            try:
                calls.append(rpc.rpc_async(name, finish, args=(reason,), timeout=2.0))
            except Exception:  # noqa: BLE001 - a peer never joined or is gone
                pass
        for call in calls:
            try:
                call.wait()
            except Exception:  # noqa: BLE001 - a peer that exits at once drops its answer
                pass
        group.leave()

    # -- worker ----------------------------------------------------------------
    def serve_worker(self, model, method, arguments):
        import torch.distributed.rpc as rpc

        if method != "fit":
            raise StrategyError(
                f"ParameterServer: a worker computes updates inside its fit(); this worker called "
                f"{method}() first. Run evaluate()/predict() on the chief (`if strategy.is_chief:`)."
            )
        seed = data_lib.fit_seed(method, arguments)  # new orders each fit, as Keras's (each worker its own)
        model._symbolic_build(data_batch=next(worker_batches(arguments, self.worker_index, seed)))
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

        def batches():
            return map(self.to_batch, worker_batches(arguments, self.worker_index, seed))

        signature = _signature(model, fit_plan(arguments, self))
        try:
            refusal = rpc.rpc_sync("chief", chief.register, args=(self.member, self.rank, signature),
                                   timeout=self.timeout)
        except Exception:  # noqa: BLE001 - the chief finished (or died) before this worker came
            self.watch.finished.wait(timeout=10.0)
            refusal = None if self.watch.finished.is_set() else "the chief does not answer"
        if refusal:
            self.watch.done(refusal)
        elif not self.watch.finished.is_set():
            Worker(self, model, batches, slow_worker_delay(os.environ, self.worker_index)).serve(self.watch)
        self.leave()
        self.watch.exit()

    def leave(self):
        group.leave()
