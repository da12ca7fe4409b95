"""PyTorch MultiWorkerMirrored: where the second process's time goes. One
process against two, with and without the all-reduce, and how much of the
two-process step is the wait for the other process's slower steps.

    python benchmarks/allreduce_share.py                          # ours, CNN, 3 rounds, in turns
    python benchmarks/allreduce_share.py --method ks,torch --rounds 4  # and a plain torch.nn DDP loop, in turns
    python benchmarks/allreduce_share.py --workload bn_convnet --rounds 2 --out /tmp/share.txt

Issue 15 asks 2 replicas to reach 0.85 of twice one replica's throughput.
Each round runs three jobs, one after the other, through
`keras_strategies.launch`, every process pinned to one core and on one torch
thread, as run.py runs them: `one` (1 process, global batch 256), `two` (2
processes, 128 each) and `free` (the same two, with DDP's communication hook
returning its bucket as it is: no communication, so each process runs at its
own pace and the replicas drift apart; a timing only).

`--method ks` is ours (`fit(distribution=MultiWorkerMirrored())`, its DDP
hook timed); `--method torch` the native way with its batches in memory: a
plain `torch.nn` model of the same layers in `DistributedDataParallel` with
an all-reduce hook of the same kind (a timing twin of DDP's default hook),
`torch.optim`'s optimizer, each rank slicing its part of the global batch
from tensors in memory.

A step's time is from the end of the step before to the end of this one
(data, callbacks and all: what a user's step costs), over every epoch after
the first, leaving out each epoch's first step. Printed per round: the step's
mean (one; two, the slower rank; free, each rank) and the standard deviation
of the free ranks' steps; `E[max]`, the mean of max(a, b) over random pairings
of the free ranks' steps, which is what two ranks that must wait for each
other at every step would take if nothing else changed; `+ all-reduce`, that
plus the median time in the hook of the rank that waits there least (the
one that mostly arrives last: gloo's all-reduce itself, the other rank having
arrived); and the scalings: `two` (one's step /
(2 x two's step), the throughput ratio run.py reports), `free` (the same from
the free slower rank's mean: no communication, no waiting), `predicted` (from
`+ all-reduce`). When `predicted` is close to `two`, what `two` loses beyond
the all-reduce is the steps' own spread, not a cost of the strategy.
Writes OUT (the printed table) and JSON (every step time) when given.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 256


def _steps_after_first_epoch(ends, steps):
    """Step times (ms) from step-end timestamps, every epoch after the first,
    each epoch's first step left out (its time would span the epoch boundary)."""
    out = []
    for epoch in range(1, len(ends) // steps):
        stamps = ends[epoch * steps:(epoch + 1) * steps]
        out += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return out


def worker(method, mode, workload, steps, epochs):
    """One rank: trains and prints one JSON line of its timings."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    sys.path.insert(0, HERE)
    import numpy as np
    import torch

    from workloads import build_keras, build_torch, make_data

    torch.set_num_threads(1)
    hook_seconds = []
    step_ends = []

    def timed(start, future):
        """The hook's future, recording the time from the call to the summed bucket."""
        def done(fut):
            hook_seconds.append(time.perf_counter() - start)
            return fut.value()[0]

        return future.then(done)

    def returned_as_is(bucket):
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    x, y = make_data(workload, BATCH * steps)
    if method == "ks":
        import keras_strategies as ks

        strategy = ks.MultiWorkerMirrored()
        import keras

        from keras_strategies.backends.torch import ddp

        def timed_hook(self, state, bucket):
            start = time.perf_counter()
            if mode == "free":
                return returned_as_is(bucket)
            return timed(start, self._group.allreduce([bucket.buffer()]).get_future())

        ddp.DataParallelStep._comm_hook = timed_hook

        class StepEnds(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                step_ends.append(time.perf_counter())

        model = build_keras(workload)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[StepEnds()],
                  distribution=strategy)
    else:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=120))
        torch.manual_seed(0)
        xs = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x  # NHWC -> NCHW
        xt, yt = torch.from_numpy(xs), torch.from_numpy(y.astype("int64"))
        part = BATCH // world
        model = DDP(build_torch(workload))

        def hook(state, bucket):  # DDP's default all-reduce hook (average), timed
            start = time.perf_counter()
            if mode == "free":
                return returned_as_is(bucket)
            return timed(start, dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future())

        model.register_comm_hook(None, hook)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(epochs):
            for i in range(0, steps * BATCH, BATCH):
                xb, yb = xt[i + rank * part:i + (rank + 1) * part], yt[i + rank * part:i + (rank + 1) * part]
                loss = loss_fn(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_ends.append(time.perf_counter())
    step_ms = _steps_after_first_epoch(step_ends, steps)
    hooks = [s * 1e3 for s in hook_seconds[steps:]] or [0.0]
    print("SHARE " + json.dumps({"rank": rank, "step_ms": step_ms, "hook_ms": hooks}), flush=True)
    if method == "torch":  # the timings are out; skip the loop's teardown: gloo's threads aborted
        dist.barrier()  # one rank at exit once in 12 two-process jobs ("terminate called without an
        sys.stderr.flush()  # active exception", exit 134), with the wrapper deleted before the group
        os._exit(0)


def job(method, mode, workload, processes, steps, epochs, timeout):
    """Launches one job; returns its ranks' timings, rank 0 first."""
    env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "keras_strategies.launch", "--nproc-per-node", str(processes),
               "--timeout", str(timeout), os.path.abspath(__file__), "--worker", mode, "--method", method,
               "--workload", workload, "--steps", str(steps), "--epochs", str(epochs)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout + 60)
    lines = [json.loads(line.split("SHARE ", 1)[1]) for line in done.stdout.splitlines() if "SHARE " in line]
    if done.returncode != 0 or len(lines) != processes:
        raise SystemExit(f"{method} {mode} x{processes} failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                         f"\n{done.stderr[-2000:]}")
    return sorted(lines, key=lambda line: line["rank"])


def summarize(one, two, free, seed=0):
    """One round's figures (ms and scalings) from its three jobs' timings."""
    import numpy as np

    mean = lambda r: float(np.mean(r["step_ms"]))  # noqa: E731
    a, b = (np.array(r["step_ms"]) for r in free)
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    e_max = float(np.mean([np.maximum(rng.permutation(a)[:n], rng.permutation(b)[:n]).mean()
                           for _ in range(200)]))
    slow_two = max(mean(r) for r in two)
    allreduce = min(float(np.median(r["hook_ms"])) for r in two)  # the rank that arrived last waits least
    one_ms = mean(one[0])
    return {"one_ms": one_ms, "two_ms": slow_two, "allreduce_ms": allreduce, "free_ms": [mean(r) for r in free],
            "free_std_ms": [float(a.std()), float(b.std())], "e_max_ms": e_max, "predicted_ms": e_max + allreduce,
            "scaling_two": one_ms / (2 * slow_two), "scaling_free": one_ms / (2 * max(mean(r) for r in free)),
            "scaling_predicted": one_ms / (2 * (e_max + allreduce))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="ks",
                        help="comma-separated, in turns each round: ks (ours' fit), torch (a plain torch.nn DDP "
                             "loop, batches in memory)")
    parser.add_argument("--workload", default="cnn", choices=["mlp", "cnn", "bn_convnet"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps an epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs a job; the first is left out")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a job may take")
    parser.add_argument("--out", help="write the printed table here")
    parser.add_argument("--json", help="write every round's step times here")
    parser.add_argument("--worker", choices=["two", "free"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = args.method.split(",")
    if not set(methods) <= {"ks", "torch"}:
        parser.error(f"--method {args.method}: each must be ks or torch")
    if args.epochs < 2 or args.steps < 3:
        parser.error("--epochs must be >= 2 and --steps >= 3: the first epoch and each epoch's first step are left out")
    if args.worker:
        return worker(args.method, args.worker, args.workload, args.steps, args.epochs)
    out = [f"benchmarks/allreduce_share.py --method {args.method} --workload {args.workload} --rounds {args.rounds}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; ms a step, mean over epochs 2-{args.epochs} of "
           f"{args.steps} steps (each epoch's first left out)", "",
           "| round | method | one | two (slower rank) | free (rank 0 / 1) | free: std (rank 0 / 1) | free: E[max] "
           "| + all-reduce | scaling: two | free | predicted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    rounds = []
    for round_ in range(1, args.rounds + 1):
        for method in methods if round_ % 2 else methods[::-1]:  # A B, B A: a drift favours neither
            runs = {name: job(method, "free" if name == "free" else "two", args.workload, n, args.steps,
                              args.epochs, args.timeout)
                    for name, n in (("one", 1), ("two", 2), ("free", 2))}
            s = summarize(runs["one"], runs["two"], runs["free"], seed=round_)
            rounds.append({"round": round_, "method": method, **s, "runs": runs})
            line = (f"| {round_} | {method} | {s['one_ms']:.2f} | {s['two_ms']:.2f} | "
                    f"{s['free_ms'][0]:.2f} / {s['free_ms'][1]:.2f} | "
                    f"{s['free_std_ms'][0]:.2f} / {s['free_std_ms'][1]:.2f} | {s['e_max_ms']:.2f} | "
                    f"{s['predicted_ms']:.2f} | {s['scaling_two']:.3f} | {s['scaling_free']:.3f} | "
                    f"{s['scaling_predicted']:.3f} |")
            out.append(line)
            print(line, flush=True)
    out.append("")
    for method in methods:
        mine = [r for r in rounds if r["method"] == method]
        med = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
        out.append(f"{method}: median over rounds, scaling two {med('scaling_two'):.3f}, free "
                   f"{med('scaling_free'):.3f}, predicted {med('scaling_predicted'):.3f}")
        print(out[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"methods": methods, "workload": args.workload, "rounds": rounds}, f)


if __name__ == "__main__":
    main()
