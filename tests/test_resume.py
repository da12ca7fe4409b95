"""Exact resume from BackupAndRestore (issue #14): a run that was stopped and
run again ends with the weights of a run that never stopped.

Per backend, one 2-process MultiWorkerMirrored job story (three job starts),
in-process Mirrored and CentralStorage runs, and a backup written by another
backend's process. Every wait is bounded and every process is killed at the
end (tests/test_multi_worker.py's helpers).
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND, REPLICA_DEVICES
from models import RESUME_JOB_SEED, StopBefore, largest_difference, resume_fit, resume_model
from test_multi_worker import base_env, run_launcher

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "resume_job.py")
TIMEOUT = 240
EXACT = 1e-5  # float32, the same backend
ACROSS_BACKENDS = 1e-4
# the backend that writes the backup this backend's run resumes
WRITER = {"tensorflow": "torch", "jax": "tensorflow", "torch": "jax"}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def backups(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("backup-"))


def contents(directory):
    """Every file under `directory` and a hash of its bytes."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return found


def job(out, backup, *options, processes=2, launcher=()):
    os.makedirs(out, exist_ok=True)
    return run_launcher(["--nproc-per-node", str(processes), *launcher, JOB, str(out), str(backup), *options],
                        TIMEOUT)


def test_multi_worker_killed_resumed_preempted_and_resumed_on_one_worker(tmp_path):
    """2 processes under `--max-restarts 1`, rank 1 SIGKILLed before batch
    14: the launcher restarts both, which resume from the chief's backup at
    batch 12 (the non-chief with an empty private backup directory: no
    shared disk) and end with the weights of a run that never stopped. A new
    run: rank 1 gets SIGTERM before batch 20: every rank finishes batch 20,
    the chief backs it up (no step lost) and both exit with
    PREEMPTED_EXIT_CODE holding the same weights; one process resumes that
    backup and ends with the weights of a run that never stopped."""
    backup = tmp_path / "backup"
    code, text = job(tmp_path / "killed", tmp_path / "first", "--private", "--stop-at", "14", "--stop-with", "KILL",
                     "--reference", launcher=("--max-restarts", "1"))
    assert code == 0 and "restart 1 of 1" in text and "killed by SIGKILL" in text, text[-3000:]
    restarted = [read_json(tmp_path / "killed" / f"rank{r}.json") for r in range(2)]
    assert [r["epochs"] for r in restarted] == [[1, 2]] * 2, restarted  # resumed at batch 12, in epoch 1
    assert max(r["reference_difference"] for r in restarted) < EXACT, restarted
    assert not os.path.exists(restarted[1]["backup_dir"])  # a non-chief writes nothing

    code, text = job(tmp_path / "preempted", backup, "--private", "--stop-at", "20", "--stop-with", "TERM")
    assert code == ks.PREEMPTED_EXIT_CODE, text[-3000:]
    ranks = [read_json(tmp_path / "preempted" / f"rank{r}.json") for r in range(2)]
    assert [r["exit"] for r in ranks] == [ks.PREEMPTED_EXIT_CODE] * 2, ranks
    assert not os.path.exists(ranks[1]["backup_dir"])  # a non-chief writes nothing
    weights = [np.load(tmp_path / "preempted" / f"weights{r}.npz") for r in range(2)]
    assert largest_difference([weights[0][k] for k in weights[0].files],
                              [weights[1][k] for k in weights[1].files]) == 0.0
    assert backups(backup)[-1] == "backup-000000000020"
    state = read_json(backup / "backup-000000000020" / "state.json")
    assert (state["epoch"], state["step"], state["workers"]) == (2, 2, 2)

    code, text = job(tmp_path / "resumed", backup, "--reference", "--seed", "8", processes=1)
    assert code == 0, text[-3000:]
    result = read_json(tmp_path / "resumed" / "rank0.json")
    assert result["workers"] == 1 and result["epochs"] == [2] and result["iterations"] == 27
    assert result["reference_difference"] < EXACT, result


def _stopped_and_resumed(strategy, optimizer, backup_dir, how, truncate=False):
    """Trains with a stop before batch 14, resumes, returns the final weights."""
    model = resume_model(optimizer)
    if how == "TERM":  # one process, plain: SIGTERM saves after the step and exits with 75
        delivered = []  # what reaches the handler outside fit (nothing: fit handled it)
        previous = signal.signal(signal.SIGTERM, lambda *_: delivered.append(1))
        try:
            with pytest.raises(SystemExit) as stopped:
                resume_fit(model, backup_dir, strategy, [StopBefore(14, how)])
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert stopped.value.code == ks.PREEMPTED_EXIT_CODE and delivered == []
        assert backups(backup_dir)[-1] == "backup-000000000014"
    else:
        with pytest.raises(RuntimeError, match="stopped before batch 14"):
            resume_fit(model, backup_dir, strategy, [StopBefore(14, how)])
        assert backups(backup_dir) == ["backup-000000000008", "backup-000000000012"]
    if truncate:  # the newest backup is damaged: the one before it is used
        path = os.path.join(backup_dir, backups(backup_dir)[-1], "model.weights.h5")
        with open(path, "r+b") as f:
            f.truncate(96)
    model = resume_model(optimizer)
    assert resume_fit(model, backup_dir, strategy, delete=True) == ([0, 1, 2] if truncate else [1, 2])
    assert int(np.asarray(model.optimizer.iterations)) == 27
    assert not os.path.exists(backup_dir)
    return model.get_weights()


@pytest.mark.in_process
@pytest.mark.parametrize("name, optimizer, how, truncate", [
    ("Mirrored", "adam", "RAISE", True),
    ("Mirrored", "sgd", "TERM", False),
    ("CentralStorage", "sgd", "TERM", False),
    ("CentralStorage", "adam", "RAISE", True),
])
def test_mirrored_and_central_storage_resume_exactly(tmp_path, caplog, name, optimizer, how, truncate):
    """In this process: a fit stopped before batch 14 (an exception, or
    SIGTERM: saved after batch 14, SystemExit 75) and run again ends within
    1e-5 of an uninterrupted fit, having trained 27 steps in all; with its
    newest backup truncated it resumes from the one before, saying so in one
    warning line."""
    strategy = ks.Mirrored(devices=REPLICA_DEVICES) if name == "Mirrored" else ks.CentralStorage()
    reference = resume_model(optimizer)
    resume_fit(reference, str(tmp_path / "reference"), strategy)
    with caplog.at_level(logging.WARNING, logger="keras_strategies"):
        weights = _stopped_and_resumed(strategy, optimizer, str(tmp_path / "backup"), how, truncate)
    assert largest_difference(weights, reference.get_weights()) < EXACT
    warned = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(warned) == (1 if truncate else 0), warned
    if truncate:  # one line, naming the backup it passed over and the one it used
        assert "\n" not in warned[0]
        assert warned[0].index("backup-000000000012") < warned[0].index("backup before it, ")
        assert warned[0].endswith("backup-000000000008")


def test_a_backup_from_another_backend_resumes_and_a_mismatch_is_refused(tmp_path):
    """A backup written by another backend's process resumes here (within
    1e-4 of a run that never stopped here); one written for another model or
    optimizer raises a StrategyError naming the difference and is left as
    it was."""
    backup = tmp_path / "backup"
    env = base_env(KERAS_BACKEND=WRITER[BACKEND])
    os.makedirs(tmp_path / "writer")
    done = subprocess.run([sys.executable, JOB, str(tmp_path / "writer"), str(backup), "--strategy", "default",
                           "--stop-at", "14", "--stop-with", "RAISE"], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-3000:]
    before = contents(backup)
    assert read_json(backup / "backup-000000000012" / "state.json")["backend"] == WRITER[BACKEND]

    strategy = ks.Default()
    for model, named in ((resume_model("adam", width=12), "has shape (8, 16), this model's"),
                         (resume_model("sgd"), "its optimizer is Adam, this model's is SGD")):
        with pytest.raises(ks.StrategyError, match="written for another model") as error:
            resume_fit(model, str(backup), strategy)
        assert named in str(error.value)
    assert contents(backup) == before

    model = resume_model("adam")
    assert resume_fit(model, str(backup), strategy) == [1, 2]
    reference = resume_model("adam")  # from the writer's initial weights (each engine draws its own)
    initial = np.load(tmp_path / "writer" / "initial0.npz")
    reference.set_weights([initial[k] for k in initial.files])
    keras.utils.set_random_seed(RESUME_JOB_SEED)  # the writer's shuffle orders
    resume_fit(reference, str(tmp_path / "reference"), strategy)
    assert largest_difference(model.get_weights(), reference.get_weights()) < ACROSS_BACKENDS


@pytest.mark.in_process
def test_a_backup_is_never_left_half_written(tmp_path):
    """A writer that dies mid-write (here: its save raises after half a file)
    leaves the backups as they were; only the newest two are kept."""
    from keras_strategies.implementation import backup_files

    def complete(path):
        with open(path, "wb") as f:
            f.write(b"weights")

    for batches in (4, 8, 12):
        backup_files.write(str(tmp_path), batches, complete, {"batches": batches})
    assert backups(tmp_path) == ["backup-000000000008", "backup-000000000012"]
    before = contents(tmp_path)

    def dies_while_writing(path):
        with open(path, "wb") as f:
            f.write(b"wei")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        backup_files.write(str(tmp_path), 16, dies_while_writing, {"batches": 16})
    assert contents(tmp_path) == before
    assert backup_files.read_state(backup_files.backups(str(tmp_path))[0]) == {"batches": 12}
    # SIGKILLed while writing: its temporary directory is not a backup, and goes
    os.makedirs(tmp_path / ".tmp-1-dead")
    with open(tmp_path / ".tmp-1-dead" / "model.weights.h5", "wb") as f:
        f.write(b"wei")
    assert backups(tmp_path) == ["backup-000000000008", "backup-000000000012"]
    backup_files.remove_leftovers(str(tmp_path))
    assert contents(tmp_path) == before
