"""torch: MultiWorkerMirrored's fused BatchNormalization (`GlobalBatchNorm` in
backends/torch/batchnorm.py) computes what Keras's layer computes, forward
and backward, with and without gamma/beta, on 2D and 4D inputs. (Across two
real workers, with an uneven split and a custom train_step: the BN tests of
tests/test_multi_worker.py.)"""

import keras
import numpy as np
import pytest

from conftest import BACKEND
from keras_strategies.launch.ports import free_port

pytestmark = [pytest.mark.in_process, pytest.mark.skipif(
    BACKEND != "torch", reason="the fused BatchNormalization is torch-backend code (backends/torch/batchnorm.py)"
)]


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shape,center,scale", [
    ((32, 6, 6, 5), True, True), ((32, 6, 6, 5), False, False), ((40, 7), True, False),
])
def test_fused_batch_norm_equals_keras(one_process_group, shape, center, scale):
    import torch

    from keras_strategies.backends.torch.batchnorm import GlobalBatchNorm as _GlobalBatchNorm

    keras.utils.set_random_seed(0)
    layer = keras.layers.BatchNormalization(center=center, scale=scale, momentum=0.9)
    layer.build(shape)
    if scale:
        layer.gamma.assign(np.linspace(0.5, 1.5, shape[-1]).astype("float32"))
    if center:
        layer.beta.assign(np.linspace(-1, 1, shape[-1]).astype("float32"))
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3 + 1).requires_grad_()
    upstream = torch.randn(shape, generator=generator)
    params = [v.value for v in (layer.gamma if scale else None, layer.beta if center else None) if v is not None]

    expected = layer(x, training=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, *params])

    axes = tuple(layer._reduction_axes)
    broadcast = [1] * len(shape)
    broadcast[-1] = shape[-1]
    got, mean, variance = _GlobalBatchNorm.apply(
        x, layer.gamma.value if scale else None, layer.beta.value if center else None,
        axes, broadcast, layer.epsilon, 1.0,
    )
    got_grads = torch.autograd.grad((got * upstream).sum(), [x, *params])

    np.testing.assert_allclose(got.detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5)
    reduced = x.detach().numpy().reshape(-1, shape[-1])
    np.testing.assert_allclose(mean.numpy(), reduced.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), reduced.var(0), rtol=1e-4, atol=1e-5)


def test_fallback_moments_equal_keras(one_process_group):
    """The moments Keras's own BN call gets under MultiWorkerMirrored where the
    fused path does not apply (masks, renorm, other dtypes): values and gradients."""
    import torch

    from keras_strategies.backends.torch.batchnorm import CountWeightedSum as _CountWeightedSum, moment_sums as _moment_sums, moments as _moments

    generator = torch.Generator().manual_seed(1)
    x = (torch.randn((16, 5, 5, 3), generator=generator) * 2 - 1).requires_grad_()
    weights = torch.randn(2, 3, generator=generator)
    mean, variance = _moments(_CountWeightedSum.apply(_moment_sums(x, (0, 1, 2)), 1.0))
    got = torch.autograd.grad((mean * weights[0] + variance * weights[1]).sum(), x)[0]
    expected_mean, expected_variance = keras.ops.moments(x, axes=[0, 1, 2])
    expected = torch.autograd.grad((expected_mean * weights[0] + expected_variance * weights[1]).sum(), x)[0]
    np.testing.assert_allclose(mean.detach().numpy(), expected_mean.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance.detach().numpy(), expected_variance.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
