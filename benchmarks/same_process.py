"""`Default()` and plain Keras `fit` alternating in one process.

    KERAS_BACKEND=tensorflow python benchmarks/same_process.py

`run.py` starts a fresh process for every measured run, so a cell's ratio also
holds the spread between processes (a TensorFlow process with several
threads runs a whole run in a fast or a slow mode; the VM's speed drifts).
Here one process builds two identical models, one trained with
`fit(distribution=keras_strategies.Default())` (A), one with plain `fit` (B),
and calls their `fit` in turns, A B B A A B ..., so both run in the
same process, mode and minute. Each `fit` runs `--epochs` epochs; the first
`fit` of each method (tracing, compilation) is left out. Prints every epoch,
the median samples/s of each method, the median of the paired ratios (each A
fit against the B fit beside it), and, counted, so free of timing noise: the
Python function calls of each per step and inside an epoch's clock, and on
TensorFlow the operations of each model's traced training step by type (equal
counts: the same graph runs each step); `--out` writes them as JSON.

Only `Default` is offered: two TensorFlow `MirroredStrategy` instances in one
process share collective keys (backends/tensorflow/local.py). One strategy
with and without one of its patches, in one process: benchmarks/patch_ab.py.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")  # as run.py

from workloads import add_one_process_arguments, compiled_keras, make_data  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
add_one_process_arguments(parser)
parser.add_argument("--control", action="store_true",
                    help="A/A control: model A also runs plain fit (no distribution=), so the ratio shows what "
                         "the two models and their turns alone make of it")
parser.add_argument("--swap", action="store_true",
                    help="build the native model first and ours second (by default ours is built first), to "
                         "see whether the order of the two models' creation favours one")
parser.add_argument("--out", default=None)
args = parser.parse_args()

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
elif BACKEND == "torch":
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_strategies as ks  # noqa: E402

strategy = ks.Default()
x, y = make_data(args.workload, args.steps * args.batch)


def count_calls(calls):
    """Starts counting Python function calls into `calls[0]` (until
    `sys.setprofile(None)`)."""

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1

    sys.setprofile(profile)


class EpochTimer(keras.callbacks.Callback):
    """Each epoch's seconds; with `count`, the Python function calls made
    inside each epoch's clock instead (what the measured window runs)."""

    def __init__(self, count=False):
        super().__init__()
        self.seconds, self.calls, self.count = [], [], count

    def on_epoch_begin(self, epoch, logs=None):
        if self.count:
            self.calls.append([0])
            count_calls(self.calls[-1])
        self._begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        float(np.asarray(keras.ops.convert_to_numpy(logs["loss"])))  # the step has finished
        self.seconds.append(time.perf_counter() - self._begin)
        if self.count:
            sys.setprofile(None)


def build():
    return compiled_keras(args.workload, args.optimizer)


models = {"B": build(), "A": build()} if args.swap else {"A": build(), "B": build()}


def fit(method, steps=None, epochs=None, timer=None):
    timer = timer or EpochTimer()
    n = (steps or args.steps) * args.batch
    kwargs = dict(batch_size=args.batch, epochs=epochs or args.epochs, shuffle=False, verbose=0,
                  callbacks=[timer])
    if method == "A" and not args.control:
        models["A"].fit(x[:n], y[:n], distribution=strategy, **kwargs)
    else:
        models[method].fit(x[:n], y[:n], **kwargs)
    return [n / s for s in timer.seconds]


def python_calls_per_step(method, steps):
    """Python function calls per training step, counted: those of a 1-epoch
    fit of 2 * `steps` steps less those of one of `steps` steps, per step (what
    a fit costs once cancels out). No timing noise: equal counts mean our
    `fit(distribution=...)` runs the very same Python per step."""
    counts = []
    for n in (steps, 2 * steps):
        calls = [0]
        count_calls(calls)
        try:
            fit(method, steps=n, epochs=1)
        finally:
            sys.setprofile(None)
        counts.append(calls[0])
    return (counts[1] - counts[0]) / steps


def graph_ops(model):
    """TensorFlow: the operations of the traced training step (Keras's
    `multi_step_on_iterator` and the functions it calls), counted by type."""
    import collections

    function = model.train_function
    cells = dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__)))
    counts = collections.Counter()
    for concrete in cells["multi_step_on_iterator"]._list_all_concrete_functions():
        graph = concrete.graph.as_graph_def()
        counts.update(node.op for node in graph.node)
        counts.update(node.op for library in graph.library.function for node in library.node_def)
    return counts


fit("A"), fit("B")  # tracing and compilation, left out
ops = {}
if BACKEND == "tensorflow":
    ops = {m: graph_ops(models[m]) for m in "AB"}
    differing = sorted(k for k in set(ops["A"]) | set(ops["B"]) if ops["A"][k] != ops["B"][k])
    print(f"Graph operations of the training step: ours {sum(ops['A'].values())}, native "
          f"{sum(ops['B'].values())}, op types whose counts differ: {differing or 'none'}", flush=True)
calls = {m: python_calls_per_step(m, steps=max(1, min(20, args.steps // 2))) for m in "AB"}
print(f"Python calls per step: ours {calls['A']:.1f}, native {calls['B']:.1f}", flush=True)
counters = {m: EpochTimer(count=True) for m in "AB"}
for m in "AB":
    fit(m, epochs=2, timer=counters[m])
epoch_calls = {m: counters[m].calls[-1][0] for m in "AB"}  # the second epoch's: the first holds a new fit's start
print(f"Python calls inside an epoch's clock: ours {epoch_calls['A']}, native {epoch_calls['B']}", flush=True)
epochs = {"A": [], "B": []}
pairs = []
for r in range(args.rounds):
    order = "AB" if r % 2 == 0 else "BA"
    got = {m: fit(m) for m in order}
    for m in order:
        epochs[m].extend(got[m])
        print(f"round {r} {m}: " + " ".join(f"{v:.0f}" for v in got[m]), flush=True)
    pairs.append(statistics.median(got["A"]) / statistics.median(got["B"]))

result = {
    "backend": BACKEND, "strategy": "default", "workload": args.workload,
    "optimizer": args.optimizer, "batch": args.batch, "steps": args.steps, "epochs": args.epochs,
    "rounds": args.rounds, "control": args.control, "swap": args.swap, "samples_per_s": epochs,
    "python_calls_per_step": calls, "python_calls_per_epoch": epoch_calls,
    "graph_ops": {m: dict(sorted(c.items())) for m, c in ops.items()},
    "median_A": statistics.median(epochs["A"]), "median_B": statistics.median(epochs["B"]),
    "paired_ratios": pairs, "median_paired_ratio": statistics.median(pairs),
}
label = " (control: A is plain fit too)" if args.control else ""
label += " (native built first)" if args.swap else ""
print(f"{BACKEND} default {args.workload} {args.optimizer}{label}: "
      f"ours {result['median_A']:.0f}, native {result['median_B']:.0f} samples/s; "
      f"ours / native {result['median_A'] / result['median_B']:.3f}; paired ratios "
      + " ".join(f"{p:.3f}" for p in pairs) + f" (median {result['median_paired_ratio']:.3f})")
if args.out:
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
