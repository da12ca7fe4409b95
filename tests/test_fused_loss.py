"""torch: the multi-process step computes its loss, the loss tracker's
update and the tracker's result without Keras's wrappers
(backends/torch/fused_loss.py, backends/torch/metrics.py): the same loss,
gradients, tracker state and logs as Keras's own calls, bit for bit, and
Keras's path for everything else."""

import keras
import numpy as np
import pytest

from conftest import BACKEND
from test_torch_batchnorm import one_process_group  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.in_process, pytest.mark.skipif(
    BACKEND != "torch", reason="the fused loss is torch-backend code (backends/torch/fused_loss.py)"
)]

def squared_error(y_true, y_pred):  # a loss function of the user's
    return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


# name: (loss, labels: "sparse" (batch,), "sparse_column" (batch, 1), "one_hot" or "real"; logits or probabilities)
LOSSES = {
    "sparse_string": (lambda: "sparse_categorical_crossentropy", "sparse", False),
    "sparse_function": (lambda: keras.losses.sparse_categorical_crossentropy, "sparse", False),
    "sparse_logits": (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse", True),
    "sparse_logits_column": (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             "sparse_column", True),
    "categorical_smoothed": (lambda: keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                             "one_hot", True),
    "binary_logits": (lambda: keras.losses.BinaryCrossentropy(from_logits=True), "one_hot", True),
    "mse_string": (lambda: "mse", "real", True),
    "huber": (lambda: keras.losses.Huber(delta=0.5), "real", True),
    "users_function": (lambda: squared_error, "real", True),
}


def compiled(loss, outputs=4, loss_weights=None, model_class=keras.Sequential, **dense):
    keras.utils.set_random_seed(0)
    model = model_class([keras.Input((6,)), keras.layers.Dense(outputs, **dense)])
    model.compile(optimizer="sgd", loss=loss, loss_weights=loss_weights)
    model.build((None, 6))
    return model


def labels(kind, generator, dtype="float32"):
    import torch

    classes = torch.randint(0, 4, (16,), generator=generator)
    if kind == "real":
        return torch.randn(16, 4, generator=generator)
    if kind == "one_hot":
        return torch.nn.functional.one_hot(classes, 4).to(torch.float32)
    return (classes[:, None] if kind == "sparse_column" else classes).to(getattr(torch, dtype))


def batch(model, kind="sparse", from_logits=True, label_dtype="int64"):
    """x, y and y_pred for `model`, after one call of Keras's loss (which builds it)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    y = labels(kind, generator, label_dtype)
    y_pred = model(x)
    y_pred = y_pred if from_logits else torch.softmax(y_pred, -1)
    model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=None, training=True)
    return x, y, y_pred


CASES = [(name, dtype) for name, (_, kind, _) in sorted(LOSSES.items())
         for dtype in (("int64", "float32") if kind.startswith("sparse") else ("float32",))]


@pytest.mark.parametrize("loss_weights", [None, 0.3], ids=["unweighted", "loss_weight"])
@pytest.mark.parametrize("name,label_dtype", CASES, ids=[f"{name}-{dtype}" for name, dtype in CASES])
def test_loss_and_gradients_equal_keras_bit_for_bit(name, label_dtype, loss_weights):
    import torch

    from keras_strategies.backends.torch import fused_loss

    make, kind, from_logits = LOSSES[name]
    model = compiled(make(), loss_weights=loss_weights)
    x, y, y_pred = batch(model, kind, from_logits, label_dtype)
    direct = []
    with pytest.MonkeyPatch.context() as patch:
        original = fused_loss._sparse_crossentropy_from_logits
        patch.setattr(fused_loss, "_sparse_crossentropy_from_logits",
                      lambda *a: direct.append(original(*a)) or direct[-1])
        got = fused_loss.loss(model, y, y_pred, None)
    assert got is not None
    # torch's cross entropy called directly for labels (N,) and logits, Keras's function otherwise
    assert (direct[0] is not None) == (name == "sparse_logits"), direct
    want = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=None, training=True)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.item() == want.item()
    weights = [v.value for v in model.trainable_weights]
    for a, b in zip(torch.autograd.grad(got, weights, retain_graph=True), torch.autograd.grad(want, weights)):
        assert torch.equal(a, b)


class OwnLoss(keras.Sequential):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return keras.ops.mean(y_pred)


class OwnLossClass(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


def test_everything_else_takes_keras_path():
    import torch

    from keras_strategies.backends.torch import fused_loss

    plain = compiled("sparse_categorical_crossentropy")
    x, y, y_pred = batch(plain, from_logits=False)
    assert fused_loss.loss(plain, y, y_pred, None) is not None
    assert fused_loss.loss(plain, y, y_pred, torch.ones(16)) is None  # sample weights
    assert fused_loss.loss(plain, y, y_pred.to(torch.bfloat16), None) is None  # mixed precision
    masked = y_pred * 1.0
    masked._keras_mask = torch.ones(16, dtype=torch.bool)
    assert fused_loss.loss(plain, y, masked, None) is None
    others = {
        "ignore_class": compiled(keras.losses.SparseCategoricalCrossentropy(ignore_class=0)),  # a mask on the values
        "sum_reduction": compiled(keras.losses.SparseCategoricalCrossentropy(reduction="sum")),
        "regularizer": compiled("sparse_categorical_crossentropy", kernel_regularizer="l2"),
        "own_compute_loss": compiled("sparse_categorical_crossentropy", model_class=OwnLoss),
        "own_loss_class": compiled(OwnLossClass()),
    }
    for name, model in others.items():
        batch(model, "real" if name == "own_loss_class" else "sparse", from_logits=False)
        assert fused_loss.loss(model, y, y_pred, None) is None, name
    unbuilt = compiled("sparse_categorical_crossentropy")
    assert fused_loss.loss(unbuilt, y, y_pred, None) is None  # Keras builds its compiled loss at its first call
    assert fused_loss.loss_function(None) is None  # compiled without a loss


def test_tracker_update_equals_keras_and_other_trackers_are_left_alone():
    import torch

    from keras_strategies.backends.torch import fused_loss

    fused, own = keras.metrics.Mean(name="loss"), keras.metrics.Mean(name="loss")
    for value, count in [(0.7, 128), (1.3, 128), (0.123456789, 37)]:
        assert fused_loss.track(fused, torch.tensor(value), count)
        own.update_state(torch.tensor(value), sample_weight=count)
        assert fused.total.numpy() == own.total.numpy() and fused.count.numpy() == own.count.numpy()
    assert fused.result().numpy() == own.result().numpy()
    assert not fused_loss.track(keras.metrics.Sum(), torch.tensor(1.0), 8)
    assert not fused_loss.track(keras.metrics.Mean(dtype="float16"), torch.tensor(1.0), 8)
    assert not fused_loss.track(fused, torch.tensor([1.0, 2.0]), 8)  # not one value


def test_the_multi_worker_step_uses_it_and_trains_as_plain_keras(monkeypatch, one_process_group):  # noqa: F811
    import keras_strategies as ks
    from keras_strategies.backends.torch import fused_loss, metrics, multi_worker

    fused = []
    original = fused_loss.loss

    def counting(*args):
        value = original(*args)
        fused.append(value is not None)
        return value

    monkeypatch.setattr(fused_loss, "loss", counting)
    means = []
    original_mean = metrics.mean_result
    monkeypatch.setattr(metrics, "mean_result", lambda metric: means.append(metric.name) or original_mean(metric))
    # the multi-process step (DDP, the comm hook) with this one process
    monkeypatch.setattr(multi_worker.TorchMultiWorkerMirrored, "multi_process", property(lambda self: True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 6)).astype("float32"), rng.integers(0, 4, 96)
    results = []
    for distribution in (ks.MultiWorkerMirrored(), None):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)])
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        kwargs = {"distribution": distribution} if distribution is not None else {}
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, **kwargs)
        results.append((model.get_weights(), history.history["loss"]))
    assert len(fused) == 3 * 6 and all(fused[1:]), fused  # the first step builds Keras's compiled loss
    assert means.count("loss") >= 3 * 6, means  # the logs of every step
    (got, got_loss), (want, want_loss) = results
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mean_and_metric_results_equal_keras_bit_for_bit():
    import torch

    from keras_strategies.backends.torch.metrics import mean_result, metrics_result

    tracker = keras.metrics.Mean(name="loss")
    assert mean_result(tracker).item() == tracker.result().item() == 0.0  # no example yet: 0, not NaN
    for value, count in [(0.7, 128), (1.3, 128), (0.123456789, 37)]:
        tracker.update_state(torch.tensor(value), sample_weight=count)
        got, want = mean_result(tracker), tracker.result()
        assert got.dtype == want.dtype and got.shape == want.shape and got.item() == want.item()
    assert mean_result(keras.metrics.Sum()) is None
    assert mean_result(keras.metrics.Mean(dtype="float16")) is None
    assert mean_result(keras.metrics.MeanSquaredError()) is None  # a subclass: its own result()

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2)])
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(37, 6)).astype("float32"), rng.integers(0, 4, 37), batch_size=8, verbose=0)
    got, want = metrics_result(model), model.get_metrics_result()
    assert list(got) == list(want) == ["loss", "accuracy", "sparse_top_k_categorical_accuracy"]
    for name in want:
        assert got[name].item() == want[name].item(), name
