"""Helpers shared by the torch strategies."""

import torch

from keras_strategies.backend_base import state_variables
from keras_strategies.devices import parse_device


def torch_device(name):
    kind, index = parse_device(name)
    return torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)


def move_variables(model, device):
    for variable in state_variables(model):
        value = variable._value
        if value is not None and value.device != device:
            value.data = value.data.to(device)  # keeps the Parameter object
