"""PyTorch ParameterServer: `torch.distributed.rpc` (see `backends/rpc`).

A worker's update: the model's own Keras train step with the pulled values
assigned to its variables and `optimizer.apply` captured, so the gradients
are those of Keras's loss (regularisers, a custom train_step's own gradient
code included). A parameter server applies them with the model's own Keras
optimizer.
"""

import keras
import torch

from keras_strategies.backends.rpc.implementation import RpcParameterServer
from keras_strategies.backends.rpc.worker import synchronised
from keras_strategies.backends.torch.base import TorchImplementation
from keras_strategies.patches import overriding


class TorchParameterServer(RpcParameterServer, TorchImplementation):
    """ParameterServer on PyTorch."""

    def from_wire(self, tensor):
        return tensor

    def to_batch(self, batch):
        return keras.tree.map_structure(lambda a: None if a is None else torch.as_tensor(a), batch)

    def compute(self, model, batch, values):
        variables = synchronised(model)
        with torch.no_grad():
            for variable, value in zip(variables, values):
                variable.assign(value)
        model.reset_metrics()
        captured = []

        def capture(gradients, trainable_variables=None):
            captured.append([torch.zeros_like(v.value) if g is None else g.detach().clone()
                             for g, v in zip(gradients, trainable_variables or model.trainable_variables)])

        with overriding(model.optimizer, "apply", capture, "ps-capture-gradients"):
            model.train_step(batch)
        trainable = len(model.trainable_variables)
        return (captured[-1], [v.value for v in variables[trainable:]],
                [v.value for v in model.metrics_variables])

    def apply(self, optimizer, gradients, variables):
        with torch.no_grad():
            optimizer.apply(gradients, variables)


IMPLEMENTATIONS = {"ParameterServer": TorchParameterServer}
