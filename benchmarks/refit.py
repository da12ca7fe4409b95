"""Repeated `fit` calls under Mirrored over 2 CPU replicas: what a second call costs.

    python benchmarks/refit.py                          # TensorFlow and JAX, 4 alternating rounds
    python benchmarks/refit.py --backends jax --rounds 1 --fits 2   # smoke

Each method runs in its own process, 2 replicas on one thread each, the
benchmark MLP (784-256-256-10, Adam, global batch 256, 20 steps of 1 epoch per
call), `--fits` calls of `fit` on the same model one after the other:

- `ks_fit`: `model.fit(..., distribution=ks.Mirrored(devices))` at every call;
- `ks_scope`: the model built and compiled in `ks.Mirrored(devices).scope()`,
  then plain `fit`;
- `native`: `tf.distribute.MirroredStrategy` scope + `fit` (TensorFlow), or
  `keras.distribution.DataParallel` (JAX).

The first call traces (compiles) the step; a later call that traces again
pays that cost again. Prints the first call's seconds and the median of the
later calls' seconds per method (median over rounds); `--out` writes JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

JOB = r"""
import json, os, sys, time
backend, method, fits, out = os.environ["KERAS_BACKEND"], sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, os.environ["KS_BENCH_DIR"])
from workloads import build_keras, make_data, set_seed
if backend == "tensorflow":
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
devices = ["cpu:0", "cpu:1"]
if method.startswith("ks"):
    import keras_strategies as ks
    strategy = ks.Mirrored(devices=devices)
import keras
if method == "native" and backend == "tensorflow":
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    native = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif method == "native":
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
x, y = make_data("mlp", 20 * 256)
set_seed(0)
def build():
    model = build_keras("mlp")
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
if method == "ks_scope":
    with strategy.scope():
        model = build()
elif method == "native" and backend == "tensorflow":
    scope = native.scope()
    with scope:
        model = build()
else:
    model = build()
kwargs = {"distribution": strategy} if method == "ks_fit" else {}
seconds = []
for _ in range(fits):
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=256, epochs=1, shuffle=False, verbose=0, **kwargs)
    float(history.history["loss"][-1])
    seconds.append(time.perf_counter() - start)
with open(out, "w") as f:
    json.dump(seconds, f)
"""

METHODS = ("ks_fit", "ks_scope", "native")


def run(backend, method, fits, directory):
    script = os.path.join(directory, "job.py")
    with open(script, "w") as f:
        f.write(JOB)
    out = os.path.join(directory, f"{backend}-{method}.json")
    env = {**os.environ, "KERAS_BACKEND": backend, "KS_BENCH_DIR": HERE, "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, script, method, str(fits), out], env=env, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} {method} failed:\n{proc.stdout[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--fits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for backend in args.backends.split(","):
            seen = {m: [] for m in METHODS}
            for round_ in range(args.rounds):
                for method in METHODS if round_ % 2 == 0 else METHODS[::-1]:  # A B C, C B A, ...
                    seen[method].append(run(backend, method, args.fits, directory))
            results[backend] = {
                m: {"first_s": statistics.median(r[0] for r in runs),
                    "later_s": statistics.median(s for r in runs for s in r[1:]),
                    "runs": runs}
                for m, runs in seen.items()
            }
            for m, r in results[backend].items():
                print(f"{backend:10} {m:9} first fit {r['first_s']:.2f} s, later fits {r['later_s']:.2f} s "
                      f"(median of {args.rounds} rounds)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
