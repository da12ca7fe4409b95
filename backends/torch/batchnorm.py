"""BatchNormalization over the global batch of every worker (PyTorch,
multi-process): differentiable statistics, one all-reduce each way."""

import contextlib
import math

import torch
import torch.distributed as dist
from keras.src.layers.normalization.batch_normalization import BatchNormalization

from keras_strategies.patches import overriding

class CountWeightedSum(torch.autograd.Function):
    """A sum over every worker whose backward weights each worker's incoming
    gradient by `count` (then divides by this worker's).

    Where each worker's gradients are weighted by its example count only after
    backward (a custom train_step: in the packed all-reduce), gradients that
    crossed workers here (global BatchNormalization moments) must carry the
    count of the worker whose loss they came from, so that an unevenly split
    batch still trains exactly as on one device. Where the loss itself was
    weighted before backward, `count` is 1: a plain sum.
    """

    @staticmethod
    def forward(ctx, tensor, count):
        ctx.count = count
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        weighted = grad * ctx.count
        dist.all_reduce(weighted)
        return weighted / (ctx.count or 1.0), None


def moment_sums(x, axes):
    """This worker's [sum of x, sum of x * x, element count] over `axes`, one
    tensor: what the BatchNormalization all-reduce adds up over workers."""
    count = torch.tensor([math.prod(x.shape[a] for a in axes)], dtype=x.dtype, device=x.device)
    return torch.cat([torch.sum(x, dim=axes), torch.sum(x * x, dim=axes), count])


def moments(total):
    """Mean and (biased) variance from summed `moment_sums`."""
    channels = (total.shape[0] - 1) // 2
    mean = total[:channels] / total[-1]
    return mean, torch.clamp(total[channels:2 * channels] / total[-1] - mean * mean, min=0.0)


class GlobalBatchNorm(torch.autograd.Function):
    """BatchNormalization over the global batch in a few passes, forward and
    backward: `(x - mean) / sqrt(variance + epsilon) * gamma + beta` with the
    mean and variance of every worker's batch (one all-reduce each way).

    Keras's own layer composes it from about ten elementwise ops whose autograd
    graph reads the activation some twenty times per step (`aten::mul` was 29%
    of the benchmark BN convnet's CPU time); here the forward is two
    reductions and one fused multiply-add, the backward two reductions and two.
    The gradient is the one autograd takes through `CountWeightedSum`: the
    sums of `dy` and `dy * x_hat` over every worker, each weighted by its
    worker's `count_weight`. Returns the normalized tensor, the mean and the
    (biased) variance, the last two for the moving statistics.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, axes, shape, epsilon, count_weight):
        total = moment_sums(x, axes)
        dist.all_reduce(total)
        mean, variance = moments(total)
        n = total[-1]
        invstd = torch.rsqrt(variance + epsilon)
        scale = invstd if gamma is None else invstd * gamma
        shift = -mean * scale if beta is None else beta - mean * scale
        y = torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))
        ctx.save_for_backward(x, mean, invstd, scale)
        ctx.axes, ctx.shape, ctx.n, ctx.count_weight = axes, shape, n, count_weight
        ctx.has_gamma, ctx.has_beta = gamma is not None, beta is not None
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy, _mean_grad, _variance_grad):
        x, mean, invstd, scale = ctx.saved_tensors
        axes, shape, n, weight = ctx.axes, ctx.shape, ctx.n, ctx.count_weight
        sum_dy = torch.sum(dy, dim=axes)
        sum_dy_xhat = (torch.sum(dy * x, dim=axes) - mean * sum_dy) * invstd
        gamma_grad = sum_dy_xhat if ctx.has_gamma else None
        beta_grad = sum_dy if ctx.has_beta else None
        total = torch.cat([sum_dy, sum_dy_xhat]) * weight
        dist.all_reduce(total)
        total = total / (weight or 1.0)
        channels = sum_dy.shape[0]
        mean_dy = total[:channels] / n
        q = scale * invstd * total[channels:] / n
        dx = torch.addcmul((q * mean - scale * mean_dy).reshape(shape), x, (-q).reshape(shape))
        dx = torch.addcmul(dx, dy, scale.reshape(shape))
        return dx, gamma_grad, beta_grad, None, None, None, None


def global_moments(layer, step):
    """BatchNormalization statistics over the global batch (all workers),
    differentiable, so every worker's moving statistics stay identical and
    training equals one device (as on the other backends)."""
    original = layer._moments

    def layer_moments(inputs, mask):
        if mask is not None:
            return original(inputs, mask)
        total = CountWeightedSum.apply(
            moment_sums(inputs, tuple(layer._reduction_axes)), step.moments_weight
        )
        return moments(total)

    return layer_moments


def global_batch_norm(layer, step):
    """`layer.call` with `GlobalBatchNorm` in training; everything else
    (inference, masks, renorm, other dtypes) is Keras's own call, whose
    moments are global too (`global_moments`)."""
    original = layer.call

    def call(inputs, training=None, mask=None):
        if (
            not (training and layer.trainable) or mask is not None or layer.renorm
            or inputs.dtype != torch.float32 or layer.compute_dtype != "float32"
        ):
            return original(inputs, training=training, mask=mask)
        axes = tuple(layer._reduction_axes)
        shape = [1] * inputs.ndim
        shape[layer.axis] = inputs.shape[layer.axis]
        gamma = layer.gamma.value if layer.scale else None
        beta = layer.beta.value if layer.center else None
        outputs, mean, variance = GlobalBatchNorm.apply(
            inputs, gamma, beta, axes, shape, layer.epsilon, step.moments_weight
        )
        momentum = layer.momentum
        layer.moving_mean.assign(layer.moving_mean.value * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(layer.moving_variance.value * momentum + variance * (1.0 - momentum))
        return outputs

    return call


@contextlib.contextmanager
def global_batch_normalization(model, step):
    """While entered, every BatchNormalization layer of `model` normalizes
    over the global batch (the `torch-global-batchnorm` patch).

    Args:
        model: the Keras model.
        step: the `ddp.DataParallelStep` whose `moments_weight` weights
            each worker's gradient (see `CountWeightedSum`).

    Yields:
        Nothing; the layers are restored on exit.
    """
    with contextlib.ExitStack() as stack:
        for layer in model._flatten_layers(include_self=False):
            if isinstance(layer, BatchNormalization):
                for name, make in (("_moments", global_moments), ("call", global_batch_norm)):
                    stack.enter_context(overriding(layer, name, make(layer, step), "torch-global-batchnorm"))
        yield
