"""JAX ParameterServer: `torch.distributed.rpc` as the engine (see
`backends/rpc`), with numpy payloads sent as torch tensors.

JAX has no asynchronous parameter-server machinery of its own: its
distributed runtime (`jax.distributed`) runs SPMD programs in lock step.
`torch.distributed.rpc` gives every role its own process, asynchronous calls
and TensorPipe transport, the model the launcher and `TF_CONFIG` describe;
measured on this project's benchmark it applies updates at the rate the JAX
step computes them (docs/benchmarks). It needs torch:
`pip install keras-strategies[parameter-server]`.

A worker's update: the model's own Keras train step, jitted, with
`optimizer.stateless_apply` captured so that it returns the gradients; a
parameter server applies them with the jitted `stateless_apply` of the
model's own Keras optimizer.
"""

import jax
import numpy as np

from keras_strategies.backends.jax.base import JaxImplementation
from keras_strategies.patches import overriding

try:
    from keras_strategies.backends.rpc.implementation import RpcParameterServer
    from keras_strategies.backends.rpc.worker import synchronised
except ImportError as error:  # torch is missing
    _MISSING = error
    RpcParameterServer = object
else:
    _MISSING = None


class JaxParameterServer(RpcParameterServer, JaxImplementation):
    """ParameterServer on JAX."""

    @classmethod
    def create(cls, strategy, devices, **options):
        if _MISSING is not None:
            from keras_strategies.errors import unsupported

            raise unsupported(
                "ParameterServer", "jax",
                f"its engine, torch.distributed.rpc, cannot be imported ({_MISSING})",
                "Install it with `pip install keras-strategies[parameter-server]` (or any torch>=2.9).",
            )
        return cls(strategy, devices, **options)

    def make_distribution(self):
        return None

    def attach(self, model):
        pass

    def detach(self, model):
        pass

    def scope(self):
        import contextlib

        return contextlib.nullcontext()

    def from_wire(self, tensor):
        return tensor.numpy()

    def _step(self, model):
        if getattr(self, "_jitted", (None,))[0] is not model:
            optimizer = model.optimizer

            def step(state, data):
                captured = []

                def capture(optimizer_variables, gradients, trainable_variables):
                    captured.append(gradients)
                    return trainable_variables, optimizer_variables

                with overriding(optimizer, "stateless_apply", capture, "ps-capture-gradients"):
                    _, new_state = model.train_step(state, data)
                return captured[-1], new_state[1], new_state[3]

            self._jitted = (model, jax.jit(step))
        return self._jitted[1]

    def compute(self, model, batch, values):
        trainable = len(model.trainable_variables)
        synced = {id(v): value for v, value in zip(synchronised(model)[trainable:], values[trainable:])}
        non_trainable = [synced.get(id(v), v.value) for v in model.non_trainable_variables]
        metrics = [np.zeros(v.shape, v.dtype) for v in model.metrics_variables]
        state = (values[:trainable], non_trainable, [v.value for v in model.optimizer.variables], metrics)
        gradients, new_non_trainable, metric_state = self._step(model)(state, batch)
        updated = []
        for variable, value in zip(model.non_trainable_variables, new_non_trainable):
            if id(variable) in synced:
                updated.append(value)
            else:
                variable.assign(value)  # this worker's own (random generators' states)
        return gradients, updated, metric_state

    def apply(self, optimizer, gradients, variables):
        if getattr(self, "_apply", (None,))[0] is not optimizer:
            self._apply = (optimizer, jax.jit(optimizer.stateless_apply))
        new_values, new_optimizer = self._apply[1](
            [v.value for v in optimizer.variables], gradients, [v.value for v in variables])
        for variable, value in zip(variables, new_values):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, new_optimizer):
            variable.assign(value)


IMPLEMENTATIONS = {"ParameterServer": JaxParameterServer}
