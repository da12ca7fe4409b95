"""One run patch's gain, in one process: ours with it and without it, in turns.

    KERAS_BACKEND=jax python benchmarks/patch_ab.py --patch unread-batch-logs --strategy mirrored

One process builds two identical models and trains both under the same
one-process strategy (`fit(distribution=...)`): A with every patch of ours, B
with the patch named by `--patch` left out (`keras_strategies.patches.active`
skips it, so B runs Keras's own code there). Their `fit` calls alternate, A B
B A ..., each `--epochs` epochs of `--steps` steps, the first fit of each left
out (tracing, compilation), so both run in the same process, mode and minute:
a gain of a few percent that run.py's fresh processes would hide in their
spread shows here. Threads and devices as run.py's worker (one intra-op
thread per replica; XLA one thread per device). Prints every fit's epochs,
the median samples/s of each, and A / B; `--out` writes them as JSON.

Only "run" patches (`keras_strategies.patches.PATCHES`, scope "run") can be
left out this way; the strategy is one of the one-process ones.
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
from run import machine, versions  # noqa: E402  (run.py's record of the machine and versions)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--patch", required=True, help="the run patch to leave out in B")
parser.add_argument("--strategy", default="mirrored", choices=["mirrored", "central_storage", "one_device"])
parser.add_argument("--replicas", type=int, default=2, help="CPU devices (mirrored, central_storage)")
add_one_process_arguments(parser, optimizer="sgd")
parser.add_argument("--out", default=None)
args = parser.parse_args()

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
replicas = 1 if args.strategy == "one_device" else args.replicas
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(replicas)
    tf.config.threading.set_inter_op_parallelism_threads(replicas)
elif BACKEND == "torch":
    import torch

    torch.set_num_threads(replicas)
    torch.set_num_interop_threads(1)

import keras_strategies as ks  # noqa: E402  (before the backend starts: it sets the devices up)
from keras_strategies import patches  # noqa: E402

if patches.get(args.patch).scope != "run":
    raise SystemExit(f"--patch {args.patch}: not a run patch (scope {patches.get(args.patch).scope!r})")
devices = [f"cpu:{i}" for i in range(replicas)]
strategy = {"mirrored": lambda: ks.Mirrored(devices=devices),
            "central_storage": lambda: ks.CentralStorage(devices=devices),
            "one_device": lambda: ks.OneDevice("cpu:0")}[args.strategy]()

import keras  # noqa: E402
import numpy as np  # noqa: E402

x, y = make_data(args.workload, args.steps * args.batch)
active = patches.active
left_out = [False]


def filtered(names):
    """`patches.active`, less `--patch` while B runs."""
    return active([name for name in names if not (left_out[0] and name == args.patch)])


patches.active = filtered
applied = {}


class EpochTimer(keras.callbacks.Callback):
    def __init__(self, method):
        super().__init__()
        self.method, self.seconds = method, []

    def on_epoch_begin(self, epoch, logs=None):
        applied[self.method] = patches.applied()
        self._begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        float(np.asarray(keras.ops.convert_to_numpy(logs["loss"])))  # the step has finished
        self.seconds.append(time.perf_counter() - self._begin)


models = {m: compiled_keras(args.workload, args.optimizer) for m in "AB"}


def fit(method):
    timer = EpochTimer(method)
    left_out[0] = method == "B"
    models[method].fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=False, verbose=0,
                       callbacks=[timer], distribution=strategy)
    return [x.shape[0] / s for s in timer.seconds]


fit("A"), fit("B")  # tracing and compilation, left out
if args.patch not in applied["A"] or args.patch in applied["B"]:
    raise SystemExit(f"{args.patch} was not applied to A and left out of B: A {applied['A']}, B {applied['B']}")
epochs = {"A": [], "B": []}
for r in range(args.rounds):
    for m in ("AB" if r % 2 == 0 else "BA"):
        got = fit(m)
        epochs[m].extend(got)
        print(f"round {r} {m}: " + " ".join(f"{v:.0f}" for v in got), flush=True)


a, b = statistics.median(epochs["A"]), statistics.median(epochs["B"])
print(f"{BACKEND} {args.strategy} ({replicas} replicas) {args.workload} {args.optimizer}: with {args.patch} "
      f"{a:.0f}, without {b:.0f} samples/s (median of {len(epochs['A'])} epochs each): with / without "
      f"{a / b:.3f}", flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump(dict(backend=BACKEND, options=vars(args), samples_per_s=epochs, median_with=a, median_without=b,
                       ratio=a / b, patches_applied=applied, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       machine=machine(), versions=versions(),
                       load_average=os.getloadavg()), f, indent=1)
