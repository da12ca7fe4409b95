"""The training job of tests/test_resume.py, run by every process of a job.

    python tests/resume_job.py OUT BACKUP_DIR [--strategy mw|default] [--optimizer adam|sgd]
        [--private] [--stop-at N --stop-rank R --stop-with KILL|TERM|RAISE] [--reference] [--seed S]

Every process trains `models.resume_model` with `models.resume_fit`
(`BackupAndRestore(BACKUP_DIR, save_freq=4)`, shuffled arrays, a decaying
learning rate). With
`--private` each non-chief gets its own empty backup directory (no shared
filesystem). `--stop-*` interrupts the run when batch N (1-based, counted
over the whole run) is about to start: SIGKILL or SIGTERM to rank R, or an
exception (`RAISE`, in every process). Each process writes OUT/rank{R}.json
(what it trained, whether it was preempted), OUT/initial{R}.npz (the weights
it started from) and OUT/weights{R}.npz, also when preempted. `--reference` then trains the same model without interruption in
this process (Keras's seed set to that of a run that starts afresh, 7) and
records the largest difference from the resumed weights. Keras's seed is
`--seed` (7) plus the launcher's restart count: a resumed run matches the
reference only with the order its backup recorded.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("backup")
parser.add_argument("--strategy", default="mw")
parser.add_argument("--optimizer", default="adam")
parser.add_argument("--private", action="store_true")
parser.add_argument("--stop-at", type=int, default=None)
parser.add_argument("--stop-rank", type=int, default=1)
parser.add_argument("--stop-with", default="KILL")
parser.add_argument("--reference", action="store_true")
parser.add_argument("--seed", type=int, default=None,
                    help="Keras's seed, plus the launcher's restart count (default models.RESUME_JOB_SEED)")
args = parser.parse_args()

strategy = ks.MultiWorkerMirrored() if args.strategy == "mw" else ks.Default()
rank = strategy.worker_index

import keras  # noqa: E402
import numpy as np  # noqa: E402
from models import RESUME_JOB_SEED as SEED, StopBefore, largest_difference, resume_fit, resume_model  # noqa: E402,E501


def save(result, model):
    np.savez(os.path.join(args.out, f"weights{rank}.npz"), *model.get_weights())
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


backup_dir = args.backup if rank == 0 or not args.private else f"{args.backup}-private{rank}"
restarts = int(os.environ.get("KERAS_STRATEGIES_RESTART_COUNT", "0"))
model = resume_model(args.optimizer)  # the same weights in every run (it seeds Keras itself)
# A resumed fit must take its shuffle order from the backup: a restarted or
# later run seeds Keras otherwise than the run that wrote it.
keras.utils.set_random_seed((SEED if args.seed is None else args.seed) + restarts)
np.savez(os.path.join(args.out, f"initial{rank}.npz"), *model.get_weights())
first_run = restarts == 0  # a restarted run is not stopped
callbacks = [StopBefore(args.stop_at, args.stop_with, rank == args.stop_rank)] if args.stop_at and first_run else []
result = {"rank": rank, "workers": strategy.num_workers, "backup_dir": backup_dir,
          "backend": keras.backend.backend()}
try:
    result["epochs"] = resume_fit(model, backup_dir, strategy, callbacks)
except SystemExit as exit:
    result["exit"] = exit.code
    save(result, model)
    raise
except RuntimeError as error:
    result["error"] = str(error)
    save(result, model)
    raise SystemExit(3)
result["iterations"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
if args.reference:
    reference = resume_model(args.optimizer)
    keras.utils.set_random_seed(SEED)
    resume_fit(reference, tempfile.mkdtemp(), strategy)
    result["reference_difference"] = largest_difference(model.get_weights(), reference.get_weights())
save(result, model)
