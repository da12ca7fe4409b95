"""Keras's channels_last convolutions and pooling on torch without layout copies.

Keras 3.15's torch backend turns an NHWC input into NCHW for torch with
`permute(...).contiguous()`, a full copy, in `conv`, `max_pool`,
`average_pool` and the adaptive pools; `conv` then copies it back to torch's
`channels_last` memory format, which is the layout the permuted view had in the
first place. Pooling then runs torch's slow NCHW kernel and hands back a
non-contiguous view, so the next elementwise op (and its backward) runs on
mismatched layouts. Asking for `channels_last` memory format instead copies
nothing, and the pooling kernels keep that format, so their output is an
ordinary contiguous NHWC tensor again.

Measured on the benchmark CNN (batch 128, one CPU thread, forward + backward):
76 ms per step through Keras against 26 ms for the same torch.nn model, 192 ms
of every 766 ms in `aten::copy_`; `docs/benchmarks/README.md` has the effect on
training throughput. Upstream Keras made the same change for `conv` (keras
PR 23199) and proposes it for pooling (keras issue 23649, PR 23645).

Forward values are unchanged, bit for bit (the convolution already ran in
`channels_last`; torch's pooling kernels give identical results in either
layout). Gradients agree to float rounding, not bit for bit: a conv bias
gradient sums over the batch in another order when the incoming gradient has
the other layout (3.8e-6 of a sum of 1 600 terms, measured). Like fused Adam
(`fused_adam.py`), it is therefore used only where the gradient all-reduce
already changes the summation order: MultiWorkerMirrored, multi-device Mirrored
and CentralStorage; Default and OneDevice stay Keras's own ops, bit for bit
(`tests/test_torch_layout.py`). `conv_transpose` is left as it is (its kernel
sums in another order in `channels_last`), and so are 1D ops (3D tensors have
no channels_last format).
"""

import types

import torch
from keras.src.backend.torch import nn as torch_nn

from keras_strategies import patches

# The ops whose channels_last path gets the copy-free transpose.
OPS = ("conv", "max_pool", "average_pool", "adaptive_average_pool", "adaptive_max_pool")

_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_PERMUTATIONS = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}


def _transpose_spatial_inputs(inputs, channels_last_memory_format=True):
    """NHWC -> NCHW as a view in torch's channels_last memory format (no copy
    when `inputs` is contiguous). Keras's own helper, for other ranks.
    `channels_last_memory_format` is the argument upstream Keras's helper grew
    (keras PR 23199), accepted so that ops already passing it keep working."""
    memory_format = _MEMORY_FORMATS.get(inputs.ndim)
    if memory_format is None:
        return _ORIGINAL_HELPER(inputs)
    return torch.permute(inputs, _PERMUTATIONS[inputs.ndim]).contiguous(memory_format=memory_format)


_ORIGINAL_HELPER = torch_nn._transpose_spatial_inputs


def copy_free(function):
    """The factory of the `torch-copy-free-layouts` patch: `function` (one of
    `OPS`) with Keras's module globals seen through a namespace whose
    `_transpose_spatial_inputs` is the copy-free one."""
    namespace = dict(vars(torch_nn))
    namespace["_transpose_spatial_inputs"] = _transpose_spatial_inputs
    rebound = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__doc__ = function.__doc__
    rebound.__qualname__ = function.__qualname__
    rebound.__module__ = function.__module__
    rebound.__wrapped__ = function
    return rebound


def copy_free_layouts():
    """While entered, Keras's torch conv and pooling ops skip the layout copies.

    Nested entries are fine (the patch is applied once).

    Example:

    ```python
    with copy_free_layouts():
        model.fit(x, y)
    ```
    """
    return patches.active(("torch-copy-free-layouts",))
