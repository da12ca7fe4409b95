"""Per-step cost on the torch backend, one process, one thread: where the time of a step goes.

    python benchmarks/step_cost.py --workload mlp --rounds 4
    python benchmarks/step_cost.py --workload mlp --bypass-layer-call   # + Keras without Layer.__call__

run.py measures whole jobs (several processes, the network, the scheduler of a
small machine). This measures one step's CPU cost with none of that, so that
a difference of a few percent is visible: every method trains the same model
on the same data (`workloads.py`), the methods alternate round by round, and
the first epoch of every run is left out. Methods:

    ks         model.fit(distribution=MultiWorkerMirrored()): the multi-process code
               path (DDP inside Keras's step, comm hook, global metrics) forced on
               with one process, so no second process or network is measured
    ks_unfused the same without the fused Adam/AdamW and SGD updates (`fused_adam.py`,
               `fused_sgd.py`): what they buy (ask for it with --methods)
    ks_keras_loss  ks with Keras's own loss and loss-tracker calls instead of
               `fused_loss.py`: what it buys (ask for it with --methods)
    ks_keras_batch_logs  ks with Keras's own per-batch callback hooks instead of
               the `unread-batch-logs` patch (`implementation/batch_hooks.py`):
               what it buys (ask for it with --methods)
    keras_fit  plain Keras fit, no distribution: Keras's own step
    keras_ddp  hand-written DDP loop over the same Keras model (Keras guide)
    torch_ddp  the same loop over the equivalent torch.nn model

`--bypass-layer-call` adds `ks` and `keras_fit` once more with Keras's
functional graph calling each inner layer's `call()` directly instead of
`Layer.__call__` (an experiment, valid for these models only: no masks, no
mixed precision, no activity regularizers): how much of the step is Keras's
per-layer dispatch. Prints milliseconds per step (median and min) and each
method's throughput over the torch.nn loop's; `--out` also writes them as JSON.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["KERAS_BACKEND"] = "torch"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workload", default="mlp", choices=["mlp", "cnn", "bn_convnet"])
parser.add_argument("--batch", type=int, default=128, help="the batch of this one process")
parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is left out)")
parser.add_argument("--rounds", type=int, default=4)
parser.add_argument("--methods", default="ks,keras_fit,keras_ddp,torch_ddp")
parser.add_argument("--bypass-layer-call", action="store_true")
parser.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "momentum", "sgd"],
                    help="Keras's, and torch.optim's twin in the loops (workloads.py OPTIMIZERS)")
parser.add_argument("--port", type=int, default=0, help="gloo port (0: a free one)")
parser.add_argument("--out", default=None)
args = parser.parse_args()

if hasattr(os, "sched_setaffinity"):  # one core: the scheduler moving us was the largest noise
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})

import socket  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
if not args.port:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
from keras.src.models import functional  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import keras_strategies as ks  # noqa: E402
from keras_strategies.backends.torch import fused_adam, fused_loss, fused_sgd, multi_worker  # noqa: E402
from workloads import build_keras, build_torch, keras_optimizer, make_data, set_seed, torch_optimizer  # noqa: E402,E501

# The multi-process path with one process (see the docstring).
multi_worker.TorchMultiWorkerMirrored.multi_process = property(lambda self: True)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
strategy = ks.MultiWorkerMirrored()
x, y = make_data(args.workload, args.steps * args.batch)

keras_operation_fn = functional.operation_fn


def direct_operation_fn(operation, **call_context_args):
    def call(*a, **kw):
        return operation.call(*a, **kw)

    return call


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.begin)


def keras_fit(distributed, bypass, unfused=False, keras_loss=False, keras_batch_logs=False):
    functional.operation_fn = direct_operation_fn if bypass else keras_operation_fn
    batch_patches = multi_worker.TorchMultiWorkerMirrored.batch_patches
    if keras_batch_logs:
        multi_worker.TorchMultiWorkerMirrored.batch_patches = ()
    supports = fused_adam.supports, fused_sgd.supports
    loss_paths = fused_loss.loss, fused_loss.track
    if unfused:
        fused_adam.supports = fused_sgd.supports = lambda optimizer: False
    if keras_loss:
        fused_loss.loss, fused_loss.track = (lambda *a: None), (lambda *a: False)
    try:
        set_seed(0)
        model = build_keras(args.workload)
        model.compile(optimizer=keras_optimizer(args.optimizer),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        timer = EpochTimer()
        extra = dict(distribution=strategy) if distributed else {}
        model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=False, verbose=0,
                  callbacks=[timer], **extra)
        return timer.seconds[1:]
    finally:
        functional.operation_fn = keras_operation_fn
        fused_adam.supports, fused_sgd.supports = supports
        fused_loss.loss, fused_loss.track = loss_paths
        multi_worker.TorchMultiWorkerMirrored.batch_patches = batch_patches


def ddp_loop(torch_model):
    set_seed(0)
    xs = x
    if torch_model:
        model = build_torch(args.workload)
        if xs.ndim == 4:
            xs = np.ascontiguousarray(xs.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    else:
        model = build_keras(args.workload)
    loader = DataLoader(TensorDataset(torch.from_numpy(xs), torch.from_numpy(y.astype("int64"))),
                        batch_size=args.batch)
    ddp = DistributedDataParallel(model)
    optimizer = torch_optimizer(args.optimizer, ddp.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    seconds = []
    for _ in range(args.epochs):
        begin = time.perf_counter()
        for xb, yb in loader:
            logits = ddp(xb) if torch_model else ddp(xb, training=True)
            loss = loss_fn(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        loss.item()
        seconds.append(time.perf_counter() - begin)
    return seconds[1:]


RUN = {
    "ks": lambda: keras_fit(True, False),
    "ks_unfused": lambda: keras_fit(True, False, unfused=True),
    "ks_keras_loss": lambda: keras_fit(True, False, keras_loss=True),
    "ks_keras_batch_logs": lambda: keras_fit(True, False, keras_batch_logs=True),
    "keras_fit": lambda: keras_fit(False, False),
    "keras_ddp": lambda: ddp_loop(False),
    "torch_ddp": lambda: ddp_loop(True),
    "ks_no_layer_call": lambda: keras_fit(True, True),
    "keras_fit_no_layer_call": lambda: keras_fit(False, True),
}
methods = args.methods.split(",")
if args.bypass_layer_call:
    methods += ["ks_no_layer_call", "keras_fit_no_layer_call"]
seconds = {m: [] for m in methods}
for round_ in range(args.rounds):
    for method in methods if round_ % 2 == 0 else methods[::-1]:
        seconds[method] += RUN[method]()
ms = {m: dict(median=1e3 * statistics.median(s) / args.steps, min=1e3 * min(s) / args.steps)
      for m, s in seconds.items()}
print(f"{args.workload}, {args.optimizer}, batch {args.batch}, 1 thread, {args.rounds} rounds x {args.epochs - 1} epochs "
      f"x {args.steps} steps; throughput over torch_ddp = its ms/step over the method's")
for method, value in ms.items():
    ratio = ms["torch_ddp"]["median"] / value["median"] if "torch_ddp" in ms else float("nan")
    print(f"  {method:24s} {value['median']:7.2f} ms/step (min {value['min']:6.2f})   x{ratio:.2f}")
if args.out:
    with open(args.out, "w") as f:
        json.dump(dict(config=vars(args), ms_per_step=ms, versions=dict(keras=keras.__version__,
                                                                          torch=torch.__version__),
                       date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_average=os.getloadavg()), f, indent=1)
dist.destroy_process_group()
