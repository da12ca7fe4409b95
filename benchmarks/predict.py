"""`predict` under MultiWorkerMirrored: 1 worker against 2, per backend.

    python benchmarks/predict.py                       # every backend, 3 alternating rounds
    python benchmarks/predict.py --backends torch --rows 32768 --rounds 1   # smoke

Each worker predicts its share of the rows (the split `predict` does under
MultiWorkerMirrored), then every worker holds all predictions in input order.
For each backend the jobs alternate, 1 process then 2, `--rounds` times, each
through `keras-strategies launch` with one intra-op thread and one core
(rank k on core k) per process; the
time is the median of `--calls` predict calls after a first one (tracing,
compiling) in each job. Prints rows per second and the 2-worker speed-up
(the physical limit is 2.0 on 2 idle cores); `--out` writes them as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

JOB = r"""
import json, os, statistics, sys, time
# each worker on a core of its own, as on a machine of its own (the thread
# settings alone leave JAX's runtime using every core)
cores = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", "0")) % len(cores)]})
import keras_strategies as ks
strategy = ks.MultiWorkerMirrored()
import keras, numpy as np
rows, calls, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
x = np.random.default_rng(0).normal(size=(rows, 784)).astype("float32")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                          keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10)])
model.predict(x[:4096], batch_size=1024, verbose=0, distribution=strategy)  # traces, compiles
times = []
for _ in range(calls):
    start = time.perf_counter()
    predictions = model.predict(x, batch_size=1024, verbose=0, distribution=strategy)
    times.append(time.perf_counter() - start)
assert predictions.shape == (rows, 10), predictions.shape
if strategy.is_chief:
    with open(out, "w") as f:
        json.dump({"seconds": statistics.median(times), "checksum": float(np.sum(predictions[::997]))}, f)
"""


def run_job(backend, processes, rows, calls, directory):
    script = os.path.join(directory, "job.py")
    with open(script, "w") as f:
        f.write(JOB)
    out = os.path.join(directory, f"{backend}-{processes}.json")
    # one compute thread and one core per process, whatever the number of
    # processes: each worker stands for one machine of fixed size (left to the
    # launcher, one process would get every core and two would share them: no
    # speed-up to see)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    subprocess.run([sys.executable, "-m", "keras_strategies.launch", "--nproc-per-node", str(processes),
                    script, str(rows), str(calls), out], env=env, check=True, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(out) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for backend in args.backends.split(","):
            seconds = {1: [], 2: []}
            checksums = set()
            for _ in range(args.rounds):
                for processes in (1, 2):
                    result = run_job(backend, processes, args.rows, args.calls, directory)
                    seconds[processes].append(result["seconds"])
                    checksums.add(round(result["checksum"], 2))
            one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
            results[backend] = {"rows": args.rows, "rows_per_s_1": args.rows / one, "rows_per_s_2": args.rows / two,
                                "speedup": one / two, "seconds_1": seconds[1], "seconds_2": seconds[2],
                                "same_predictions": len(checksums) == 1}
            print(f"{backend}: 1 worker {args.rows / one:,.0f} rows/s, 2 workers {args.rows / two:,.0f} rows/s, "
                  f"speed-up {one / two:.2f} (rounds: {[f'{a / b:.2f}' for a, b in zip(seconds[1], seconds[2])]}), "
                  f"same predictions: {len(checksums) == 1}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
