"""Benchmarks keras_strategies (A) against the native way (B), per backend and strategy.

    python benchmarks/run.py --quick          # MLP, every backend, < 10 min on 2 cores
    python benchmarks/run.py                  # all three workloads, 3 rounds (241 runs: hours on 2 cores)
    python benchmarks/run.py --resume         # the same, going on from the last case an interrupted run finished
    python benchmarks/run.py --backends jax --strategies mirrored --workloads mlp \
        --replicas 2 --repeats 1 --epochs 2 --steps 3 --out /tmp/b.json --no-plot   # smoke

Every measurement is its own process (several, through keras_strategies.launch,
for multi-process strategies), with KERAS_BACKEND chosen per run and one
intra-op thread per replica. For each case (backend, strategy, workload,
replicas) the methods run alternately, A B B A ..., `--repeats` rounds (by default one at 1 replica). Throughput
is samples/s per epoch with the first epoch (compilation, tracing, DDP setup;
`--warmup-epochs` sets how many) left out; the median over every later epoch of every
repeat is reported, with min-max. Writes JSON, then (report.py) a markdown
table and a PNG plot.
After each run the runs so far are kept in OUT.partial (written atomically):
`--resume` with the same options measures only the runs still missing (an
unfinished case goes on at the round and method where it stopped), so a long
run can be stopped (Ctrl-C, a machine taken back) and finished later.
Each case's rounds alternate within the case, so its ratio stays one
interleaved comparison whichever session measured it.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "worker.py")
PS_WORKER = os.path.join(HERE, "ps_worker.py")
sys.path.insert(0, HERE)

from workloads import OPTIMIZERS, WORKLOADS, describe_optimizer  # noqa: E402

# (backend, strategy) -> (in one process?, methods: A first, then B and lower bounds)
CASES = {
    ("tensorflow", "default"): (True, ["ks", "native"]),
    ("jax", "default"): (True, ["ks", "native"]),
    ("torch", "default"): (True, ["ks", "native"]),
    ("tensorflow", "mirrored"): (True, ["ks", "native", "native_sync_bn", "ks_keras_input"]),
    ("tensorflow", "central_storage"): (True, ["ks", "native", "ks_keras_input"]),
    ("jax", "central_storage"): (True, ["ks"]),
    ("torch", "central_storage"): (True, ["ks"]),
    ("tensorflow", "multi_worker"): (False, ["ks", "native_tape", "native_tape_epochs", "ks_epoch_iterators",
                                             "ks_metric_reads", "ks_global_batches"]),
    ("jax", "mirrored"): (True, ["ks", "native"]),
    ("jax", "multi_worker"): (False, ["ks", "native"]),
    ("torch", "multi_worker"): (False, ["ks", "keras_ddp", "torch_ddp", "keras_fit", "ks_keras_loss",
                                        "torch_ddp_tensors"]),
    # replicas = workers; each run also has a chief and one parameter server
    ("tensorflow", "parameter_server"): (False, ["ks", "native", "native_tape"]),
    ("jax", "parameter_server"): (False, ["ks"]),
    ("torch", "parameter_server"): (False, ["ks"]),
}

ON_REQUEST = {"ks_keras_loss", "torch_ddp_tensors", "native_tape_epochs", "ks_epoch_iterators", "ks_metric_reads",
              "ks_global_batches", "ks_keras_input"}  # run only when --methods names them

NOT_RUN = {
    ("tensorflow", "multi_worker", "native"):
        "native does not run: MultiWorkerMirroredStrategy + Keras 3 fit crashes (keras#20585)",
    ("torch", "mirrored", "ks"):
        "not measured: PyTorch has one CPU device; Mirrored over CPU replicas is MultiWorkerMirrored here",
    ("jax", "central_storage", "native"):
        "no native equivalent: keras.distribution has no central-storage layout",
    ("torch", "central_storage", "native"):
        "no native equivalent: torch.distributed has no central-storage strategy for Keras",
    ("jax", "parameter_server", "native"): "no native equivalent: JAX has no parameter-server training",
    ("torch", "parameter_server", "native"):
        "no native equivalent: no Keras parameter-server training on torch (keras_strategies is the first)",
}

# Native runs that fail in Keras 3.15 (the harness still runs them, so that
# the failure is shown, not assumed): (backend, strategy, method, workload) ->
# (text in the output that identifies the failure, what the tables say).
NATIVE_FAILS = {
    **{("tensorflow", strategy, "native", workload): (
        "You must feed a value for placeholder tensor",
        "native fails: steps_per_execution > 1 under tf.distribute with several replicas (keras-team/keras#19246)",
    ) for strategy in ("mirrored", "central_storage") for workload in ("mlp", "cnn", "bn_convnet")},
    ("tensorflow", "central_storage", "native", "bn_convnet"): (
        "You must specify an aggregation method to update a AggregatingVariable",
        "native fails: CentralStorageStrategy + BatchNormalization in Keras 3 (\"You must specify an aggregation "
        "method to update a AggregatingVariable in Replica Context\")",
    ),
}


def classify(record):
    """A failed run that is a known native failure gets that as its status."""
    known = NATIVE_FAILS.get((record["backend"], record["strategy"], record["method"], record["workload"]))
    if record["status"] == "failed" and known and any(known[0] in line for line in record["output_tail"]):
        record["status"] = known[1]
    return record


def native_fails(record):
    return record["status"].startswith("native fails")


LABELS = {
    "ks": "keras_strategies fit(distribution=)",
    ("tensorflow", "native", "central_storage"): "tf.distribute CentralStorageStrategy scope + Keras fit",
    ("tensorflow", "native", "default"): "plain Keras fit",
    ("jax", "native", "default"): "plain Keras fit",
    ("torch", "native", "default"): "plain Keras fit",
    ("tensorflow", "native"): "tf.distribute scope + Keras fit",
    "native_sync_bn": "tf.distribute scope + Keras fit, BatchNormalization(synchronized=True)",
    ("jax", "native", "mirrored"): "keras.distribution.DataParallel",
    ("jax", "native", "multi_worker"): "keras.distribution.initialize + DataParallel (tf.data)",
    ("tensorflow", "native", "parameter_server"):
        "hand-written ClusterCoordinator loop scheduling Keras's train_step",
    "native_tape": "hand-written ClusterCoordinator loop, GradientTape + Keras optimizer (lower bound)",
    ("tensorflow", "native_tape", "multi_worker"):
        "MultiWorkerMirroredStrategy + hand-written loop, GradientTape + Keras optimizer, synchronized BN "
        "(lower bound)",
    "native_tape_epochs": "the same loop, a new distributed iterator each epoch as Keras fit makes",
    "keras_ddp": "Keras model + hand-written DDP loop",
    "torch_ddp": "torch.nn + DDP loop (lower bound)",
    "torch_ddp_tensors": "torch.nn + DDP loop, batches sliced from tensors in memory (no DataLoader)",
    "keras_fit": "plain Keras fit, no distribution (Keras's own step cost)",
    "ks_keras_loss": "keras_strategies with Keras's own loss path (before backends/torch/fused_loss.py)",
    "ks_epoch_iterators": "keras_strategies with a new input iterator each epoch (and validation), as Keras makes "
        "(before backends/tensorflow/one_iterator.py)",
    "ks_global_batches": "keras_strategies with every worker reading every global batch, of unknown cardinality "
        "(before each worker's pipeline made its own replicas' parts of an endless dataset said to be so)",
    "ks_keras_input": "keras_strategies with Keras's own input (a dataset of global batches, a new iterator each "
        "epoch; before TensorFlow Mirrored and CentralStorage read one endless dataset of their replicas' parts)",
    "ks_metric_reads": "keras_strategies with Keras's own metric resets and reads, a reduction per variable (before "
        "keras_fixes.assign_without_read and metrics_read_together)",
}

CLUSTER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "MASTER_ADDR", "MASTER_PORT", "TF_CONFIG", "KERAS_STRATEGIES_LAUNCHED",
                     "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID", "XLA_FLAGS")


THREADS = ("one intra-op thread per replica: a process holding k replicas gets k TF intra/inter-op threads "
           "(or torch threads); XLA: one thread per device; the processes of a torch multi-process run are "
           "pinned to one core each (TF/JAX: not pinned); rounds alternate A B, B A")


def label(backend, strategy, method):
    return (LABELS.get((backend, method, strategy)) or LABELS.get((backend, method))
            or LABELS.get(method, "native"))


def role(method):
    return {"ks": "A", "torch_ddp": "lower bound", "torch_ddp_tensors": "lower bound", "native_tape": "lower bound",
            "native_tape_epochs": "lower bound",
            "keras_fit": "reference"}.get(method, "B")


def applies(method, workload, replicas):
    """Synchronized BatchNormalization is a native variant only where there is BN;
    plain Keras fit (one process) is the same job as one replica only."""
    if method == "keras_fit":
        return replicas == 1
    return method != "native_sync_bn" or workload == "bn_convnet"


# --host-memory: "keep" gives every run, the native ways too, from its start, the
# glibc settings that `import keras_strategies` makes on JAX and PyTorch CPU
# installs (keras_strategies/implementation/host_memory.py); "release" leaves
# every run, ours too, glibc's defaults (ours as before that module).
HOST_MEMORY = {
    "default": {},
    "keep": {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824",
             "KERAS_STRATEGIES_KEEP_HOST_MEMORY": "1"},
    "release": {"KERAS_STRATEGIES_KEEP_HOST_MEMORY": "0"},
}


def run_env(backend, threads, device="cpu", host_memory="default"):
    env = {k: v for k, v in os.environ.items()
           if k not in CLUSTER_VARIABLES and (host_memory == "default" or k not in HOST_MEMORY["keep"])}
    env.update(HOST_MEMORY[host_memory])
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run stays on the CPU on a machine with GPUs too
    env.update(
        KERAS_BACKEND=backend,
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TF_NUM_INTRAOP_THREADS=str(threads),
        TF_NUM_INTEROP_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    )
    if device == "cpu":  # one XLA CPU thread per device (each replica is a device)
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def _stop(proc):
    """Stops a measurement's process group (the launcher stops its own ranks
    on SIGTERM; SIGKILL after 15 s); returns its output. A group already
    gone (the run ended as the signal came) is not an error."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.communicate()[0]
    try:
        return proc.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0]


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def measure(backend, strategy, method, workload, replicas, args, tmp):
    """One measurement: returns a dict (status ok, or failed with the output tail)."""
    in_process, _ = CASES[(backend, strategy)]
    servers = strategy == "parameter_server"
    processes = 1 if in_process else replicas + 2 * servers  # + a chief and a parameter server
    reporting = 1 if servers else processes  # the chief alone reports a parameter-server run
    threads = replicas if in_process else 1
    out = os.path.join(tmp, f"{backend}-{strategy}-{method}-{workload}-{replicas}-{time.time_ns()}")
    worker = [sys.executable, WORKER, "--method", method, "--strategy", strategy,
              "--replicas", str(replicas), "--workload", workload, "--epochs", str(args.epochs),
              "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(threads),
              "--steps-per-execution", str(1 if backend == "torch" else args.steps_per_execution),  # Keras refuses it on torch
              "--optimizer", args.optimizer, "--validation-batches", str(args.validation_batches), "--device", args.device,
              "--out", out]
    if servers:
        worker = [sys.executable, PS_WORKER, "--method", method, "--workload", workload, "--epochs",
                  str(args.epochs), "--steps", str(args.steps), "--batch", str(args.batch), "--optimizer",
                  args.optimizer, "--out", out]
    if in_process:
        command = worker
    else:
        command = [sys.executable, "-m", "keras_strategies.launch", "--nproc-per-node", str(processes),
                   *(["--num-ps", "1"] if servers else []), "--timeout", str(args.timeout), *worker[1:]]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=run_env(backend, threads, args.device, args.host_memory), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout + 30)
    except subprocess.TimeoutExpired:
        output = _stop(proc)
    except BaseException:  # Ctrl-C or SIGTERM to run.py: its own session would outlive it
        _stop(proc)
        raise
    wall = time.perf_counter() - start
    ranks = []
    for rank in range(reporting):
        path = f"{out}.rank{rank}.json"
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    record = dict(backend=backend, strategy=strategy, method=method, workload=workload,
                  replicas=replicas, processes=processes, threads_per_process=threads,
                  wall_s=round(wall, 2), exit_code=proc.returncode)
    if proc.returncode != 0 or len(ranks) != reporting:
        record.update(status="failed", output_tail=output.strip().splitlines()[-15:])
        return classify(record)
    record.update(status="ok", **steady_state(ranks, args.warmup_epochs))
    return record


def steady_state(ranks, warmup):
    """What one run's reports (`ranks`, the chief's first) say once its
    first `warmup` epochs are left out."""
    chief = ranks[0]
    return dict(
        samples_per_s=[chief["samples_per_epoch"] / t for t in chief["epoch_seconds"][warmup:]],
        # CPU time of each process (all threads) per sample: the work done,
        # much less sensitive than wall time to the scheduler on a small machine
        cpu_us_per_sample=[[1e6 * c / r["samples_per_epoch"] for c in r["epoch_cpu_seconds"][warmup:]]
                           for r in ranks if r["epoch_cpu_seconds"]],
        first_epoch_s=chief["epoch_seconds"][0],
        first_step_s=chief["first_step_s"],
        steps_seen=chief["steps_seen"],
        peak_rss_mib=[r["peak_rss_mib"] for r in ranks],
    )


def median(values):
    values = sorted(values)
    n = len(values)
    return None if not n else (values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2)


def _result_entry(key, group):
    backend, strategy, workload, method, replicas = key
    ok = [r for r in group if r["status"] == "ok"]
    entry = dict(backend=backend, strategy=strategy, workload=workload, method=method,
                 label=label(backend, strategy, method), role=role(method), replicas=replicas,
                 processes=group[0]["processes"],
                 threads_per_process=group[0]["threads_per_process"], runs=len(group))
    if not ok:
        entry.update(status=group[-1]["status"] if native_fails(group[-1]) else "failed",
                     output_tail=group[-1].get("output_tail"))
        return entry
    samples = [s for r in ok for s in r["samples_per_s"]]
    entry.update(
        status="ok" if len(ok) == len(group) else f"{len(group) - len(ok)} of {len(group)} runs failed",
        samples_per_s=dict(median=median(samples), min=min(samples), max=max(samples), n=len(samples)),
        first_step_s=median([r["first_step_s"] for r in ok]),
        cpu_us_per_sample=median([c for r in ok for rank in r.get("cpu_us_per_sample", []) for c in rank]),
        peak_rss_mib=[max(r["peak_rss_mib"][i] for r in ok) for i in range(len(ok[0]["peak_rss_mib"]))],
    )
    return entry


def _not_run_entries(results):
    """Rows for the native methods known not to run (NOT_RUN), where the case ran."""
    entries = []
    for (backend, strategy, method), reason in NOT_RUN.items():
        if any(r["backend"] == backend and r["strategy"] == strategy for r in results):
            for workload in {r["workload"] for r in results}:
                for replicas in {r["replicas"] for r in results}:
                    entries.append(dict(backend=backend, strategy=strategy, workload=workload,
                                        method=method, label=label(backend, strategy, method),
                                        role=role(method), replicas=replicas, status=reason))
    return entries


def _same_case(a, b, *fields):
    return all(a[f] == b[f] for f in fields)


def _comparison(ours, other):
    comp = dict(backend=ours["backend"], strategy=ours["strategy"], workload=ours["workload"],
                replicas=ours["replicas"], against=other["method"], against_label=other["label"])
    if "samples_per_s" in other:
        comp.update(
            throughput_ratio=ours["samples_per_s"]["median"] / other["samples_per_s"]["median"],
            peak_rss_ratio=max(ours["peak_rss_mib"]) / max(other["peak_rss_mib"]),
            first_step_delta_s=ours["first_step_s"] - other["first_step_s"],
        )
    else:
        comp.update(status=other["status"])
    return comp


def summarize(runs):
    """Results per (backend, strategy, workload, method, replicas), ratios and scaling."""
    groups = {}
    for run in runs:
        key = (run["backend"], run["strategy"], run["workload"], run["method"], run["replicas"])
        groups.setdefault(key, []).append(run)
    results = [_result_entry(key, group) for key, group in groups.items()]
    results += _not_run_entries(results)
    measured = [r for r in results if "samples_per_s" in r]
    comparisons = [
        _comparison(r, other)
        for r in measured if r["method"] == "ks"
        for other in results
        if other["method"] != "ks" and _same_case(r, other, "backend", "strategy", "workload", "replicas")
    ]
    scaling = []
    for r in measured:
        one = [o for o in measured if o["replicas"] == 1
               and _same_case(r, o, "backend", "strategy", "workload", "method")]
        if r["replicas"] == 2 and one:
            scaling.append(dict(backend=r["backend"], strategy=r["strategy"], workload=r["workload"],
                                method=r["method"], label=r["label"],
                                efficiency=r["samples_per_s"]["median"] / (2 * one[0]["samples_per_s"]["median"])))
    return results, comparisons, scaling


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    found = dict(platform=platform.platform(), python=platform.python_version(), cpu=cpu,
                 cores=os.cpu_count(), memory_gib=memory)
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        if gpus:
            found["gpus"] = gpus.splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("keras", "tensorflow-cpu", "tensorflow", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin",
                 "torch", "keras-strategies"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def resummarize(path, plot=True):
    with open(path) as f:
        data = json.load(f)
    runs = [classify(run) for run in data["runs"]]
    data["results"], data["comparisons"], data["scaling"] = summarize(runs)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    import report

    report.write_all(path, plot=plot)
    return 1 if any(r["status"] != "ok" and not native_fails(r) for r in runs) else 0


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="MLP only, short runs; 1 replica only for Default and Mirrored, one A B round "
                             "there and for CentralStorage (< 10 min on 2 idle cores)")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--strategies", default="default,mirrored,multi_worker,central_storage,parameter_server")
    parser.add_argument("--workloads", default=None, help=f"comma list of {','.join(WORKLOADS)}")
    parser.add_argument("--methods", default=None,
                        help="comma list limiting the methods (ks, native, native_sync_bn, keras_ddp, torch_ddp, "
                             "keras_fit; on request only: ks_keras_loss, native_tape_epochs, ks_epoch_iterators, "
                             "ks_metric_reads, ks_global_batches)")
    parser.add_argument("--replicas", default=None,
                        help="replica counts to measure (scaling needs 1,2; default 1,2, with --device gpu 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="A B rounds per case (default: 3, --quick 2; 1 at 1 replica unless given)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run (the first --warmup-epochs are left out)")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="leading epochs of each run left out of its throughput (default 1: compilation, "
                             "tracing, DDP setup). gpu_run.sh gives 2: on an H200 the second epoch was still slow "
                             "in most JAX runs, plain Keras fit's too, and Keras's DataParallel over one device "
                             "compiles its step again there")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--validation-batches", type=int, default=0,
                        help="Keras fits (ours and native): validate on this many global batches at each epoch's end; "
                             "the time of an epoch includes it (TensorFlow's loops do not validate)")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="compile(steps_per_execution=N) for every Keras fit (native tf.distribute fails N > 1 "
                             "with several replicas: the run shows it)")
    parser.add_argument("--host-memory", default="default", choices=sorted(HOST_MEMORY),
                        help="default: as a user gets it (ours keeps host memory mapped between steps on JAX and "
                             "PyTorch CPU installs, keras_strategies/implementation/host_memory.py; native ways have "
                             "glibc's defaults). keep: every run, native too, keeps it from its start "
                             "(GLIBC_TUNABLES). release: no run keeps it, ours included")
    parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS),
                        help="the Keras optimizer of every fit, and its torch.optim twin in the DDP loops "
                             "(benchmarks/workloads.py OPTIMIZERS); parameter_server runs apply it on the servers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                        help="cpu (default; GPUs hidden): replicas are CPU devices or processes. gpu: one GPU per "
                             "replica (ours and native alike: Mirrored over gpu:0..., DDP with nccl); only the "
                             "one-GPU cases by default (replicas 1, no CentralStorage or ParameterServer), and a "
                             "backend whose engine is not installed is left out with a line saying so")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per measurement")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "results.json"))
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--no-plot", action="store_true", help="JSON and markdown only")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the interrupted run of the same options kept in OUT.partial: measure "
                             "only the runs it has not made (an unfinished case goes on where it stopped)")
    parser.add_argument("--resummarize", metavar="JSON",
                        help="measure nothing: classify and summarize the runs of an earlier JSON again "
                             "(after a change to this script's summary), then rewrite it and its tables")
    return parser


def _plan(args, workloads, replica_counts):
    """The (backend, strategy, workload, replicas) cases to measure."""
    plan = []
    for backend in args.backends.split(","):
        if args.device == "gpu" and importlib.util.find_spec(backend) is None:
            print(f"--device gpu: {backend} is left out: its engine is not installed on this machine", flush=True)
            continue
        for strategy in args.strategies.split(","):
            if (backend, strategy) not in CASES:
                continue
            if args.device == "gpu" and strategy in ("central_storage", "parameter_server"):
                continue  # several processes or devices sharing one GPU would measure nothing of either
            for workload in workloads:
                for replicas in replica_counts:
                    if strategy == "default" and replicas != 1:
                        continue  # Default is one device by definition
                    if strategy == "central_storage" and replicas != 2:
                        continue  # one device holding and computing: nothing central about it
                    if args.quick and strategy in ("multi_worker", "parameter_server") and replicas != 2:
                        continue  # --quick: scaling for Mirrored only (one process)
                    plan.append((backend, strategy, workload, replicas))
    return plan


def _measure_case(case, args, tmp, started, shown_failing, runs, save):
    """Every run of one case, methods alternating A B, B A, ...

    Appends each record to `runs` and calls `save()` after it; a (round,
    method) already in `runs` (a resumed, unfinished case) is not measured
    again."""
    backend, strategy, workload, replicas = case
    methods = [m for m in CASES[(backend, strategy)][1]
               if (m in args.methods.split(",") if args.methods else m not in ON_REQUEST)
               and applies(m, workload, replicas)]
    # unless --repeats is given: one A B round at 1 replica (for
    # scaling; --quick: also for CentralStorage), A B B A ... at 2
    rounds = args.repeats
    if not args.repeats_given and (replicas == 1 or (args.quick and strategy == "central_storage")):
        rounds = 1
    measured = {(r["method"], r["repeat"]) for r in runs
                if (r["backend"], r["strategy"], r["workload"], r["replicas"]) == tuple(case)}
    for repeat in range(rounds):
        # A B, then B A, ...: a drift of the machine's speed during a
        # case (seen on shared VMs) then favours neither method
        for method in (methods if repeat % 2 == 0 else methods[::-1]):
            if (backend, strategy, method, workload, replicas) in shown_failing or (method, repeat) in measured:
                continue  # a known native failure, shown once; or measured before a resume
            record = measure(backend, strategy, method, workload, replicas, args, tmp)
            record["repeat"] = repeat
            runs.append(record)
            save()
            if native_fails(record):
                shown_failing.add((backend, strategy, method, workload, replicas))
            thr = record.get("samples_per_s")
            shown = f"{median(thr):.0f} samples/s" if thr else record["status"]
            print(f"[{time.perf_counter() - started:6.0f}s] {backend:10s} {strategy:12s} "
                  f"{workload:10s} x{replicas} {method:9s} #{repeat}: {shown} "
                  f"({record['wall_s']:.0f}s)", flush=True)


def _write(data, args, runs):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {args.out}")
    import report

    report.write_all(args.out, plot=not args.no_plot)
    failed = [r for r in runs if r["status"] != "ok" and not native_fails(r)]
    for r in failed:
        print(f"FAILED {r['backend']} {r['strategy']} {r['method']} x{r['replicas']}:",
              *r.get("output_tail", []), sep="\n  ")
    return 1 if failed else 0


# what the runs of a resumed run must share with the interrupted one's
RESUME_OPTIONS = ("quick", "device", "backends", "strategies", "workloads", "methods", "replicas", "repeats", "epochs",
                  "warmup_epochs", "steps",
                  "batch", "steps_per_execution", "optimizer", "validation_batches", "host_memory")


def _options(args):
    return {name: getattr(args, name) for name in RESUME_OPTIONS}


def _save_partial(path, meta, runs, done):
    """The runs so far (an unfinished case's too) and the cases finished, atomically (a stop while
    writing leaves the previous file whole)."""
    with open(path + ".tmp", "w") as f:
        json.dump(dict(meta=meta, runs=runs, done=[list(case) for case in sorted(done)]), f, indent=1)
    os.replace(path + ".tmp", path)


def _resume(meta, path, now):
    """`(runs, cases done)` of the interrupted run kept at `path`, whose
    meta then becomes this run's (first start, seconds spent so far);
    nothing when there is none. Raises SystemExit when it was made with other
    options."""
    if not os.path.exists(path):
        print(f"--resume: no interrupted run at {path}; starting from the first case", flush=True)
        return [], set()
    with open(path) as f:
        data = json.load(f)
    earlier = data["meta"]
    if earlier["options"] != meta["options"]:
        differ = sorted(k for k in meta["options"] if earlier["options"].get(k) != meta["options"][k])
        raise SystemExit(f"run.py --resume: {path} holds a run with other options ({', '.join(differ)} differ; "
                         f"it was `{earlier['command']}`). Resume it with those options, or leave out --resume "
                         f"to start again (the partial file is then replaced).")
    meta.update(date=earlier["date"], load_average_before=earlier["load_average_before"],
                machine=earlier["machine"], versions=earlier["versions"], command=earlier["command"],
                resumed=earlier.get("resumed", []) + [now], wall_s_before=earlier["wall_s"])
    done = {tuple(case) for case in data["done"]}
    print(f"--resume: {len(done)} case(s), {len(data['runs'])} run(s) from {path}", flush=True)
    return data["runs"], done


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize, plot=not args.no_plot)
    workloads = (args.workloads or ("mlp" if args.quick else ",".join(WORKLOADS))).split(",")
    args.repeats_given = args.repeats is not None
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.epochs = args.epochs or 4
    if not 0 <= args.warmup_epochs < args.epochs:
        raise SystemExit(f"run.py: --warmup-epochs {args.warmup_epochs} leaves no epoch of {args.epochs} to measure; "
                         f"give --epochs more than --warmup-epochs.")
    args.steps = args.steps or 50
    args.replicas = args.replicas or ("1" if args.device == "gpu" else "1,2")
    plan = _plan(args, workloads, [int(n) for n in args.replicas.split(",")])
    started = time.perf_counter()
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    meta = dict(
        date=now, options=_options(args),
        command=" ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        machine=machine(), versions=versions(), load_average_before=os.getloadavg(), note=args.note,
        config=dict(quick=args.quick, workloads=workloads, repeats=args.repeats, epochs=args.epochs,
                    warmup_epochs=args.warmup_epochs,
                    device=args.device, steps_per_epoch=args.steps, steps_per_execution=args.steps_per_execution, global_batch=args.batch,
                    optimizer=describe_optimizer(args.optimizer),
                    shuffle=False, metrics=None, validation_batches=args.validation_batches, threads=THREADS,
                    host_memory=args.host_memory),
    )
    partial = args.out + ".partial"
    runs, done = _resume(meta, partial, now) if args.resume else ([], set())
    shown_failing = {(r["backend"], r["strategy"], r["method"], r["workload"], r["replicas"])
                     for r in runs if native_fails(r)}
    before = meta.pop("wall_s_before", 0.0)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="ks-bench-")
    try:
        def save():
            meta["wall_s"] = round(before + time.perf_counter() - started, 1)
            _save_partial(partial, meta, runs, done)

        for case in plan:
            if tuple(case) in done:
                continue
            _measure_case(case, args, tmp, started, shown_failing, runs, save)
            done.add(tuple(case))
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results, comparisons, scaling = summarize(runs)
    meta.update(wall_s=round(before + time.perf_counter() - started, 1), load_average_after=os.getloadavg())
    data = dict(meta=meta, results=results, comparisons=comparisons, scaling=scaling, runs=runs)
    code = _write(data, args, runs)
    if os.path.exists(partial):
        os.remove(partial)
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # a machine taken back: stop the measurement, keep the partial file
    sys.exit(main())
