"""The training job of tests/test_resume.py, run by every process of a job.

    python tests/resume_job.py OUT BACKUP_DIR [--strategy mw|default] [--optimizer adam|sgd]
        [--private] [--stop-at N --stop-rank R --stop-with KILL|TERM|RAISE] [--reference]

Every process trains the same small model with `BackupAndRestore(BACKUP_DIR,
save_freq=SAVE_FREQ)`, shuffled arrays and a decaying learning rate. With
`--private` each non-chief gets its own empty backup directory (no shared
filesystem). `--stop-*` interrupts the run when batch N (1-based, counted
over the whole run) is about to start: SIGKILL or SIGTERM to rank R, or an
exception (`RAISE`, in every process). Each process writes OUT/rank{R}.json
(what it trained, whether it was preempted) and OUT/weights{R}.npz, also when
preempted. `--reference` then trains the same model without interruption in
this process and records the largest difference from the resumed weights.
"""

import argparse
import json
import os
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("backup")
parser.add_argument("--strategy", default="mw")
parser.add_argument("--optimizer", default="adam")
parser.add_argument("--private", action="store_true")
parser.add_argument("--stop-at", type=int, default=None)
parser.add_argument("--stop-rank", type=int, default=1)
parser.add_argument("--stop-with", default="KILL")
parser.add_argument("--reference", action="store_true")
args = parser.parse_args()

strategy = ks.MultiWorkerMirrored() if args.strategy == "mw" else ks.Default()
rank = strategy.worker_index

import keras  # noqa: E402
import numpy as np  # noqa: E402
from models import make_data  # noqa: E402
from workloads import set_seed  # noqa: E402

EPOCHS, BATCH, SAVE_FREQ = 3, 8, 4  # 69 examples: 9 batches an epoch, the last one of 5


def build(optimizer="adam", width=16, seed=1):
    set_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=5, decay_rate=0.8)
    optimizer = (keras.optimizers.Adam(schedule) if optimizer == "adam"
                 else keras.optimizers.SGD(schedule, momentum=0.9))
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class Stop(keras.callbacks.Callback):
    """Interrupts the run before batch `at` (1-based, over the whole run)."""

    def __init__(self, at, how, on_rank):
        super().__init__()
        self.at, self.how, self.on_rank = at, how, on_rank

    def on_train_batch_begin(self, batch, logs=None):
        done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if done + 1 != self.at:
            return
        if self.how == "RAISE":
            raise RuntimeError(f"stopped before batch {self.at}")
        if rank == self.on_rank:
            os.kill(os.getpid(), getattr(signal, "SIG" + self.how))


def train(model, backup_dir, callbacks=()):
    x, y = make_data(69)
    backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=SAVE_FREQ, delete_checkpoint=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, distribution=strategy,
                        callbacks=[backup, *callbacks])
    return history.epoch


def save(result, model):
    np.savez(os.path.join(args.out, f"weights{rank}.npz"), *model.get_weights())
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


backup_dir = args.backup if rank == 0 or not args.private else f"{args.backup}-private{rank}"
model = build(args.optimizer)
callbacks = [Stop(args.stop_at, args.stop_with, args.stop_rank)] if args.stop_at else []
result = {"rank": rank, "workers": strategy.num_workers, "backup_dir": backup_dir,
          "backend": keras.backend.backend()}
try:
    result["epochs"] = train(model, backup_dir, callbacks)
except SystemExit as exit:
    result["exit"] = exit.code
    save(result, model)
    raise
except RuntimeError as error:
    result["error"] = str(error)
    save(result, model)
    raise SystemExit(3)
result["iterations"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
if args.reference:
    reference = build(args.optimizer)
    train(reference, tempfile.mkdtemp())
    result["reference_difference"] = max(
        float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights()))
save(result, model)
