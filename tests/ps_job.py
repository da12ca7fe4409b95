"""Run by every process of the ParameterServer tests (chief, workers, parameter servers).

    python tests/ps_job.py OUT_DIR [--epochs N] [--steps-per-epoch N] [--mark EPOCH:STEP]
        [--pattern fit_argument|scope]

The role comes from the environment (launcher or TF_CONFIG). The chief trains
a classifier on scikit-learn's digits, writes `OUT_DIR/mark` when it reaches
`--mark` (for the test to kill a process there), and at the end
`OUT_DIR/result.json` with what it saw.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--steps-per-epoch", type=int, default=None)
parser.add_argument("--mark", default=None,
                    help="EPOCH:STEP at which the chief writes OUT/mark (STEP `begin`: at the epoch's start)")
parser.add_argument("--hold", action="store_true",
                    help="after writing OUT/mark the chief waits (up to 60 s) for OUT/killed")
parser.add_argument("--pattern", default="fit_argument")
parser.add_argument("--backup", action="store_true", help="BackupAndRestore into OUT/user/backup")
args = parser.parse_args()

strategy = ks.ParameterServer()  # a parameter server (and a TF worker) serves from here on
with open(os.path.join(args.out, f"role-{os.getpid()}.json"), "w") as f:  # every process knows its place
    json.dump({"role": strategy.role, "is_chief": strategy.is_chief, "workers": strategy.num_workers,
               "index": strategy.worker_index, "ps": strategy.num_ps}, f)
print(f"{strategy.role} {strategy.worker_index} knows its place", flush=True)  # each role's own output

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from models import RecordingCheckpoint  # noqa: E402

x, y = load_digits(return_X_y=True)
x, y = (x / 16.0).astype("float32"), y.astype("int32")
x_train, y_train, x_test, y_test = x[:1440], y[:1440], x[1440:], y[1440:]
user = os.path.join(args.out, "user")
os.makedirs(user, exist_ok=True)


def build():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


class Progress(keras.callbacks.Callback):
    """The chief marks where the test kills a process, and records who worked."""

    def __init__(self):
        super().__init__()
        self.by_epoch, self.checksums = [], []
        mark = (args.mark or "-1:-1").split(":")
        self.mark = (int(mark[0]), mark[1] if mark[1] == "begin" else int(mark[1]))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if (epoch, "begin") == self.mark:
            self.write_mark()

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.mark:
            self.write_mark()

    def write_mark(self):
        with open(os.path.join(args.out, "mark"), "w") as f:
            f.write(str(time.time()))
        deadline = time.monotonic() + 60
        while args.hold and not os.path.exists(os.path.join(args.out, "killed")) and time.monotonic() < deadline:
            time.sleep(0.05)

    def on_epoch_end(self, epoch, logs=None):
        self.by_epoch.append({str(k): v for k, v in strategy.steps_by_worker.items()})
        self.checksums.append(float(sum(np.sum(w) for w in self.model.get_weights())))
        if not hasattr(self, "held"):  # asked of the servers while they hold the variables
            self.held = strategy.variables_by_server(self.model)


progress = Progress()
last = args.epochs - 1
callbacks = [
    progress,
    # the chief's learning-rate changes reach the servers: nothing moves in the last epoch
    keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.0 if epoch == last else lr),
    keras.callbacks.CSVLogger(os.path.join(user, "log.csv")),
    RecordingCheckpoint(os.path.join(user, "ckpt.weights.h5"), os.path.join(args.out, "saves.txt"),
                        save_weights_only=True),
]
if args.backup:
    callbacks.append(keras.callbacks.BackupAndRestore(os.path.join(user, "backup")))
if args.pattern == "scope":
    with strategy.scope():
        model = build()
else:
    model = build()
history = model.fit(
    x_train, y_train, batch_size=32, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
    validation_data=(x_test, y_test), callbacks=callbacks, verbose=2,
    **({} if args.pattern == "scope" else {"distribution": strategy}),
)
# only the chief gets here; a second fit of the same model goes on where the first ended
model.fit(x_train, y_train, batch_size=32, epochs=1, steps_per_epoch=10, verbose=0,
          **({} if args.pattern == "scope" else {"distribution": strategy}))
evaluation = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
distributed = model.evaluate(x_test, y_test, verbose=0, return_dict=True,
                             **({} if args.pattern == "scope" else {"distribution": strategy}))
predictions = model.predict(x_test, verbose=0)
saved = os.path.join(user, "model.keras")
model.save(saved)
reloaded = keras.models.load_model(saved)
steps = (args.steps_per_epoch or -(-len(x_train) // 32)) * len(history.history["loss"]) + 10
result = {
    "role": strategy.role, "is_chief": strategy.is_chief, "workers": strategy.num_workers,
    "ps": strategy.num_ps, "history": history.history, "evaluate": evaluation, "distributed_evaluate": distributed,
    "predict_accuracy": float(np.mean(np.argmax(predictions, -1) == y_test)),
    "reloaded_matches": bool(np.allclose(reloaded.predict(x_test, verbose=0), predictions, atol=1e-6)),
    "steps": steps, "updates_applied": strategy.updates_applied(),
    "steps_by_worker": {str(k): v for k, v in strategy.steps_by_worker.items()},
    "by_epoch": progress.by_epoch, "variables_by_server": progress.held, "checksums": progress.checksums,
    "variables": [v.path for v in model.variables], "pid": os.getpid(),
}
with open(os.path.join(args.out, "result.json"), "w") as f:
    json.dump(result, f)
print("chief done", flush=True)
