"""The scaling this machine allows with no distribution at all: two
independent one-replica trainings side by side, against one alone.

    python benchmarks/ceiling.py                       # conv nets, every backend, 4 rounds
    python benchmarks/ceiling.py --backends torch --workloads cnn --rounds 1 --epochs 3 --steps 4 --out /tmp/c.json

Issue 15 asks 2 replicas to reach 0.85 of twice one replica's throughput.
run.py's scaling runs one replica at the global batch (256) on one intra-op
thread, and two replicas at half of it each. This script runs the same
worker (`worker.py --method native --strategy default`: plain Keras `fit`,
the thread settings of run.py) three ways, rotating their order each round:

- `alone`: one process, global batch;
- `alone_half`: one process, half the batch (what the batch size alone costs);
- `pair`: two such processes at half the batch at once, started together
  (`KS_BENCH_BARRIER`), pinned to a core each where run.py pins (torch).
  Their throughput counts only epochs that began and ended while both ran.

`ceiling` = pair / (2 x alone): the scaling efficiency of two replicas that
never communicate, so the most any data-parallel way can reach here (its
parts: `batch` = alone_half / alone, `sharing` = pair / (2 x alone_half)),
and `cores busy alone` the CPU seconds a lone process spends per second of
its epochs (above 1: one replica alone already keeps more than a core busy).
`--method torch_ddp` or `keras_ddp` (torch) runs run.py's hand-written DDP
loops instead, each process a DDP job of its own (no all-reduce with the
other): the same loops at 2 processes in run.py then show what their
communication and lockstep cost. `--method ks` runs ours the same way
(`fit(distribution=MultiWorkerMirrored())`, each process a job of one: the
step run.py's one-replica figure measures, with everything ours changes in
a process, such as the host memory it keeps).
Writes OUT (JSON) and OUT's .md (the table), and prints the table.
"""

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import HOST_MEMORY, ROOT, WORKER, machine, median, run_env, versions  # noqa: E402
from workloads import OPTIMIZERS  # noqa: E402

WAYS = ("alone", "alone_half", "pair")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--workloads", default="cnn,bn_convnet")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=256, help="global batch (each of the pair runs half)")
    parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    parser.add_argument("--method", default="native",
                        choices=["native", "ks", "torch_ddp", "torch_ddp_tensors", "keras_ddp"],
                        help="native: plain Keras fit; ks: ours, fit(distribution=MultiWorkerMirrored()), each "
                             "process a job of one; torch: the DDP loops of run.py, each process a job of one")
    parser.add_argument("--pin", choices=["auto", "0", "1"], default="auto",
                        help="pin the pair to a core each: auto = as run.py (torch only)")
    parser.add_argument("--host-memory", default="default", choices=sorted(HOST_MEMORY),
                        help="as run.py's: keep = every process keeps its host memory mapped between steps")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per process")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "ceiling.json"))
    return parser.parse_args(argv)


def free_port():
    """keras_strategies.launch.ports.free_port, loaded from its file: importing
    the package would start Keras and its backend in this parent process."""
    spec = importlib.util.spec_from_file_location("ports", os.path.join(ROOT, "keras_strategies", "launch", "ports.py"))
    ports = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ports)
    return ports.free_port()


def start(backend, batch, args, out, barrier=None, core=None):
    env = run_env(backend, 1, host_memory=args.host_memory)
    env["KS_BENCH_PIN"] = "0"  # pinning, where asked, is done here (worker.py pins ranks of one job)
    if barrier:
        env["KS_BENCH_BARRIER"] = barrier
    strategy = "default"
    if args.method != "native":  # ours or a DDP loop: each process its own one-process job
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        strategy = "multi_worker"
    command = [sys.executable, WORKER, "--method", args.method, "--strategy", strategy, "--replicas", "1",
               "--workload", args.workload, "--epochs", str(args.epochs), "--steps", str(args.steps),
               "--batch", str(batch), "--threads", "1", "--optimizer", args.optimizer, "--out", out]
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen(command, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=pin)


def finish(proc, out, timeout):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise RuntimeError(f"a worker ran over {timeout} s:\n{output[-3000:]}")
    if proc.returncode != 0 or not os.path.exists(f"{out}.rank0.json"):
        raise RuntimeError(f"a worker failed (exit {proc.returncode}):\n{output[-3000:]}")
    with open(f"{out}.rank0.json") as f:
        return json.load(f)


def steady(report, warmup, window=(float("-inf"), float("inf"))):
    """samples/s of each epoch after `warmup` that lies inside `window`, and
    the cores the process kept busy then (its CPU seconds per wall second)."""
    epochs = list(zip(report["epoch_seconds"], report["epoch_cpu_seconds"], report["epoch_wall"]))[warmup:]
    kept = [(seconds, cpu) for seconds, cpu, (begin, end) in epochs if begin >= window[0] and end <= window[1]]
    return [report["samples_per_epoch"] / s for s, _ in kept], [cpu / s for s, cpu in kept]


def measure(way, backend, args, tmp):
    half = args.batch // 2
    if way != "pair":
        out = os.path.join(tmp, f"{way}-{time.time_ns()}")
        report = finish(start(backend, args.batch if way == "alone" else half, args, out), out, args.timeout)
        samples, cores = steady(report, args.warmup_epochs)
        return {"samples_per_s": samples, "cores_busy": median(cores), "method": report["method"]}
    barrier = tempfile.mkdtemp(dir=tmp)
    pin = args.pin == "1" or (args.pin == "auto" and backend == "torch")
    cores = sorted(os.sched_getaffinity(0))
    outs = [os.path.join(tmp, f"pair{i}-{time.time_ns()}") for i in range(2)]
    procs = [start(backend, half, args, out, f"{barrier}:2", cores[i % len(cores)] if pin else None)
             for i, out in enumerate(outs)]
    try:
        reports = [finish(proc, out, args.timeout) for proc, out in zip(procs, outs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # both running: from the later first steady epoch's begin to the earlier last end
    window = (max(r["epoch_wall"][args.warmup_epochs][0] for r in reports),
              min(r["epoch_wall"][-1][1] for r in reports))
    each = [steady(r, args.warmup_epochs, window) for r in reports]
    if not all(samples for samples, _ in each):
        raise RuntimeError(f"the pair's measured epochs did not overlap (window {window}); more --epochs")
    return {"samples_per_s": [median(samples) for samples, _ in each],
            "epochs_counted": [len(samples) for samples, _ in each],
            "cores_busy": [median(cores) for _, cores in each], "cores": [r.get("cores") for r in reports],
            "method": [r["method"] for r in reports]}


def main(argv=None):
    args = parse(argv)
    if args.batch % 2:
        raise SystemExit(f"--batch {args.batch}: must be even (each of the pair trains on half)")
    if args.epochs <= args.warmup_epochs + 1:
        raise SystemExit(f"--epochs {args.epochs}: needs at least {args.warmup_epochs + 2} "
                         f"(--warmup-epochs {args.warmup_epochs} left out, then two measured)")
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for workload in args.workloads.split(","):
                args.workload = workload
                runs = {way: [] for way in WAYS}
                for round_ in range(args.rounds):
                    order = WAYS[round_ % 3:] + WAYS[:round_ % 3]
                    for way in order:
                        got = measure(way, backend, args, tmp)
                        runs[way].append(got)
                        print(f"{backend} {workload} round {round_ + 1} {way}: "
                              f"{[round(v) for v in got['samples_per_s']]} samples/s", flush=True)
                alone = median([v for r in runs["alone"] for v in r["samples_per_s"]])
                half = median([v for r in runs["alone_half"] for v in r["samples_per_s"]])
                pair = median([sum(r["samples_per_s"]) for r in runs["pair"]])
                results.append(dict(backend=backend, workload=workload, runs=runs, alone=alone, alone_half=half,
                                    pair=pair, ceiling=pair / (2 * alone), batch=half / alone,
                                    sharing=pair / (2 * half),
                                    cores_busy_alone=median([r["cores_busy"] for r in runs["alone"]])))
    data = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=machine(), versions=versions(), options=vars(args), seconds=round(time.time() - started),
                results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(data))
    print(table(data))
    return 0


def markdown(data):
    o = data["options"]
    return (f"Run {data['date']} on {data['machine']['cpu']} ({data['machine']['cores']} cores), {data['seconds']} s. "
            f"Method `{o['method']}`, pin `{o['pin']}`, {o['rounds']} rounds, {o['steps']} steps an epoch, "
            f"{o['epochs']} epochs a run (the first {o['warmup_epochs']} left out), global batch {o['batch']}, "
            f"{o['optimizer']}, host memory `{o.get('host_memory', 'default')}`. Versions: {data['versions']}. "
            f"Samples/s, medians (benchmarks/ceiling.py).\n\n"
            f"{table(data)}\n")


def table(data):
    lines = ["| backend | workload | alone, batch B | alone, B/2 | pair at B/2, together | ceiling | batch | sharing "
             "| cores busy alone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        cores = f"{r['cores_busy_alone']:.2f}" if "cores_busy_alone" in r else "not recorded"
        lines.append(f"| {r['backend']} | {r['workload']} | {r['alone']:.0f} | {r['alone_half']:.0f} | "
                     f"{r['pair']:.0f} | **{r['ceiling']:.2f}** | {r['batch']:.2f} | {r['sharing']:.2f} | {cores} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
