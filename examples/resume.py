"""Kill a training job, run it again: it resumes at the step it stopped at and
ends with the weights of a run that was never stopped.

    python examples/resume.py                   # each run: one process
    python examples/resume.py --processes 2     # each run: 2 processes (keras-strategies launch)

This script starts the training job (itself, with `--train`) twice. The first
run is killed with SIGKILL before step 40 (in epoch 2); the second, the same
command, finds the `BackupAndRestore` backup (written every 5 steps, the last
one at step 35) and continues in epoch 2 after its 12th step (of 23), with the
optimizer's state, the learning-rate schedule and the shuffle order of every
epoch. It
then trains the same model again without interruption and compares.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile

EPOCHS, BATCH, SAVE_FREQ, KILL_BEFORE = 4, 64, 5, 40


def train(args):
    """One run of the job (every process of it)."""
    import keras_strategies as ks  # noqa: I001  (before the backend starts)

    strategy = ks.MultiWorkerMirrored()  # one process, or the launcher's
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype("float32")[:1437], y.astype("int32")[:1437]  # 23 batches an epoch

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10, activation="softmax")])
        schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=20, decay_rate=0.7)
        model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    class KillBefore(keras.callbacks.Callback):  # the preemption, on the last worker
        def on_train_batch_begin(self, batch, logs=None):
            done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if done + 1 == KILL_BEFORE and strategy.worker_index == strategy.num_workers - 1:
                os.kill(os.getpid(), signal.SIGKILL)

    def fit(model, backup_dir, callbacks=()):
        backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=SAVE_FREQ)
        return model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, distribution=strategy,
                         callbacks=[backup, *callbacks])

    model = build()
    history = fit(model, args.backup, [KillBefore()] if args.kill else [])
    reference = build()  # every process of the job trains it (a synchronous job)
    fit(reference, tempfile.mkdtemp())
    if not strategy.is_chief:
        return
    print(f"run 2 trained epochs {[e + 1 for e in history.epoch]} of {EPOCHS} "
          f"({int(keras.ops.convert_to_numpy(model.optimizer.iterations))} steps in all), "
          f"accuracy {history.history['accuracy'][-1]:.3f}")
    difference = max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights()))
    same = "equal" if difference < 1e-5 else "DIFFER FROM"
    print(f"final weights {same} the uninterrupted run (largest difference {difference:.2g})")


def run(args, *options):
    command = [sys.executable, os.path.abspath(__file__), "--train", "--backup", args.backup, *options]
    if args.processes > 1:
        command[1:1] = ["-m", "keras_strategies.launch", "--nproc-per-node", str(args.processes)]
    return subprocess.run(command, timeout=600).returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--train", action="store_true", help="one run of the job (started by this script)")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the job before step 40")
    parser.add_argument("--backup", default=None)
    args = parser.parse_args()
    if args.train:
        return train(args)
    args.backup = args.backup or os.path.join(tempfile.mkdtemp(), "backup")
    code = run(args, "--kill")
    print(f"run 1 ended with exit code {code} (killed before step {KILL_BEFORE}); "
          f"backups: {sorted(os.listdir(args.backup))}")
    sys.stdout.flush()
    if run(args) != 0:
        raise SystemExit("run 2 failed")


if __name__ == "__main__":
    main()
