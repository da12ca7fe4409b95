"""One benchmark measurement: run in its own process (one per rank) by run.py.

    KERAS_BACKEND=jax python benchmarks/worker.py --method ks --strategy mirrored \
        --replicas 2 --workload mlp --epochs 4 --steps 20 --batch 256 --out /tmp/r

Methods:
    ks         keras_strategies through model.fit(..., distribution=...)
    native     default: plain Keras fit, no distribution;
               TF: tf.distribute strategy scope + Keras fit;
    native_sync_bn  TF: the same with BatchNormalization(synchronized=True)
               (statistics over the global batch, as keras_strategies computes);
               JAX: keras.distribution.DataParallel (one process), or
               keras.distribution.initialize + DataParallel on tf.data (several)
    native_tape  TF multi_worker, a lower bound: MultiWorkerMirroredStrategy
               and the loop of TensorFlow's custom-training-loop tutorial (a
               tf.function step run on every replica, GradientTape, the Keras
               optimizer's apply_gradients, BatchNormalization(synchronized=True),
               distribute_datasets_from_function, one iterator for the whole
               run), since Keras 3 fit cannot run under it (keras#20585)
    native_tape_epochs  the same loop with a new distributed iterator at each
               epoch over the global-batch dataset, as Keras's fit makes one
               (experimental_distribute_dataset; on request only)
    keras_ddp  torch: hand-written DDP loop over the Keras model (Keras guide)
    torch_ddp  torch: hand-written DDP loop over an equivalent torch.nn model
    torch_ddp_tensors  torch: the same loop with its batches sliced from
               tensors already in memory (each rank its contiguous part of
               every global batch, as ours reads) instead of a DataLoader: a
               step as short as ours, so its all-reduce and lockstep weigh
               what they weigh in ours (on request only)
    keras_fit  torch, 1 process: plain Keras fit without any distribution, a
               reference for Keras's own per-step cost (what no strategy can
               go below) beside the torch.nn loop
    ks_keras_loss  torch: ks with Keras's own loss and loss-tracker calls instead
               of backends/torch/fused_loss.py (what it buys; on request only)
    ks_epoch_iterators  TF multi_worker: ks with a new input iterator each
               epoch and each validation, as Keras makes (before
               backends/tensorflow/one_iterator.py; on request only)
    ks_global_batches  TF multi_worker: ks with every worker reading every
               global batch and keeping its share (experimental_distribute_dataset
               of the global batches, as Keras does), of unknown cardinality
               (the workers agree at each step on whether input is left): before
               each worker's pipeline made only its own replicas' parts of an
               endless dataset said to be so (on request only)
    ks_metric_reads  TF: ks with Keras's own metric resets and reads, a
               reduction over the replicas per variable (across workers an
               all-reduce each), as before keras_fixes.assign_without_read and
               metrics_read_together (on request only)

Writes OUT.rank{RANK}.json with per-epoch samples/s, time from the fit call (or
loop start) to the first finished step, and this process's peak RSS.
"""

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import (OPTIMIZERS, build_keras, build_torch, keras_optimizer, make_data, set_seed,  # noqa: E402
                       tf_multi_worker_strategy, torch_optimizer)

parser = argparse.ArgumentParser()
parser.add_argument("--method", required=True, choices=["ks", "native", "native_sync_bn", "native_tape", "native_tape_epochs", "keras_ddp",
                                                      "torch_ddp", "torch_ddp_tensors", "keras_fit", "ks_keras_loss",
                                                      "ks_epoch_iterators", "ks_metric_reads",
                                                      "ks_global_batches", "ks_keras_input"])
parser.add_argument("--strategy", required=True,
                    choices=["default", "mirrored", "multi_worker", "central_storage"])
parser.add_argument("--replicas", type=int, required=True)
parser.add_argument("--workload", default="mlp")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
parser.add_argument("--batch", type=int, default=256, help="global batch")
parser.add_argument("--threads", type=int, default=1, help="intra-op threads of this process")
parser.add_argument("--steps-per-execution", type=int, default=1, help="compile(steps_per_execution=N)")
parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
parser.add_argument("--validation-batches", type=int, default=0,
                    help="Keras fits: validate on this many global batches at each epoch's end")
parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                    help="gpu: one GPU per replica for ours and the native ways (DDP on nccl)")
parser.add_argument("--out", required=True)
args = parser.parse_args()

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def write(result):
    result.update(rank=RANK, world_size=WORLD, peak_rss_mib=peak_rss_mib(), backend=BACKEND)
    with open(f"{args.out}.rank{RANK}.json", "w") as f:
        json.dump(result, f)


# torch: one core per process when several share the machine (ranks of one
# job, each with one compute thread): the scheduler moving them between cores
# was the largest source of run-to-run spread on 2 cores, for every method.
# Not TensorFlow or JAX: their runtimes' own threads (collectives, gRPC, XLA)
# must run beside the compute thread; pinned, ours and native alike ran at
# half speed. KS_BENCH_PIN=0/1 overrides.
PIN = os.environ.get("KS_BENCH_PIN", "1" if BACKEND == "torch" else "0") == "1"
if WORLD > 1 and PIN and hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= WORLD:
        os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", RANK)) % len(cores)]})

# Threads first: before any engine starts.
if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
elif BACKEND == "torch":
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

METHOD = args.method  # as asked for, in the output
if args.method in ("ks_keras_loss", "ks_epoch_iterators", "ks_metric_reads", "ks_global_batches", "ks_keras_input"):
    args.method = "ks"
strategy = None
if args.method == "ks":
    import keras_strategies as ks  # before the backend starts

    devices = [f"{args.device}:{i}" for i in range(args.replicas)]
    if args.strategy == "default":
        strategy = ks.Default()
    elif args.strategy == "mirrored":
        strategy = ks.Mirrored(devices=devices)
    elif args.strategy == "central_storage":
        strategy = ks.CentralStorage(devices=devices)
    else:
        strategy = ks.MultiWorkerMirrored()

import keras  # noqa: E402
import numpy as np  # noqa: E402

native = None
if METHOD == "ks_keras_loss":
    from keras_strategies.backends.torch import fused_loss

    fused_loss.loss, fused_loss.track = (lambda *a: None), (lambda *a: False)
if METHOD == "ks_metric_reads":
    from keras_strategies.backends.tensorflow import base as tf_base
    from keras_strategies.backends.tensorflow import keras_fixes

    keras_fixes.assign_without_read = lambda variable, value: None
    tf_base.metrics_read_together = lambda model, strategy: model.get_metrics_result
if METHOD == "ks_global_batches":
    from keras_strategies.backends.tensorflow import multi_worker as tf_multi_worker

    def global_batches(model, method, arguments, seed, strategy=None, original=tf_multi_worker.one_iterator_fit):
        return original(model, method, arguments, seed)

    tf_multi_worker.one_iterator_fit = global_batches
if METHOD == "ks_keras_input":
    from keras_strategies.backends.tensorflow import central_storage as tf_central_storage
    from keras_strategies.backends.tensorflow import local as tf_local

    tf_local.TFMirrored.prepare_call = lambda self, model, method, arguments: arguments
    tf_central_storage.TFCentralStorage.prepare_call = tf_local.TFMirrored.prepare_call
    tf.data.experimental.assert_cardinality = lambda cardinality: (lambda dataset: dataset)  # this process only
if METHOD == "ks_epoch_iterators":
    from keras_strategies.backends.tensorflow import one_iterator

    one_iterator.applies = one_iterator.validation_applies = lambda model, arguments: False
SYNC_BN = args.method == "native_sync_bn"
if SYNC_BN:
    args.method = "native"  # the native run, with synchronized BatchNormalization
if args.method == "keras_fit" or (args.method == "native" and args.strategy == "default"):
    pass  # plain Keras fit, no distribution
elif args.method == "native":
    if BACKEND == "tensorflow":
        if args.strategy == "multi_worker":
            raise SystemExit("native MultiWorkerMirrored with Keras 3 fit does not run (keras#20585)")
        if args.device == "cpu":
            cpus = tf.config.list_physical_devices("CPU")
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(args.replicas)]
            )
        devices = [f"/{args.device}:{i}" for i in range(args.replicas)]
        if args.strategy == "central_storage":
            native = tf.distribute.experimental.CentralStorageStrategy(
                compute_devices=devices, parameter_device="/cpu:0")
        else:
            native = tf.distribute.MirroredStrategy(devices)
    elif BACKEND == "jax":
        import jax

        if args.strategy == "mirrored" and args.device == "cpu":
            jax.config.update("jax_num_cpu_devices", args.replicas)
        elif WORLD > 1:
            # CPU collectives between processes need gloo (GPUs/TPUs ignore it).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            keras.distribution.initialize(
                job_addresses=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                num_processes=WORLD,
                process_id=RANK,
            )
        native = keras.distribution.DataParallel(devices=jax.devices()[:args.replicas] if WORLD == 1 else jax.devices())
        keras.distribution.set_distribution(native)
    else:
        raise SystemExit("torch has no native Keras fit distribution; use keras_ddp / torch_ddp")

x, y = make_data(args.workload, args.steps * args.batch)
samples_per_epoch = args.steps * args.batch


# Keras fit runs and the DDP loops: each epoch's [begin, end] in Unix time (to compare processes)
epoch_wall = []


def wait_for_peers():
    """`KS_BENCH_BARRIER=DIR:N` (benchmarks/ceiling.py, independent processes
    measured side by side): start training once N processes are ready, so
    that their epochs overlap; at most 120 s."""
    if not os.environ.get("KS_BENCH_BARRIER"):
        return
    directory, count = os.environ["KS_BENCH_BARRIER"].rsplit(":", 1)
    open(os.path.join(directory, f"ready.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 120
    while len([n for n in os.listdir(directory) if n.startswith("ready.")]) < int(count):
        if time.monotonic() > deadline:
            raise SystemExit(f"KS_BENCH_BARRIER: {count} processes were not ready within 120 s")
        time.sleep(0.01)


class Timer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.first_step_end = None
        self.epoch_times = []
        self.epoch_cpu = []
        self.steps_seen = []
        self._begin = None
        self._begin_cpu = None

    def on_train_batch_end(self, batch, logs=None):
        self.steps_seen[-1] += 1
        if self.first_step_end is None:
            if logs and "loss" in logs:  # wait for the step itself (async engines)
                keras.ops.convert_to_numpy(logs["loss"])
            self.first_step_end = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.steps_seen.append(0)
        self._begin = time.perf_counter()
        self._begin_cpu = time.process_time()
        epoch_wall.append([time.time(), None])

    def on_epoch_end(self, epoch, logs=None):
        if logs and "loss" in logs:
            float(np.asarray(keras.ops.convert_to_numpy(logs["loss"])))
        self.epoch_times.append(time.perf_counter() - self._begin)
        self.epoch_cpu.append(time.process_time() - self._begin_cpu)
        epoch_wall[-1][1] = time.time()


def compile_model(model):
    model.compile(
        optimizer=keras_optimizer(args.optimizer),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=args.steps_per_execution,
    )


def run_keras_fit():
    set_seed(0)
    wait_for_peers()
    timer = Timer()
    fit_kwargs = dict(batch_size=args.batch, epochs=args.epochs, shuffle=False, verbose=0,
                      callbacks=[timer])
    if args.validation_batches:  # the first examples (the time of each epoch includes its validation)
        held = args.validation_batches * args.batch
        fit_kwargs["validation_data"] = (x[:held], y[:held])
    if args.method == "ks":
        model = build_keras(args.workload)
        compile_model(model)
        start = time.perf_counter()
        model.fit(x, y, distribution=strategy, **fit_kwargs)
    elif native is None:  # plain Keras fit
        model = build_keras(args.workload)
        compile_model(model)
        start = time.perf_counter()
        model.fit(x, y, **fit_kwargs)
    elif BACKEND == "tensorflow":
        scope = native.scope()  # keep the reference (see multiprocess-notes.md)
        with scope:
            model = build_keras(args.workload, synchronized_bn=SYNC_BN)
            compile_model(model)
        start = time.perf_counter()
        model.fit(x, y, **fit_kwargs)
    else:  # JAX DataParallel
        model = build_keras(args.workload)
        compile_model(model)
        if WORLD > 1:
            import tensorflow as tf

            data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch)
            fit_kwargs.pop("batch_size")
            fit_kwargs.pop("shuffle")
            start = time.perf_counter()
            model.fit(data, **fit_kwargs)
        else:
            start = time.perf_counter()
            model.fit(x, y, **fit_kwargs)
    return timer.epoch_times, timer.epoch_cpu, timer.first_step_end - start, timer.steps_seen


def run_torch_loop():
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    gpu = args.device == "gpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", RANK))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", timeout=__import__("datetime").timedelta(seconds=300))
    torch.manual_seed(0)
    set_seed(0)
    xs = x
    if args.method in ("torch_ddp", "torch_ddp_tensors"):
        model = build_torch(args.workload).to(device)
        if xs.ndim == 4:
            xs = np.ascontiguousarray(xs.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    else:
        model = build_keras(args.workload)  # a torch.nn.Module under the torch backend (on the GPU if any)
    dataset = TensorDataset(torch.from_numpy(xs), torch.from_numpy(y.astype("int64")))
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=RANK, shuffle=False)
    # the DDP tutorial's loader: pinned host batches, copied to the GPU asynchronously
    loader = DataLoader(dataset, batch_size=args.batch // WORLD, sampler=sampler, pin_memory=gpu)
    if args.method == "torch_ddp_tensors":  # this rank's part of each global batch, sliced in memory
        part = args.batch // WORLD
        xt, yt = (torch.from_numpy(a).to(device) for a in (xs, y.astype("int64")))
        loader = [(xt[i + RANK * part:i + (RANK + 1) * part], yt[i + RANK * part:i + (RANK + 1) * part])
                  for i in range(0, len(xt) - args.batch + 1, args.batch)]
    start = time.perf_counter()
    ddp = DDP(model, device_ids=[device.index] if gpu else None)
    optimizer = torch_optimizer(args.optimizer, ddp.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    first = None
    epoch_times = []
    epoch_cpu = []
    steps_seen = []
    wait_for_peers()
    for _ in range(args.epochs):
        begin = time.perf_counter()
        begin_cpu = time.process_time()
        epoch_wall.append([time.time(), None])
        steps_seen.append(0)
        for xb, yb in loader:
            steps_seen[-1] += 1
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if args.method == "keras_ddp":
                logits = ddp(xb, training=True)
            else:
                logits = ddp(xb)
            loss = loss_fn(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if first is None:
                first = time.perf_counter() - start
        loss.item()
        epoch_times.append(time.perf_counter() - begin)
        epoch_cpu.append(time.process_time() - begin_cpu)
        epoch_wall[-1][1] = time.time()
    del ddp  # before destroying the group (multiprocess-notes.md: DDP shutdown)
    dist.destroy_process_group()
    return epoch_times, epoch_cpu, first, steps_seen


def run_tf_tape_loop():
    """MultiWorkerMirroredStrategy with TensorFlow's own custom training loop."""
    strategy = tf_multi_worker_strategy()
    set_seed(0)
    start = time.perf_counter()
    with strategy.scope():
        model = build_keras(args.workload, synchronized_bn=True)
        optimizer = keras_optimizer(args.optimizer)
        optimizer.build(model.trainable_variables)

    def dataset_fn(context):
        per_replica = context.get_per_replica_batch_size(args.batch)
        data = tf.data.Dataset.from_tensor_slices((x, y))
        return data.shard(context.num_input_pipelines, context.input_pipeline_id).batch(per_replica).repeat()

    per_epoch = args.method == "native_tape_epochs"
    if per_epoch:  # as Keras's fit: the global batches, a new iterator each epoch
        global_batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch)
    else:
        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

    def step(xb, yb):
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=args.batch)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        losses = strategy.run(step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    first, epoch_times, epoch_cpu, steps_seen = None, [], [], []
    for _ in range(args.epochs):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        steps_seen.append(0)
        if per_epoch:
            iterator = iter(strategy.experimental_distribute_dataset(global_batches))
        for _ in range(args.steps):
            loss = train_step(iterator)
            steps_seen[-1] += 1
            if first is None:
                float(loss)
                first = time.perf_counter() - start
        float(loss)
        epoch_times.append(time.perf_counter() - begin)
        epoch_cpu.append(time.process_time() - begin_cpu)
    return epoch_times, epoch_cpu, first, steps_seen


if args.method in ("keras_ddp", "torch_ddp", "torch_ddp_tensors"):
    epoch_times, epoch_cpu, first_step, steps_seen = run_torch_loop()
elif args.method in ("native_tape", "native_tape_epochs"):
    epoch_times, epoch_cpu, first_step, steps_seen = run_tf_tape_loop()
else:
    epoch_times, epoch_cpu, first_step, steps_seen = run_keras_fit()

write({
    "method": METHOD,
    "strategy": args.strategy,
    "workload": args.workload,
    "replicas": args.replicas,
    "epoch_seconds": epoch_times,
    "epoch_cpu_seconds": epoch_cpu,  # this process's CPU time (all its threads)
    "samples_per_epoch": samples_per_epoch,
    "steps_per_epoch": args.steps,
    "steps_seen": steps_seen,
    "first_step_s": first_step,
    **({"epoch_wall": epoch_wall} if epoch_wall else {}),
    **({"cores": sorted(os.sched_getaffinity(0))} if hasattr(os, "sched_getaffinity") else {}),
})
