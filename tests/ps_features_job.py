"""tests/features.py's cases under ParameterServer with one worker, in one job.

    python -m keras_strategies.launch --nproc-per-node 3 --num-ps 1 tests/ps_features_job.py OUT_DIR CASE...

A CASE written `!name` must be refused by the chief with a clear error (on
PyTorch and JAX a worker trains the model and input of its own first fit).

With one worker, every update is applied before the next step reads the
variables (staleness 0), so asynchronous training must equal one device: the
chief trains each case on one device (locally) and under the strategy,
compares them (`features.compare`) and writes `OUT_DIR/chief.json` with each
case's verdict and the staleness it saw. The other roles serve.
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

strategy = ks.ParameterServer()

from features import BY_NAME, compare  # noqa: E402

out = sys.argv[1]
names = sys.argv[2:]
verdicts, staleness = {}, {}
for label in names:
    name, refused = label.lstrip("!"), label.startswith("!")
    case = BY_NAME[name]
    try:
        if refused:  # another input or model than the workers': the chief must refuse it, clearly
            got = case.train(distribution=strategy)
            assert "StrategyError" in got.get("error", "") and "run one model and one training input per job" in \
                got["error"], got.get("error", "trained")
            verdicts[label] = "ok"
            continue
        want = case.train()
        got = case.train(distribution=strategy)
        if "history" in got:
            staleness[name] = max(got["history"].pop("max_staleness", [None]) + [0])
            got["history"].pop("staleness", None)
        compare(case, got, want)
        verdicts[label] = "ok"
    except Exception:  # noqa: BLE001 - every case is reported, the test fails on any
        verdicts[label] = traceback.format_exc()[-3000:]
    print(f"{label}: {'ok' if verdicts[label] == 'ok' else 'FAILED'}", flush=True)

with open(os.path.join(out, "chief.json"), "w") as f:
    json.dump({"workers": strategy.num_workers, "ps": strategy.num_ps, "verdicts": verdicts,
               "staleness": staleness, "updates_applied": strategy.updates_applied()}, f)
print("chief done", flush=True)
