"""Every case of tests/features.py under MultiWorkerMirrored, in one job.

    python -m keras_strategies.launch --nproc-per-node 2 tests/features_job.py OUT_DIR [CASE ...]

Run by each worker: trains every case under the strategy, compares it with
the case trained on one device (`features.compare`; each worker trains its
share of those and reads the others' from OUT_DIR), and writes `OUT_DIR/rank<r>.json`
with each case's verdict and a fingerprint of its final weights (every worker
must hold the same). A model trained with the strategy passed to `fit`, and
one built in its scope, are also saved and loaded.
"""

import json
import os
import pickle
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

strategy = ks.MultiWorkerMirrored()
# JAX: the strategy agrees on a seed without importing TensorFlow, and seeds
# it once it is imported (a tf.data shuffle must agree between the workers)
tensorflow_imported_by_strategy, tensorflow_draw = "tensorflow" in sys.modules, None
if os.environ.get("KERAS_BACKEND") == "jax":
    import tensorflow as tf

    tensorflow_draw = [float(v) for v in tf.random.uniform([4])]

import numpy as np  # noqa: E402
from features import BY_NAME, CASES, check_save_and_load, compare  # noqa: E402

out = sys.argv[1]
names = sys.argv[2:] or [case.name for case in CASES]
rank = strategy.worker_index


def fingerprint(result):
    """A few numbers that differ when the weights differ at all (None when
    Keras refused the case, as the test on one device expected)."""
    if "weights" not in result:
        return None
    return [float(np.sum(w * (1.0 + np.arange(w.size).reshape(w.shape) % 7))) for w in result["weights"]]


def one_device(names, timeout=600):
    """`{name: result}` of every case trained on one device. They are the same
    on every worker, so each trains its share (every num_workers-th case)
    and writes it to OUT_DIR; the others' shares are read from there."""
    mine = {name: BY_NAME[name].train() for name in names[rank::strategy.num_workers]}
    with open(os.path.join(out, f"one-device-{rank}.tmp"), "wb") as f:
        pickle.dump(mine, f)
    os.replace(os.path.join(out, f"one-device-{rank}.tmp"), os.path.join(out, f"one-device-{rank}.pkl"))
    deadline = time.monotonic() + timeout
    for other in range(strategy.num_workers):
        path = os.path.join(out, f"one-device-{other}.pkl")
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {other} wrote no one-device results ({path}) in {timeout} s")
            time.sleep(0.2)
        with open(path, "rb") as f:
            mine.update(pickle.load(f))
    return mine


def run(name, checks=(), **how):
    case = BY_NAME[name]
    got = case.train(**how, keep_model="save" in checks)
    compare(case, got, want[name])
    return got


want = one_device(sorted(set(names) | {"momentum"}))
verdicts, fingerprints = {}, {}
plan = [(name, {"distribution": strategy}) for name in names]
plan += [("momentum/scope", {"scope": strategy, "checks": ("save",)}),
         ("momentum/save", {"distribution": strategy, "checks": ("save",)})]
for label, how in plan:
    name = label.split("/")[0]
    try:
        got = run(name, **how)
        if "save" in how.get("checks", ()):
            check_save_and_load(got, os.path.join(out, f"{label.replace('/', '-')}-{rank}.keras"))
        verdicts[label] = "ok"
        fingerprints[label] = fingerprint(got)
    except Exception:  # noqa: BLE001 - every case is reported, the test fails on any
        verdicts[label] = traceback.format_exc()[-3000:]
    print(f"{label}: {'ok' if verdicts[label] == 'ok' else 'FAILED'}", flush=True)

with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "workers": strategy.num_workers, "replicas": strategy.num_replicas_in_sync,
               "verdicts": verdicts, "fingerprints": fingerprints,
               "tensorflow_imported_by_strategy": tensorflow_imported_by_strategy,
               "tensorflow_draw": tensorflow_draw}, f)
