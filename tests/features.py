"""The Keras training features every strategy must train exactly as one device.

Each case builds a model, compiles it and fits it with one feature of Keras's
`fit`/`evaluate`/`predict` or of its optimizers, callbacks and dtype
policies, on scikit-learn's digits (real data) with `shuffle=False`. A test
runs each case twice from the same seed, once under a strategy and once on
one device, on the same global batches, and compares the results
(`compare`). Shared by tests/test_features.py (strategies in one process)
and tests/features_job.py (strategies over processes, all cases in one job).
"""

import contextlib

import keras
import numpy as np

BATCH = 32  # global batch
EXACT = 1e-5  # weights and logs of exact cases
MIXED = 5e-2  # lower-precision cases: bfloat16 (3 significant digits) sums in another order


def digits(n=352):
    """Digits features (64, scaled), labels, and a held-out split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype("float32"), y.astype("int32")
    return x[:n], y[:n], x[n:n + 96], y[n:n + 96]


def _seed():
    from models import set_seed

    set_seed(4321)


def mlp(hidden=32, dropout=None, noise=None):
    layers = [keras.Input((64,)), keras.layers.Dense(hidden, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    if noise:
        layers.append(keras.layers.GaussianNoise(noise))
    layers.append(keras.layers.Dense(10, activation="softmax", dtype="float32"))
    return keras.Sequential(layers)


def two_towers(as_dict):
    """Two named inputs (the digits' two halves) and two named outputs."""
    left, right = keras.Input((32,), name="left"), keras.Input((32,), name="right")
    h = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(left),
                                    keras.layers.Dense(16, activation="relu")(right)])
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    parity = keras.layers.Dense(1, activation="sigmoid", name="parity")(h)
    if as_dict:
        return keras.Model({"left": left, "right": right}, {"digit": digit, "parity": parity})
    return keras.Model([left, right], [digit, parity])


def _split(x, y, as_dict):
    inputs = (x[:, :32], x[:, 32:])
    targets = (y, (y % 2).astype("float32")[:, None])
    if as_dict:
        return dict(zip(("left", "right"), inputs)), dict(zip(("digit", "parity"), targets))
    return list(inputs), list(targets)


SCCE = "sparse_categorical_crossentropy"


class Case:
    """One feature: how to build, compile and fit, and how exact it must be.

    Args:
        name: the case's name.
        model: a callable returning a new (unbuilt or built) model.
        optimizer: a callable returning the optimizer.
        compile: more `compile` arguments.
        fit: more `fit` arguments, or a callable `(x, y, xv, yv) -> dict`.
        data: a callable `(x, y) -> (x, y)` reshaping the inputs.
        tolerance: how close to one device (None: a random case, compared
            by accuracy).
        policy: a dtype policy to train under.
        callbacks: a callable returning the fit callbacks.
        keras_refuses: the text of the error Keras itself raises for this
            case on this backend (then the strategy must raise it too).
    """

    def __init__(self, name, model=mlp, optimizer=None, compile=None, fit=None, data=None,
                 tolerance=EXACT, policy=None, callbacks=None, keras_refuses=None, epochs=3):
        self.name = name
        self.model = model
        self.optimizer = optimizer or (lambda: keras.optimizers.SGD(0.1))
        self.compile_kwargs = {"loss": SCCE, "metrics": ["accuracy"], **(compile or {})}
        self.fit_kwargs = fit or {}
        self.data = data
        self.tolerance = tolerance
        self.policy = policy
        self.callbacks = callbacks
        self.keras_refuses = keras_refuses or {}
        self.epochs = epochs

    def __repr__(self):
        return self.name

    @contextlib.contextmanager
    def dtype_policy(self):
        if self.policy is None:
            yield
            return
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.policy)
        try:
            yield
        finally:
            keras.config.set_dtype_policy(previous)

    def build(self):
        """A new compiled model, from the same seed every time."""
        _seed()
        with self.dtype_policy():
            model = self.model()
            model.compile(optimizer=self.optimizer(), **self.compile_kwargs)
        return model

    def arguments(self):
        """`(x, y, fit kwargs, (x_test, y_test))` of this case."""
        x, y, xv, yv = digits()
        extra = self.fit_kwargs(x, y, xv, yv) if callable(self.fit_kwargs) else dict(self.fit_kwargs)
        if self.data is not None:
            x, y = self.data(x, y)
            xv, yv = self.data(xv, yv)
        kwargs = dict(batch_size=BATCH, epochs=self.epochs, shuffle=False, verbose=0)
        kwargs.update(extra)
        if self.callbacks is not None:
            kwargs["callbacks"] = self.callbacks()
        return x, y, kwargs, (xv, yv)

    def train(self, distribution=None, scope=None, keep_model=False):
        """Trains the case (under `distribution`, or a model built in `scope`).

        Returns:
            A dict of the results to compare (and the model under `"model"`
            with `keep_model`), or `{"error": text}`.
        """
        with self.dtype_policy():
            if scope is not None:
                with scope.scope():
                    model = self.build()
            else:
                model = self.build()
            x, y, kwargs, (xv, yv) = self.arguments()
            extra = {} if distribution is None else {"distribution": distribution}
            try:
                history = model.fit(x, y, **kwargs, **extra)
            except Exception as error:  # noqa: BLE001 - compared with Keras's own error
                return {"error": f"{type(error).__name__}: {error}"}
            evaluation = model.evaluate(xv, yv, batch_size=BATCH, verbose=0, return_dict=True, **extra)
            predictions = model.predict(xv, batch_size=BATCH, verbose=0, **extra)
        return {
            **({"model": model} if keep_model else {}),
            "weights": [np.asarray(w, "float64") for w in model.get_weights()],
            "history": {k: list(map(float, v)) for k, v in history.history.items()},
            "evaluate": {k: float(v) for k, v in evaluation.items()},
            "predictions": [np.asarray(p, "float64") for p in keras.tree.flatten(predictions)],
            "epochs_run": len(history.history.get("loss", [])),
        }


def compare(case, got, want):
    """Raises AssertionError when `got` (a strategy) differs from `want` (one device)."""
    if "error" in want:  # Keras itself refuses it: the strategy must say the same
        assert "error" in got and want["error"].split(":")[0] == got["error"].split(":")[0], (case, got, want)
        return
    assert "error" not in got, (case, got["error"])
    assert got["epochs_run"] == want["epochs_run"], (case, got["epochs_run"], want["epochs_run"])
    if case.tolerance is None:  # random layers: the same accuracy, within a few points
        assert abs(got["evaluate"]["accuracy"] - want["evaluate"]["accuracy"]) < 0.1, case
        return
    tolerance = case.tolerance
    for a, b in zip(got["weights"], want["weights"]):
        np.testing.assert_allclose(a, b, atol=tolerance, rtol=tolerance, err_msg=f"{case}: weights")
    assert got["history"].keys() == want["history"].keys(), case
    for key in want["history"]:
        np.testing.assert_allclose(got["history"][key], want["history"][key], atol=tolerance, rtol=tolerance,
                                   err_msg=f"{case}: history {key}")
    for key in want["evaluate"]:
        np.testing.assert_allclose(got["evaluate"][key], want["evaluate"][key], atol=tolerance, rtol=tolerance,
                                   err_msg=f"{case}: evaluate {key}")
    for a, b in zip(got["predictions"], want["predictions"]):
        np.testing.assert_allclose(a, b, atol=tolerance, rtol=tolerance, err_msg=f"{case}: predict")


def check_save_and_load(result, path):
    """A model trained under a strategy saves (`model.save`) and loads
    (`keras.models.load_model`) as an ordinary model: the same weights, the
    same optimizer state and the same predictions."""
    model = result["model"]
    model.save(path)
    loaded = keras.models.load_model(path)
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want))
    _, _, _, (xv, _) = BY_NAME["plain"].arguments()
    np.testing.assert_allclose(loaded.predict(xv, batch_size=BATCH, verbose=0),
                               model.predict(xv, batch_size=BATCH, verbose=0), atol=1e-6)


def _weights(x, y, xv, yv):
    return {"sample_weight": np.linspace(0.5, 1.5, len(x)).astype("float32")}


def _class_weight(x, y, xv, yv):
    return {"class_weight": {i: 1.0 + 0.1 * i for i in range(10)}}


def _validation_data(x, y, xv, yv):
    return {"validation_data": (xv, yv)}


def _lr_schedule():
    return keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=5, decay_rate=0.8))


def _two_losses(as_dict):
    loss = {"digit": SCCE, "parity": "binary_crossentropy"} if as_dict else [SCCE, "binary_crossentropy"]
    weights = {"digit": 1.0, "parity": 0.5} if as_dict else [1.0, 0.5]
    metrics = {"digit": ["accuracy"], "parity": ["accuracy"]} if as_dict else [["accuracy"], ["accuracy"]]
    return {"loss": loss, "loss_weights": weights, "metrics": metrics}


def _early_stopping():
    # val_loss gets worse soon at this learning rate: stops after `patience`
    # epochs without a new best, then restores the best epoch's weights
    return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)]


def _two_tower_data(as_dict):
    return lambda x, y: _split(x, y, as_dict)


def _plateau():
    return [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)]


def _scheduler():
    return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.2 / (1 + epoch))]


CASES = [
    Case("plain"),
    Case("sample_weight", fit=_weights),
    Case("class_weight", fit=_class_weight),
    Case("validation_split", fit={"validation_split": 0.25}),
    Case("validation_data", fit=_validation_data),
    Case("initial_epoch", fit={"initial_epoch": 1}),
    Case("steps_per_epoch", fit={"steps_per_epoch": 4}),
    Case("dict_inputs_outputs_loss_weights", model=lambda: two_towers(True), data=_two_tower_data(True),
         compile=_two_losses(True), fit=_validation_data),
    Case("list_inputs_outputs_loss_weights", model=lambda: two_towers(False), data=_two_tower_data(False),
         compile=_two_losses(False)),
    Case("gradient_accumulation_steps", optimizer=lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)),
    Case("use_ema", optimizer=lambda: keras.optimizers.Adam(1e-2, use_ema=True)),
    Case("use_ema_overwrite_frequency", optimizer=lambda: keras.optimizers.Adam(
        1e-2, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)),
    Case("clipnorm", optimizer=lambda: keras.optimizers.SGD(0.5, clipnorm=0.05)),
    Case("global_clipnorm", optimizer=lambda: keras.optimizers.SGD(0.5, global_clipnorm=0.1)),
    Case("clipvalue", optimizer=lambda: keras.optimizers.SGD(0.5, clipvalue=0.01)),
    Case("adamw_weight_decay", optimizer=lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1)),
    Case("momentum", optimizer=lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)),
    Case("learning_rate_schedule", optimizer=_lr_schedule),
    Case("reduce_lr_on_plateau", callbacks=_plateau),
    Case("learning_rate_scheduler", callbacks=_scheduler),
    Case("early_stopping_restore_best", optimizer=lambda: keras.optimizers.SGD(2.0), callbacks=_early_stopping,
         fit=_validation_data, epochs=6),
    Case("mixed_bfloat16", policy="mixed_bfloat16", tolerance=MIXED),
    Case("mixed_float16_loss_scaling", policy="mixed_float16", tolerance=MIXED),
    Case("dropout", model=lambda: mlp(dropout=0.3), tolerance=None),
    Case("gaussian_noise", model=lambda: mlp(noise=0.1), tolerance=None),
    Case("steps_per_execution", compile={"steps_per_execution": 3},
         keras_refuses={"torch": "ValueError"}),
]
BY_NAME = {case.name: case for case in CASES}
