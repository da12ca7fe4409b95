"""Run by every worker process of the multi-process tests.

    python tests/mp_worker.py OUT_DIR [--pattern fit_argument|scope] [--epochs N]
        [--die-at-step K] [--hang-at-step K] [--input KIND] [--kind MODEL] [--batch-norm]
        [--count-threads]

The cluster comes from the environment (launcher, TF_CONFIG, ...). Each worker
trains the same model under MultiWorkerMirrored, also trains a single-device
reference on the same global batches, and writes what it saw to OUT_DIR.
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--pattern", default="fit_argument")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--die-at-step", type=int, default=None)
parser.add_argument("--hang-at-step", type=int, default=None)
parser.add_argument("--input", default="numpy", help="numpy, tf_data, py_dataset or torch_dataloader")
parser.add_argument("--batch-norm", action="store_true")
parser.add_argument("--kind", default="functional", help="a model kind of tests/models.py")
parser.add_argument("--coverage", action="store_true",
                    help="first, one shuffled epoch of one-hot examples, then two shuffled fits recording their rows")
parser.add_argument("--count-threads", action="store_true",
                    help="last, a shuffled fit of 2 epochs of 40 steps and a validation each, counting this "
                         "process's threads after each (and, on TensorFlow, the input iterators it makes)")
args = parser.parse_args()

strategy = ks.MultiWorkerMirrored()
rank = strategy.worker_index

import keras  # noqa: E402
keras.config.disable_traceback_filtering()
import numpy as np  # noqa: E402
from models import RecordingCheckpoint, RowCounter, build, initial_weights, listening_sockets, make_data  # noqa: E402,E501

user_dir = os.path.join(args.out, "user")
os.makedirs(user_dir, exist_ok=True)


class Fault(keras.callbacks.Callback):
    """Worker 1 dies or hangs mid-epoch, to test that the others notice."""

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if rank == 1 and step == args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and step == args.hang_at_step:
            while True:
                time.sleep(1)


if args.coverage:
    # Example i only moves weight i (one-hot inputs, no bias), from 0 to
    # 2 * lr / batch if it is seen exactly once in the epoch.
    n = 64
    coverage = keras.Sequential([keras.Input((n,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    coverage.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    coverage.fit(np.eye(n, dtype="float32"), np.ones((n, 1), "float32"), batch_size=16, epochs=1,
                 shuffle=True, verbose=0, distribution=strategy)
    np.save(os.path.join(args.out, f"coverage{rank}.npy"), coverage.get_weights()[0][:, 0])
    # two more shuffled fits: the rows this worker computes, in order (row k has k as its feature)
    probe = keras.Sequential([keras.Input((1,)), RowCounter(), keras.layers.Dense(1)])
    probe.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    orders = []
    for _ in range(2):
        probe.layers[0].rows.clear()
        probe.fit(np.arange(n, dtype="float32")[:, None], np.zeros((n, 1), "float32"), batch_size=16, epochs=1,
                  shuffle=True, verbose=0, distribution=strategy)
        orders.append(list(probe.layers[0].rows))
    with open(os.path.join(args.out, f"orders{rank}.json"), "w") as f:
        json.dump(orders, f)

x, y = make_data()
weights = initial_weights(args.kind, args.batch_norm)
threshold = -1.0
if args.die_at_step or args.hang_at_step:
    x, y = make_data(n=4096)
    args.epochs = 50
else:  # a loss between one device's first and second epochs: stop after 2
    losses = build(args.kind, weights, args.batch_norm).fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    threshold = (losses[0] + losses[1]) / 2


class StopBelow(keras.callbacks.Callback):
    """Stops when the epoch's loss is below `threshold`: a decision that the
    workers take alike only if each sees the global loss, not its own part's."""

    def on_epoch_end(self, epoch, logs=None):
        if logs["loss"] < threshold:
            self.model.stop_training = True


saves = os.path.join(args.out, "saves.txt")
callbacks = [
    RecordingCheckpoint(os.path.join(user_dir, "ckpt.weights.h5"), saves, save_weights_only=True),
    keras.callbacks.CSVLogger(os.path.join(user_dir, "log.csv")),
    keras.callbacks.BackupAndRestore(os.path.join(user_dir, "backup"), delete_checkpoint=False),
    StopBelow(),
    Fault(),
]
fit = dict(epochs=args.epochs, shuffle=False, verbose=2, callbacks=callbacks)


def data():
    if args.input == "numpy":
        return (x, y), {"batch_size": 16}
    from test_inputs import make_input  # tf.data, PyDataset, DataLoader of batches of 16

    return make_input(args.input, x, y)


inputs, batching = data()
if args.pattern == "scope":
    with strategy.scope():
        model = build(args.kind, weights, args.batch_norm)
    history = model.fit(*inputs, **batching, **fit)
else:
    # a different start on every worker: worker 0's weights must win
    model = build(args.kind, [w + rank for w in weights], args.batch_norm)
    # before any fit: worker 0's weights already (predict/evaluate/fit alike)
    before = model.predict(x, batch_size=16, verbose=0, distribution=strategy)
    evaluation_before = model.evaluate(x, y, batch_size=16, verbose=0, distribution=strategy)
    history = model.fit(*inputs, **batching, distribution=strategy, **fit)
inputs, batching = data()
evaluation = model.evaluate(*inputs, **batching, verbose=0, distribution=strategy)
predictions = model.predict(x, batch_size=16, verbose=0, distribution=strategy)

reference = build(args.kind, weights, args.batch_norm)
ref_before = reference.predict(x, batch_size=16, verbose=0)
ref_evaluation_before = reference.evaluate(x, y, batch_size=16, verbose=0)
ref_history = reference.fit(
    x, y, batch_size=16, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[StopBelow()])

# predict's work is split: each worker computes its contiguous half of 64 rows
# (row k has k as its first feature), not a slice of every batch
indexed = x[:64].copy()
indexed[:, 0] = np.arange(64)
counter = keras.Sequential([keras.Input((x.shape[1],)), RowCounter(), keras.layers.Dense(2)])
counted = counter.predict(indexed, batch_size=16, verbose=0, distribution=strategy)
assert np.allclose(counted, counter.predict(indexed, batch_size=16, verbose=0), atol=1e-6)
counter.layers[0].rows.clear()
counter.predict(indexed, batch_size=16, verbose=0, distribution=strategy)

threads = None
if args.count_threads:  # the threads of a long run must not grow with its steps
    class CountThreads(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            threads.append(len(os.listdir("/proc/self/task")))

    iterators = []  # TensorFlow: the distributed iterators the fit makes over its input
    if keras.backend.backend() == "tensorflow":
        from tensorflow.python.distribute import input_lib

        def counting(original):
            def counting_iter(dataset):
                iterators.append(1)
                return original(dataset)

            return counting_iter

        for cls in (input_lib.DistributedDataset, input_lib.DistributedDatasetsFromFunction):
            cls.__iter__ = counting(cls.__iter__)
    threads, steps_per_epoch = [], 40
    longer_x, longer_y = make_data(n=16 * steps_per_epoch)
    build(args.kind, weights, args.batch_norm).fit(
        longer_x, longer_y, batch_size=16, epochs=2, shuffle=True, verbose=0, callbacks=[CountThreads()],
        validation_data=(x[:32], y[:32]), distribution=strategy)
    threads = {"after_each_epoch": threads, "steps_per_epoch": steps_per_epoch, "iterators": len(iterators)}

np.savez(os.path.join(args.out, f"weights{rank}.npz"), *model.get_weights())
with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump(
        {
            "rank": rank,
            "workers": strategy.num_workers,
            "replicas": strategy.num_replicas_in_sync,
            "is_chief": strategy.is_chief,
            "history": history.history,
            "ref_history": ref_history.history,
            "evaluate": evaluation,
            "ref_evaluate": reference.evaluate(x, y, batch_size=16, verbose=0),
            "max_weight_diff": max(
                float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights())
            ),
            "max_predict_diff": float(np.abs(predictions - reference.predict(x, verbose=0)).max()),
            "predictions": len(predictions),
            "predicted_rows": sorted(counter.layers[0].rows),
            "pid": os.getpid(),
            "listening": listening_sockets(),
            "max_predict_before_diff": (float(np.abs(before - ref_before).max())
                                        if args.pattern != "scope" else 0.0),
            "evaluate_before": evaluation_before if args.pattern != "scope" else ref_evaluation_before,
            "ref_evaluate_before": ref_evaluation_before,
            "threads": threads,
        },
        f,
    )
print(f"worker {rank} done")
