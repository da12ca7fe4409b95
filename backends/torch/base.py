"""What the PyTorch implementations share: Keras's own device placement."""

import importlib.util

import numpy as np
import torch
from keras.src.backend.torch import core as torch_core

from keras_strategies.devices import parse_device
from keras_strategies.implementation.base import Implementation
from keras_strategies.implementation.model_state import state_variables


def torch_device(name):
    """The `torch.device` of a Keras device name."""
    kind, index = parse_device(name)
    return torch.device("cpu") if kind == "cpu" else torch.device("cuda", index)


# numpy dtypes that Keras's torch `convert_to_tensor` keeps as they are
# (it widens uint32 to int64 and converts bfloat16 through float32).
_SHARED_DTYPES = frozenset(np.dtype(d) for d in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64", "complex64", "complex128"))


def host_tensor(array):
    """A batch's numpy array as a CPU tensor sharing its memory.

    Keras's torch `convert_to_tensor` copies every numpy batch (`np.array`)
    before `torch.as_tensor`: for the benchmark MLP's 128 x 784 batch about
    35 us of a 5 ms step on one thread. A tensor passes through it as it is
    (moved to the device if Keras's is not the CPU, as before). Arrays that
    are read-only, have negative strides or a dtype Keras converts stay
    numpy arrays.

    Args:
        array: a numpy array (one batch's slice or rows of an input array).

    Returns:
        A `torch.Tensor` on the CPU, or `array` itself.
    """
    if (isinstance(array, np.ndarray) and array.flags.writeable and array.dtype in _SHARED_DTYPES
            and min(array.strides, default=0) >= 0):  # torch takes no negative strides
        return torch.from_numpy(array)
    return array


def computes_on_host():
    """Whether PyTorch computes on this machine's CPU: no CUDA device, and no
    `torch_xla` installed. For `keras_strategies.implementation.host_memory`
    (activations freed and allocated again each step). Initialises no CUDA.
    """
    return torch.cuda.device_count() == 0 and importlib.util.find_spec("torch_xla") is None


def accelerators():
    """This machine's GPUs, else its TPU cores, as Keras names (`"gpu:1"`,
    `"tpu:0"`); `[]` when it has neither. For `keras_strategies.auto()`.

    `torch.cuda.device_count()` does not initialise CUDA (a process can still
    fork, and `torch.distributed` start, after it). TPUs are looked for only
    when `torch_xla` is installed, as `TPU()` would look for them.
    """
    gpus = torch.cuda.device_count()
    if gpus:
        return [f"gpu:{i}" for i in range(gpus)]
    if importlib.util.find_spec("torch_xla") is None:
        return []
    from keras_strategies.backends.torch.tpu import find_tpu_devices

    try:
        return [name for name, _ in find_tpu_devices(None)]
    except Exception:  # noqa: BLE001  torch_xla without a usable TPU: none here
        return []


def move_variables(model, device):
    """Moves every variable of the model (keeping each Parameter object)."""
    for variable in state_variables(model):
        value = variable._value
        if value is not None and value.device != device:
            value.data = value.data.to(device)


class TorchImplementation(Implementation):
    """The model on one torch device (`native`), under Keras's device scope."""

    backend = "torch"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        self.native = torch_device(self.devices[0])

    def default_devices(self):
        """The devices used when none are asked for: the first GPU, else the CPU."""
        return ["gpu:0" if torch.cuda.device_count() else "cpu:0"]

    def available_devices(self, kind, requested):
        if kind == "cpu":
            return ["cpu:0"], "PyTorch has one CPU device, 'cpu:0'."
        return ([f"gpu:{i}" for i in range(torch.cuda.device_count())] if kind == "gpu" else []), ""

    def scope(self):
        return torch_core.device_scope(str(self.native))

    def attach(self, model):
        move_variables(model, self.native)

    def detach(self, model):
        move_variables(model, torch.device(torch_core.get_device()))
