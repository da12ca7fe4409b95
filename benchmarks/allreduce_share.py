"""PyTorch MultiWorkerMirrored: what a step's all-reduce costs at 2 processes,
against the same 2 processes with the all-reduce taken out, and 1 process.

    python benchmarks/allreduce_share.py                  # CNN, 3 rounds of the three ways, in turns
    python benchmarks/allreduce_share.py --workload bn_convnet --rounds 2 --out /tmp/share.txt

Issue 15 asks 2 replicas to reach 0.85 of twice one replica's throughput;
run.py reads 0.82 for ours on the CNN on a 2-core VM. Each round runs three
jobs, one after the other, through `keras_strategies.launch`, every process
pinned to one core and on one torch thread, as run.py runs them: `one` (1
process, global batch 256), `two` (2 processes, 128 each) and `two, no
all-reduce` (the same, with DDP's communication hook returning its bucket
as it is: no communication, so the replicas drift apart; a timing only).
Each prints per rank the mean step time (ms) over the epochs after the
first, and the hook's time from its call to the summed bucket (the
all-reduce and the wait for the other process: median and mean).

Scaling by step time = one's step / (2 x two's slower rank's step): the
throughput ratio run.py reports, from mean step times. `two, no all-reduce`
is then the scaling of two processes that compute the same and never
communicate, so `two` against it is what the all-reduce costs.
Writes OUT (the printed table) when given.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, EPOCHS, BATCH = 40, 4, 256


def worker(mode, workload):
    """One rank: trains and prints one JSON line of its timings."""
    rank = int(os.environ.get("RANK", "0"))
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    sys.path.insert(0, HERE)
    import keras_strategies as ks

    strategy = ks.MultiWorkerMirrored()
    import keras
    import numpy as np
    import torch

    from keras_strategies.backends.torch import ddp
    from workloads import build_keras, make_data

    torch.set_num_threads(1)
    hook_seconds = []

    def timed_hook(self, state, bucket):
        start = time.perf_counter()
        if mode == "no_allreduce":
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        def done(future):
            hook_seconds.append(time.perf_counter() - start)
            return future.value()[0]

        return self._group.allreduce([bucket.buffer()]).get_future().then(done)

    ddp.DataParallelStep._comm_hook = timed_hook
    step_seconds = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            step_seconds.append(time.perf_counter() - self.start)

    x, y = make_data(workload, BATCH * STEPS)
    model = build_keras(workload)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[StepTimes()],
              distribution=strategy)
    steps = np.array(step_seconds[STEPS:]) * 1e3  # the first epoch left out
    hooks = np.array(hook_seconds[STEPS:] or [0.0]) * 1e3
    print("SHARE " + json.dumps({"rank": rank, "step_ms": float(steps.mean()),
                                 "hook_median_ms": float(np.median(hooks)), "hook_mean_ms": float(hooks.mean())}),
          flush=True)


def job(mode, workload, processes, timeout):
    """Launches one job; returns its ranks' JSON lines."""
    env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "keras_strategies.launch", "--nproc-per-node", str(processes),
               "--timeout", str(timeout), os.path.abspath(__file__), "--worker", mode, "--workload", workload]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + 60)
    lines = [json.loads(line.split("SHARE ", 1)[1]) for line in done.stdout.splitlines() if "SHARE " in line]
    if done.returncode != 0 or len(lines) != processes:
        raise SystemExit(f"{mode} x{processes} failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                         f"\n{done.stderr[-2000:]}")
    return sorted(lines, key=lambda line: line["rank"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="cnn", choices=["mlp", "cnn", "bn_convnet"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds a job may take")
    parser.add_argument("--out")
    parser.add_argument("--worker", choices=["allreduce", "no_allreduce"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.workload)
    out = [f"benchmarks/allreduce_share.py --workload {args.workload} --rounds {args.rounds}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; step ms: mean over epochs 2-{EPOCHS} of "
           f"{STEPS} steps; hook ms: median / mean per rank",
           "", "| round | one: step ms | two: step ms (rank 0 / 1) | two: hook ms (rank 0 / 1) "
           "| two, no all-reduce: step ms | scaling, two | scaling, no all-reduce |", "|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    for round_ in range(1, args.rounds + 1):
        one = job("allreduce", args.workload, 1, args.timeout)[0]
        two = job("allreduce", args.workload, 2, args.timeout)
        apart = job("no_allreduce", args.workload, 2, args.timeout)
        slow, slow_apart = max(r["step_ms"] for r in two), max(r["step_ms"] for r in apart)
        line = (f"| {round_} | {one['step_ms']:.2f} | {two[0]['step_ms']:.2f} / {two[1]['step_ms']:.2f} | "
                f"{two[0]['hook_median_ms']:.2f}, {two[0]['hook_mean_ms']:.2f} / "
                f"{two[1]['hook_median_ms']:.2f}, {two[1]['hook_mean_ms']:.2f} | "
                f"{apart[0]['step_ms']:.2f} / {apart[1]['step_ms']:.2f} | {one['step_ms'] / (2 * slow):.3f} | "
                f"{one['step_ms'] / (2 * slow_apart):.3f} |")
        out.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
