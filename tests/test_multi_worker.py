"""MultiWorkerMirrored with 2 real processes on 127.0.0.1, started through the
launcher and through each cluster format. Every wait has a deadline and every
process is killed at the end, whatever happens."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import BACKEND
from keras_strategies.launch.ports import free_port
from models import is_loopback_address, writers

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mp_worker.py")
CLUSTER_VARIABLES = (
    "TF_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "MASTER_ADDR", "MASTER_PORT", "XLA_FLAGS",
)
RUN_TIMEOUT = 300
FEATURES_TIMEOUT = 900


def base_env(**extra):
    env = {
        k: v for k, v in os.environ.items()
        if k not in CLUSTER_VARIABLES and not k.startswith(("SLURM_", "KERAS_DISTRIBUTION_"))
    }
    env.update(KERAS_BACKEND=BACKEND, KERAS_STRATEGIES_TIMEOUT="60", OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_ranks(envs, out, *worker_args, timeout=RUN_TIMEOUT):
    """Starts one process per env, waits for all (bounded), always kills them."""
    processes, logs = [], []
    try:
        for rank, env in enumerate(envs):
            log = open(os.path.join(out, f"output{rank}.log"), "w")
            logs.append(log)
            processes.append(subprocess.Popen(
                [sys.executable, WORKER, str(out), *worker_args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        deadline = time.monotonic() + timeout
        codes = []
        for process in processes:
            codes.append(process.wait(timeout=max(1, deadline - time.monotonic())))
        return codes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for log in logs:
            log.close()


def run_launcher(arguments, timeout):
    """`python -m keras_strategies.launch ARGUMENTS`: (exit code, output).
    Past `timeout` the launcher gets SIGTERM (it stops every rank, each in
    its own process group), then SIGKILL."""
    process = subprocess.Popen([sys.executable, "-m", "keras_strategies.launch", *arguments], env=base_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        text, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        text, _ = process.communicate(timeout=60)
        text += f"\n(stopped after {timeout}s)"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    return process.returncode, text


def output(out, rank):
    with open(os.path.join(out, f"output{rank}.log")) as f:
        return f.read()


def check_listening(results, tf_ports=None):
    """A job on this machine listens on loopback only; TensorFlow's gRPC
    server (one per worker) listens on every interface: it has no option."""
    for result in results:
        open_ports = sorted(port for address, port in result["listening"] if not is_loopback_address(address))
        if BACKEND != "tensorflow":
            assert open_ports == [], result["listening"]
        elif tf_ports is not None:
            assert open_ports == [tf_ports[result["rank"]]], result["listening"]
        else:
            assert len(open_ports) == 1, result["listening"]


def check_results(out, epochs=2, tf_ports=None):
    results = []
    for rank in range(2):
        path = os.path.join(out, f"rank{rank}.json")
        assert os.path.exists(path), output(out, rank)[-3000:]
        with open(path) as f:
            results.append(json.load(f))
    check_listening(results, tf_ports)
    weights = [np.load(os.path.join(out, f"weights{r}.npz")) for r in range(2)]
    for key in weights[0].files:  # every worker holds identical weights
        np.testing.assert_array_equal(weights[0][key], weights[1][key])
    for result in results:
        assert result["workers"] == 2 and result["replicas"] == 2
        # a loss-dependent stop took the same decision on every worker (after epoch 2 of 3)
        assert len(result["history"]["loss"]) == len(result["ref_history"]["loss"]) == epochs
        assert result["max_weight_diff"] < 1e-5  # equals one device on the global batches
        for key, values in result["ref_history"].items():
            np.testing.assert_allclose(result["history"][key], values, atol=1e-5)
        np.testing.assert_allclose(result["evaluate"], result["ref_evaluate"], atol=1e-5)
        assert result["predictions"] == 69 and result["max_predict_diff"] < 1e-5
        # before any fit, every worker predicted and evaluated with worker 0's weights
        assert result["max_predict_before_diff"] < 1e-5
        np.testing.assert_allclose(result["evaluate_before"], result["ref_evaluate_before"], atol=1e-5)
        # its contiguous half of 64 rows: not all of them, nor a part of every batch
        half = 32 * result["rank"]
        assert result["predicted_rows"] == list(range(half, half + 32)), result["predicted_rows"]
    assert [r["is_chief"] for r in results] == [True, False]
    # only the chief wrote, into the user's paths, and nothing else is there
    user = os.path.join(out, "user")
    assert writers(os.path.join(out, "saves.txt"), os.path.join(user, "ckpt.weights.h5")) == {
        str(results[0]["pid"])}
    assert sorted(os.listdir(user)) == ["backup", "ckpt.weights.h5", "log.csv"]
    with open(os.path.join(user, "log.csv")) as f:
        assert len(f.read().strip().splitlines()) == epochs + 1  # one writer, one header
    # only the chief printed progress
    assert "Epoch 1/" in output(out, 0) and "Epoch 1/" not in output(out, 1)


def test_a_non_chief_backup_never_touches_the_users_directory(tmp_path):
    """In one process: a non-chief's BackupAndRestore restores from the user's
    directory but saves only into its scratch directory (creating the user's
    directory raced the chief's own makedirs: FileExistsError on the chief)."""
    import keras

    from keras_strategies.implementation.chief_only import non_chief_callbacks

    user = os.path.join(tmp_path, "user", "backup")
    scratch = os.path.join(tmp_path, "scratch")
    os.makedirs(scratch)
    callbacks = non_chief_callbacks([keras.callbacks.BackupAndRestore(user)], scratch)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 3)), np.ones((8, 1)), epochs=2, verbose=0, callbacks=callbacks)
    assert not os.path.exists(os.path.join(tmp_path, "user"))
    assert "latest.weights.h5" in os.listdir(os.path.join(scratch, "backup"))


# Each run below checks one way of starting the job and, so that the suite
# stays short, one more thing: an input type, BatchNormalization (statistics
# over the global batch, identical on every worker), a custom train_step.


def test_launcher_with_batch_norm(tmp_path):
    env = base_env()
    with open(os.path.join(tmp_path, "output0.log"), "w") as log:
        pass
    log_path = os.path.join(tmp_path, "launcher.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from keras_strategies.launch import launch; "
             f"sys.exit(launch([sys.executable, {WORKER!r}, {str(tmp_path)!r}, '--batch-norm', '--count-threads'], "
             f"nproc_per_node=2, timeout={RUN_TIMEOUT}))"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            code = process.wait(timeout=RUN_TIMEOUT + 30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    with open(log_path) as f:
        text = f.read()
    assert code == 0, text[-4000:]
    for rank in range(2):  # the launcher prefixes each rank's lines
        with open(os.path.join(tmp_path, f"output{rank}.log"), "w") as f:
            f.write("\n".join(line.split("] ", 1)[1] for line in text.splitlines()
                              if line.startswith(f"[rank {rank}] ")))
    check_results(tmp_path)
    # A second epoch of 40 steps, after the first: no thread more per step. TensorFlow
    # keeps a collective's deadline with a thread per collective, sleeping for the
    # whole deadline (here 60 s); run so, each step (gradients, logs, synchronized
    # BatchNormalization) left several behind, and a long job ran out of threads.
    for rank in range(2):
        with open(os.path.join(tmp_path, f"rank{rank}.json")) as f:
            threads = json.load(f)["threads"]
        first, second = threads["after_each_epoch"]
        assert second - first < threads["steps_per_epoch"] // 4, threads
        if BACKEND == "tensorflow":
            # one input iterator for both epochs and one for both validations, as
            # TensorFlow's own training loop (backends/tensorflow/one_iterator.py);
            # Keras makes one per epoch and one per validation
            assert threads["iterators"] == 2, threads


def test_torchrun_with_tf_data(tmp_path):
    """The same script, unchanged, under torchrun (any backend)."""
    log_path = os.path.join(tmp_path, "torchrun.log")
    env = base_env(MASTER_PORT=str(free_port()))
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", env["MASTER_PORT"],
             "--tee", "3", "--log-dir", os.path.join(tmp_path, "torchrun-logs"),
             WORKER, str(tmp_path), "--input", "tf_data"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            code = process.wait(timeout=RUN_TIMEOUT)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    with open(log_path) as f:
        text = f.read()
    assert code == 0, text[-4000:]
    for rank in range(2):  # torchrun's --tee prefixes each rank's lines with "[default<rank>]:"
        with open(os.path.join(tmp_path, f"output{rank}.log"), "w") as f:
            f.write("\n".join(line.split(":", 1)[1] for line in text.splitlines()
                              if line.startswith(f"[default{rank}]:")))
    check_results(tmp_path)


def test_tf_config_with_py_dataset_shuffled_fits_and_a_convnet(tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    envs = [base_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": r}}))
            for r in range(2)]
    codes = run_ranks(envs, tmp_path, "--input", "py_dataset", "--coverage", "--kind", "convnet",
                      "--batch-norm")
    assert codes == [0, 0], output(tmp_path, 0)[-3000:] + output(tmp_path, 1)[-3000:]
    check_results(tmp_path, tf_ports=ports)
    # a shuffled epoch sees each example exactly once, on every worker
    seen = [np.load(os.path.join(tmp_path, f"coverage{r}.npy")) for r in range(2)]
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_allclose(seen[0], 2 * 0.5 / 16, rtol=1e-6)
    # two shuffled fits in one program: each covers every row once across the
    # workers (they agree on its order), and the second draws a new order
    orders = [json.load(open(os.path.join(tmp_path, f"orders{r}.json"))) for r in range(2)]
    for fit in range(2):
        assert sorted(orders[0][fit] + orders[1][fit]) == list(range(64)), (fit, orders)
    assert orders[0][0] != orders[0][1] and orders[1][0] != orders[1][1], orders


def test_keras_distribution_variables_scope_and_dataloader(tmp_path):
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    envs = [base_env(KERAS_DISTRIBUTION_JOB_ADDRESSES=addresses, KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                     KERAS_DISTRIBUTION_PROCESS_ID=str(r)) for r in range(2)]
    codes = run_ranks(envs, tmp_path, "--pattern", "scope", "--input", "torch_dataloader")
    assert codes == [0, 0], output(tmp_path, 0)[-3000:] + output(tmp_path, 1)[-3000:]
    check_results(tmp_path)


def test_slurm_variables_with_a_custom_train_step_and_batch_norm(tmp_path):
    port = str(free_port())
    envs = [base_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODEID="0",
                     SLURM_NODELIST="localhost", SLURM_JOB_ID="42", MASTER_PORT=port)
            for r in range(2)]
    codes = run_ranks(envs, tmp_path, "--kind", "custom_train_step", "--batch-norm")
    assert codes == [0, 0], output(tmp_path, 0)[-3000:] + output(tmp_path, 1)[-3000:]
    check_results(tmp_path)


def torchrun_envs(timeout):
    port = str(free_port())
    return [base_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, KERAS_STRATEGIES_TIMEOUT=str(timeout))
            for r in range(2)]


@pytest.mark.parametrize("fault", ["--die-at-step", "--hang-at-step"])
def test_a_dead_or_hung_peer_ends_the_job_with_a_clear_error(tmp_path, fault):
    timeout = 12
    start = time.monotonic()
    processes, log = [], open(os.path.join(tmp_path, "output0.log"), "w")
    try:
        for rank, env in enumerate(torchrun_envs(timeout)):
            processes.append(subprocess.Popen(
                [sys.executable, WORKER, str(tmp_path), fault, "5"], env=env,
                stdout=log if rank == 0 else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
        code = processes[0].wait(timeout=timeout + 150)
        elapsed = time.monotonic() - start
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        log.close()
    text = output(tmp_path, 0)
    assert code != 0, text[-3000:]
    assert "WorkerError" in text and "lost contact with its peers" in text, text[-3000:]
    assert elapsed < timeout + 150


MIRRORED_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import keras_strategies as ks
strategy = ks.Mirrored(devices=["cpu:0", "cpu:1"])
import keras
import numpy as np
from models import RecordingCheckpoint, build, initial_weights, make_data
x, y = make_data()
weights = initial_weights("functional")
reference = build("functional", weights)
reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
model = build("functional", weights)
out = {out!r}
callbacks = [RecordingCheckpoint(os.path.join(out, "ckpt.weights.h5"), os.path.join(out, "saves.txt"),
                                 save_weights_only=True),
             keras.callbacks.CSVLogger(os.path.join(out, "log.csv"), append=True)]
model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=2, callbacks=callbacks,
          distribution=strategy)
print("RESULT", json.dumps({{
    "rank": strategy.worker_index, "replicas": strategy.num_replicas_in_sync, "pid": os.getpid(),
    "chief": strategy.is_chief, "role": strategy.role,
    "checksum": float(sum(np.sum(w) for w in model.get_weights())),
    "diff": max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights())),
}}))
"""


if BACKEND == "torch":

    def test_torch_mirrored_starts_one_process_per_device_with_chief_only_output(tmp_path):
        """`python train.py` with Mirrored over 2 devices starts 2 processes,
        which obey the multi-process rules: only the chief prints progress and
        writes into the user's paths."""
        from models import is_loopback_address, writers

        script = os.path.join(tmp_path, "train.py")
        with open(script, "w") as f:
            f.write(MIRRORED_SCRIPT.format(tests=HERE, out=str(tmp_path)))
        process = subprocess.Popen([sys.executable, script], env=base_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            text, _ = process.communicate(timeout=RUN_TIMEOUT)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        assert process.returncode == 0, text[-3000:]
        results = sorted(
            (json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT " in line),
            key=lambda r: r["rank"],
        )
        assert [r["rank"] for r in results] == [0, 1], text[-3000:]
        assert all(r["replicas"] == 2 and r["diff"] < 1e-5 for r in results)
        assert results[0]["checksum"] == results[1]["checksum"]
        assert [(r["chief"], r["role"]) for r in results] == [(True, "chief"), (False, "worker")]
        # the chief alone saved into the user's path (the other into its scratch
        # directory), appended the CSV log, and printed progress
        assert writers(os.path.join(tmp_path, "saves.txt"), os.path.join(tmp_path, "ckpt.weights.h5")) == {
            str(results[0]["pid"])}
        with open(os.path.join(tmp_path, "log.csv")) as f:
            assert len(f.read().strip().splitlines()) == 3  # one header, two epochs
        assert text.count("Epoch 1/2") == 1


def test_every_keras_feature_under_multi_worker_mirrored(tmp_path):
    """tests/features.py's cases, each equal to one device on every worker of
    a 2-process job, all in one job (one start), and every worker holding the
    same weights; models trained under the strategy save and load."""
    job = os.path.join(HERE, "features_job.py")
    code, text = run_launcher(["--nproc-per-node", "2", job, str(tmp_path)], FEATURES_TIMEOUT)
    assert code == 0, text[-4000:]
    results = []
    for rank in range(2):
        with open(os.path.join(tmp_path, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    assert [(r["workers"], r["replicas"]) for r in results] == [(2, 2), (2, 2)]
    failed = {f"rank {r['rank']}: {label}": verdict for r in results
              for label, verdict in r["verdicts"].items() if verdict != "ok"}
    assert not failed, "\n".join(f"{k}\n{v}" for k, v in failed.items())
    assert len(results[0]["verdicts"]) >= 28
    assert results[0]["fingerprints"] == results[1]["fingerprints"]
    if BACKEND == "jax":  # the seed agreed on without importing TensorFlow, which is seeded when imported
        assert [r["tensorflow_imported_by_strategy"] for r in results] == [False, False]
        assert results[0]["tensorflow_draw"] == results[1]["tensorflow_draw"]
