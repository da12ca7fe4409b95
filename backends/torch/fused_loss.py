"""The loss of the multi-process PyTorch step for the commonest classifier,
without Keras's layers of wrappers around it.

A model compiled with one sparse categorical crossentropy (the
`"sparse_categorical_crossentropy"` string, the function or
`SparseCategoricalCrossentropy(from_logits=...)`) computes its loss in
Keras 3.15 through `Trainer.compute_loss`, `CompileLoss`, `Loss.__call__`,
`LossFunctionWrapper` and `reduce_weighted_values`: about 0.7 ms of a step on
one CPU thread, of which torch's own cross entropy is about 0.1 ms
(`benchmarks/step_cost.py`). Here the same loss is the same backend op
(`keras.src.backend.torch.nn.sparse_categorical_crossentropy`) summed and
divided by the batch size, as `reduce_weighted_values` does, and the loss
tracker's update is its two in-place additions: the same values, bit for bit
(`tests/test_fused_loss.py`).

Anything else takes Keras's own path: sample weights, a mask, a loss weight
per output, several outputs, `ignore_class`, another axis, losses added by
layers (`model.losses`), a `compute_loss` of the user's, other dtypes.
"""

import torch
from keras.src.backend import get_keras_mask
from keras.src.backend.torch import nn as torch_nn
from keras.src.losses import losses as keras_losses
from keras.src.metrics.reduction_metrics import Mean
from keras.src.trainers.compile_utils import CompileLoss
from keras.src.trainers.trainer import Trainer

_LOSS_TYPES = (keras_losses.LossFunctionWrapper, keras_losses.SparseCategoricalCrossentropy)


def sparse_crossentropy(compile_loss):
    """`(from_logits, loss_weight)` when `compile_loss` (a model's
    `_compile_loss`) is one sparse categorical crossentropy with Keras's
    defaults otherwise, else None."""
    if type(compile_loss) is not CompileLoss or not compile_loss.built or compile_loss.dtype != "float32":
        return None
    if len(compile_loss._flat_losses) != 1:
        return None
    path, loss, weight, _ = compile_loss._flat_losses[0]
    if (path != () or type(loss) not in _LOSS_TYPES or loss.fn is not keras_losses.sparse_categorical_crossentropy
            or loss.reduction != "sum_over_batch_size" or loss.dtype != "float32"):
        return None
    options = dict(loss._fn_kwargs)
    from_logits = options.pop("from_logits", False)
    if options.pop("ignore_class", None) is not None or options.pop("axis", -1) != -1 or options:
        return None
    return bool(from_logits), weight


def _plain_model(model):
    return type(model).compute_loss is Trainer.compute_loss and type(model)._compute_loss is Trainer._compute_loss


def loss(model, y, y_pred, sample_weight):
    """The training loss of `model` on this batch, as
    `model._compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)`
    computes it, or None where this module does not apply (the caller then
    calls Keras)."""
    if (sample_weight is not None or not isinstance(y, torch.Tensor) or not isinstance(y_pred, torch.Tensor)
            or y_pred.dtype != torch.float32 or y_pred.dim() != 2 or y.dim() != 1 or not len(y)
            or get_keras_mask(y_pred) is not None or not _plain_model(model)):
        return None
    spec = sparse_crossentropy(model._compile_loss)
    if spec is None or model.losses:
        return None
    from_logits, weight = spec
    # Loss.__call__ converts the labels to the loss's dtype first, as here.
    values = torch_nn.sparse_categorical_crossentropy(y.to(torch.float32), y_pred, from_logits=from_logits)
    value = torch.sum(values) / float(values.shape[0])
    return value if weight is None else value * weight


def track(tracker, value, count):
    """`tracker.update_state(value, sample_weight=count)` for Keras's loss
    tracker (a `Mean`): `total += value * count; count += count`, in place.
    Returns whether it did; anything else is left to the caller."""
    if (type(tracker) is not Mean or tracker.dtype != "float32" or not isinstance(value, torch.Tensor)
            or value.dtype != torch.float32 or value.dim() != 0):
        return False
    total, seen = tracker.total.value, tracker.count.value
    if total.dtype != torch.float32 or seen.dtype != torch.float32:
        return False
    with torch.no_grad():
        total.add_(value.detach() * float(count))
        seen.add_(float(count))
    return True
