"""Before and after the `jax-one-device-mesh` patch: ours `Mirrored(["cpu:0"])` on
JAX, one device, in fresh processes alternating (A B, B A, ...).

    python benchmarks/one_device_compile.py ROUNDS [worker.py options]
    python benchmarks/one_device_compile.py 4 --workload cnn --steps 10

"before" runs benchmarks/worker.py with the patch left out of the strategy's
run patches, "after" as shipped. Prints each run's epoch times (the first
holds the step's compilations) and the medians: the patch saves the train
step's second compilation, a first-epoch cost; later epochs are unchanged.
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
wrapper = """
import sys, runpy
sys.argv = sys.argv[1:]
import keras_strategies
from keras_strategies.backends.jax.base import JaxImplementation
if OFF:
    JaxImplementation.keras_patches = tuple(p for p in JaxImplementation.keras_patches if p != "jax-one-device-mesh")
runpy.run_path(sys.argv[0], run_name="__main__")
"""
res = {"before": [], "after": []}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    for which in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
        out = f"/tmp/one-device-compile-{os.getpid()}-{which}-{r}"
        code = wrapper.replace("OFF", str(which == "before"))
        env = dict(os.environ, KERAS_BACKEND="jax", CUDA_VISIBLE_DEVICES="",
                   XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        subprocess.run([sys.executable, "-c", code, "benchmarks/worker.py", "--method", "ks", "--strategy", "mirrored",
                        "--replicas", "1", "--epochs", "3", "--steps", "50", "--out", out, *sys.argv[2:]],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        d = json.load(open(out + ".rank0.json"))
        res[which].append(d["epoch_seconds"])
        print(which, r, [round(t, 3) for t in d["epoch_seconds"]], flush=True)
for k, v in res.items():
    print(k, "first epoch median", round(statistics.median(e[0] for e in v), 3), "s; later epochs median",
          round(statistics.median(t for e in v for t in e[1:]), 3), "s")
