"""The loss of the multi-process PyTorch step without Keras's layers of
wrappers around it.

A model compiled with one of Keras's loss functions (a string such as
`"sparse_categorical_crossentropy"` or `"mse"`, the function, or its class
such as `SparseCategoricalCrossentropy(from_logits=True)`; any
`LossFunctionWrapper`) computes its loss in Keras 3.15 through
`Trainer.compute_loss`, `CompileLoss`, `Loss.__call__` and
`reduce_weighted_values`: for a sparse categorical crossentropy about 0.7 ms
of a step on one CPU thread, of which torch's own cross entropy is about
0.1 ms (`docs/benchmarks/README.md`). Here the loss object's function
computes the per-example values from the same converted inputs (what
`LossFunctionWrapper.call` does for one output, without its tree walks), and they are
summed and divided by their count as `reduce_weighted_values` does; the loss
tracker's update is its two in-place additions. The same values, bit for bit
(`tests/test_fused_loss.py`).

Anything else takes Keras's path: sample weights, a mask (the model's or the
loss's, e.g. `ignore_class`), several outputs, another reduction, losses
added by layers (`model.losses`), a `compute_loss` of the user's, a loss class
of the user's, dtypes other than float32.
"""

import numpy as np
import torch
from keras.src.backend import get_keras_mask
from keras.src.backend.torch.core import convert_to_tensor
from keras.src.losses import losses
from keras.src.losses.loss import Loss, squeeze_or_expand_to_same_rank
from keras.src.losses.losses import LossFunctionWrapper
from keras.src.trainers.compile_utils import CompileLoss
from keras.src.trainers.trainer import Trainer

from keras_strategies.backends.torch.metrics import float32_mean_state


def loss_function(compile_loss):
    """`(loss, loss_weight)` when `compile_loss` (a model's `_compile_loss`)
    is one Keras `LossFunctionWrapper` reduced to the batch mean in float32,
    else None."""
    if type(compile_loss) is not CompileLoss or not compile_loss.built or compile_loss.dtype != "float32":
        return None
    if len(compile_loss._flat_losses) != 1:
        return None
    path, loss, weight, _ = compile_loss._flat_losses[0]
    if (path != () or not isinstance(loss, LossFunctionWrapper) or type(loss).call is not LossFunctionWrapper.call
            or type(loss).__call__ is not Loss.__call__ or loss.reduction != "sum_over_batch_size"
            or loss.dtype != "float32"):
        return None
    return loss, weight


def _plain_model(model):
    return type(model).compute_loss is Trainer.compute_loss and type(model)._compute_loss is Trainer._compute_loss


def loss(model, y, y_pred, sample_weight):
    """The training loss of `model` on this batch, as
    `model._compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)`
    computes it, or None where this module does not apply (the caller then
    calls Keras)."""
    if (sample_weight is not None or not isinstance(y, torch.Tensor) or not isinstance(y_pred, torch.Tensor)
            or y_pred.dtype != torch.float32 or get_keras_mask(y_pred) is not None or not _plain_model(model)):
        return None
    spec = loss_function(model._compile_loss)
    if spec is None or model.losses:
        return None
    loss_fn, weight = spec
    # Loss.__call__ converts both to the loss's dtype first, then
    # LossFunctionWrapper.call matches their ranks and calls the function.
    y, y_pred = squeeze_or_expand_to_same_rank(convert_to_tensor(y, dtype="float32"), y_pred)
    values = _sparse_crossentropy_from_logits(loss_fn, y, y_pred)
    if values is None:
        values = loss_fn.fn(y, y_pred, **loss_fn._fn_kwargs)
    if get_keras_mask(values) is not None or values.dtype != torch.float32 or not values.numel():
        return None
    if values.dim():  # reduce_values: the sum over the count of values, the count as a float32
        values = torch.sum(values) / float(np.float32(values.numel()))
    return values if weight is None else values * weight


def _sparse_crossentropy_from_logits(loss_fn, y, y_pred):
    """What `keras.losses.sparse_categorical_crossentropy(y, y_pred,
    from_logits=True)` returns for labels of shape (N,) and logits of shape
    (N, C): Keras's torch backend computes it as torch's per-example cross
    entropy of the labels cast to int64, which is called here without the
    three layers of Keras functions and their checks around it (about 30 us
    of a step on one thread). None for anything else (the caller calls the
    loss's function)."""
    kwargs = loss_fn._fn_kwargs
    if (loss_fn.fn is not losses.sparse_categorical_crossentropy or not kwargs.get("from_logits")
            or kwargs.get("ignore_class") is not None or kwargs.get("axis", -1) not in (-1, 1)
            or set(kwargs) - {"from_logits", "ignore_class", "axis"}):
        return None
    if y_pred.dim() != 2 or y.dim() != 1 or y.shape[0] != y_pred.shape[0]:
        return None
    return torch.nn.functional.cross_entropy(y_pred, y.to(torch.long), reduction="none")


def track(tracker, value, count):
    """`tracker.update_state(value, sample_weight=count)` for Keras's loss
    tracker (a `Mean`): `total += value * count; count += count`, in place.
    Returns whether it did; anything else is left to the caller."""
    state = float32_mean_state(tracker)
    if state is None or not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.dim() != 0:
        return False
    total, seen = state
    with torch.no_grad():
        total.add_(value.detach() * float(count))
        seen.add_(float(count))
    return True
