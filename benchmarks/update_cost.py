"""The optimizer update alone on the torch backend: Keras's own against the
fused one (`backends/torch/fused_adam.py`, `fused_sgd.py`), one thread.

    python benchmarks/update_cost.py --optimizer momentum --rounds 20

What the multi-process step does after the all-reduce, timed with nothing
else around it: divide the summed gradients by the example count, then
`optimizer.apply`; with the fused SGD update the division is folded into the
kernel. The benchmark MLP's parameters (784-256-256-10), blocks of `--applies`
calls, the two methods alternating block by block; prints the median and
minimum milliseconds per update of each and their ratio.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["KERAS_BACKEND"] = "torch"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--optimizer", default="sgd", choices=["adam", "adamw", "momentum", "sgd"])
parser.add_argument("--rounds", type=int, default=20)
parser.add_argument("--applies", type=int, default=100, help="updates per block")
args = parser.parse_args()

if hasattr(os, "sched_setaffinity"):  # one core: the scheduler moving us was the largest noise
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})

import torch  # noqa: E402

torch.set_num_threads(1)

import keras  # noqa: E402

from keras_strategies.backends.torch import fused_adam, fused_sgd  # noqa: E402
from workloads import build_keras, keras_optimizer, set_seed  # noqa: E402

set_seed(0)
model = build_keras("mlp")
variables = model.trainable_variables
COUNT = torch.tensor(128.0)


def make(fused):
    optimizer = keras_optimizer(args.optimizer)
    optimizer.build(variables)
    grads = [torch.randn(v.value.shape) * 1e-3 for v in variables]
    if not fused:
        def update():
            torch._foreach_div_(grads, COUNT)
            optimizer.apply(grads, variables)
        return optimizer, None, update
    context = fused_sgd.fused_sgd(optimizer) if fused_sgd.supports(optimizer) else fused_adam.fused_adam(optimizer)

    def update():
        if fused_sgd.folds_count(optimizer, variables):
            with fused_sgd.dividing_by(COUNT):
                optimizer.apply(grads, variables)
        else:
            torch._foreach_div_(grads, COUNT)
            optimizer.apply(grads, variables)
    return optimizer, context, update


times = {"keras": [], "fused": []}
methods = {"keras": make(False), "fused": make(True)}
with torch.no_grad(), methods["fused"][1]:
    for name, (_, _, update) in methods.items():  # warm up
        for _ in range(10):
            update()
    for r in range(args.rounds):
        for name in (("keras", "fused") if r % 2 == 0 else ("fused", "keras")):
            update = methods[name][2]
            begin = time.perf_counter()
            for _ in range(args.applies):
                update()
            times[name].append((time.perf_counter() - begin) / args.applies * 1e3)

print(f"{args.optimizer}: {keras.__version__=} {torch.__version__=}; {args.rounds} rounds x {args.applies} updates, "
      "ms per update (count division + apply)")
for name, values in times.items():
    print(f"  {name:6s} median {statistics.median(values):.3f}  min {min(values):.3f}")
print(f"  keras / fused (median): {statistics.median(times['keras']) / statistics.median(times['fused']):.2f}")
