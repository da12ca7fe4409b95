"""Jobs over machines of different sizes (issue 17), on one host: two
launchers stand in for two machines, with 2 and 1 processes; on JAX one
process also has 2 devices where the others have 1; on TensorFlow (in a
second job) one worker takes 2 local devices where the other takes 1.
Every wait has a deadline and every process is killed at the end, whatever
happens."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from keras_strategies.errors import LaunchError
from keras_strategies.launch import launch
from keras_strategies.launch.ports import free_port
from test_multi_worker import base_env

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "hetero_job.py")
JOB_TIMEOUT = 240
# node 1's one process holds 2 devices on JAX (the others 1: 4 replicas), and
# 2 logical CPUs on TensorFlow (whose MultiWorkerMirroredStrategy still holds
# one replica per CPU worker: 3 replicas)
NODE1_ENV = {"jax": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
             "tensorflow": {"HETERO_TF_LOGICAL_CPUS": "2"}}.get(BACKEND, {})
REPLICAS = 4 if BACKEND == "jax" else 3


def start_launchers(nprocs, out, extra_envs, timeout=JOB_TIMEOUT):
    """One launcher per machine (`nprocs[k]` processes on node k), all
    started at once; `[(exit code, output)]` once all ended, killed past
    `timeout`. Each launcher writes to its own file (a full pipe would stall
    it, and with it the whole job)."""
    master = f"127.0.0.1:{free_port()}"
    processes, logs = [], [os.path.join(out, f"launcher{node}.log") for node in range(len(nprocs))]
    try:
        for node, (nproc, extra) in enumerate(zip(nprocs, extra_envs)):
            arguments = ["--nnodes", str(len(nprocs)), "--node-rank", str(node), "--master", master,
                         "--nproc-per-node", str(nproc), "--rendezvous-timeout", "60",
                         "--timeout", str(timeout), JOB, str(out)]
            with open(logs[node], "w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "keras_strategies.launch", *arguments], env=base_env(**extra),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout + 30
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    texts = []
    for path in logs:
        with open(path) as f:
            texts.append(f.read())
    return list(zip(codes, texts))


def results(out, world):
    found = []
    for rank in range(world):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            found.append(json.load(f))
    return found


def test_machines_of_different_sizes_train_as_one_device(tmp_path):
    """Node 0 runs 2 processes, node 1 runs 1: the launchers agree on 3 ranks;
    the global batch is split over every replica of every process (JAX: one
    process holds 2 devices, the others 1); training equals one device and every process
    ends with the same weights; a batch that does not divide over the
    replicas gets the clear error naming batch sizes that work."""
    ended = start_launchers([2, 1], tmp_path, [{}, NODE1_ENV])
    outputs = "\n".join(text[-3000:] for _, text in ended)
    assert [code for code, _ in ended] == [0, 0], outputs
    assert "node 0 of 2: ranks 0..1 of 3 (processes per machine: 2, 1)" in ended[0][1], outputs
    assert "node 1 of 2: ranks 2..2 of 3 (processes per machine: 2, 1)" in ended[1][1], outputs
    found = results(tmp_path, 3)
    assert [(r["rank"], r["workers"], r["replicas"]) for r in found] == [(k, 3, REPLICAS) for k in range(3)]
    if BACKEND == "jax":
        assert [len(r["devices"]) for r in found] == [1, 1, 2]
    bad = 32 if 32 % REPLICAS else 30
    low = bad // REPLICAS * REPLICAS
    for result in found:
        assert (f"batch_size={bad} is not a multiple of {REPLICAS}. Use a multiple of {REPLICAS}, such as {low} "
                f"or {low + REPLICAS}.") in result["bad_batch_error"]
        np.testing.assert_allclose(result["evaluate"], result["ref_evaluate"], atol=1e-5)
        assert result["max_predict_diff"] < 1e-5
        np.testing.assert_allclose(result["scoped_evaluate"], result["ref_scoped_evaluate"], atol=1e-5)
        # built by a split predict in the scope, then trained: the strategy's variables
        assert result["late_distributed"] and result["late_predict_diff"] < 1e-5, result
        assert result["late_weight_diff"] < 1e-5
        assert result["max_weight_diff"] < 1e-5  # one device on the same global batches
        for key, values in result["ref_history"].items():
            np.testing.assert_allclose(result["history"][key], values, atol=1e-5)
        # a shuffled epoch used each of the 72 examples exactly once
        np.testing.assert_allclose(result["coverage"], 2 * 0.5 / 24, rtol=1e-6)
    weights = [np.load(os.path.join(tmp_path, f"weights{r}.npz")) for r in range(3)]
    for key in weights[0].files:
        for other in weights[1:]:
            np.testing.assert_array_equal(weights[0][key], other[key])


if BACKEND == "tensorflow":

    def test_tensorflow_workers_with_different_device_counts_get_a_clear_error(tmp_path):
        """2 local devices in one worker, 1 in the other (CPUs standing in for
        GPUs, where TensorFlow would take them): TensorFlow sizes its
        all-reduce as workers x local devices (fit hung), so every worker gets
        a StrategyError from MultiWorkerMirrored() saying what to change,
        within seconds."""
        start = time.monotonic()
        ended = start_launchers([1, 1], tmp_path, [{"HETERO_TF_LOGICAL_CPUS": "2", "HETERO_TF_UNEVEN": "1"}, {}])
        elapsed = time.monotonic() - start
        outputs = "\n".join(text[-3000:] for _, text in ended)
        assert [code for code, _ in ended] == [3, 3], outputs
        for result in results(tmp_path, 2):
            assert result["strategy_error"].startswith(
                "MultiWorkerMirrored on the tensorflow backend: the workers' local devices differ (worker 0: 2 CPU, "
                "worker 1: 1 CPU)"), result
            assert "Give every worker the same number of GPUs, or run one process per GPU" in (
                result["strategy_error"])
        assert elapsed < 60, elapsed


def launch_machines(nodes, nnodes=3, rendezvous_timeout=3.0):
    """Calls `launch()` for each `(node_rank, nnodes)` of `nodes` in its own
    thread (each a machine's launcher; none gets as far as starting a rank):
    `{index: (error message or None, seconds)}`."""
    master = f"127.0.0.1:{free_port()}"
    outcome = {}

    def machine(index, node_rank, machine_nnodes):
        start = time.monotonic()
        try:
            launch([sys.executable, "-c", "raise SystemExit(9)"], nnodes=machine_nnodes, node_rank=node_rank,
                   master=master, rendezvous_timeout=rendezvous_timeout)
            outcome[index] = (None, time.monotonic() - start)
        except LaunchError as error:
            outcome[index] = (str(error), time.monotonic() - start)

    threads = [threading.Thread(target=machine, args=(i, *node), daemon=True) for i, node in enumerate(nodes)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # node 0 listens first, as when it is started first
    for thread in threads:
        thread.join(timeout=rendezvous_timeout + 20)
    assert len(outcome) == len(nodes), f"a launcher did not return: {outcome}"
    return outcome


def test_two_machines_claiming_one_node_rank_stop_every_launcher():
    outcome = launch_machines([(0, 3), (1, 3), (1, 3)])
    for message, seconds in outcome.values():
        assert message and "two machines claim --node-rank 1:" in message, outcome
        assert "launcher pid" in message and "Give each machine its own --node-rank, 1..2" in message
        assert seconds < 3.0, outcome  # as soon as the second one arrives, not at the deadline
    outcome = launch_machines([(0, 2), (1, 3)])  # and machines that disagree on --nnodes
    for message, _ in outcome.values():
        assert "the machines disagree on --nnodes" in message, outcome


def test_a_machine_that_never_arrives_stops_every_launcher_in_time():
    outcome = launch_machines([(0, 3), (2, 3)], rendezvous_timeout=2.0)
    for message, seconds in outcome.values():
        assert message and "for the machine(s) with --node-rank 1 (--nnodes 3); it never arrived" in message
        assert "--rendezvous-timeout sets how long" in message
        assert 1.5 < seconds < 2.0 + 8, outcome  # at node 0's deadline, not before, not much after
    outcome = launch_machines([(1, 2)], rendezvous_timeout=1.5)  # node 0 never started
    message, seconds = outcome[0]
    assert message and "node 1 could not reach node 0 at 127.0.0.1:" in message and 1.5 <= seconds < 1.5 + 6


# A machine without the accelerators the others have. Not testable here
# without GPUs: the engine's answers (its device lists, what the other
# workers published) are mocked, and the package's own code runs as it is.

if BACKEND == "jax":

    def test_jax_a_process_without_the_jobs_gpus_gets_a_clear_error(monkeypatch):
        """On a GPU process, JAX's global device list holds only GPUs: a
        process without one (a CPU machine) is missing from it."""
        import jax

        from keras_strategies.backends.jax.multi_worker import check_devices_per_process

        class Device:
            def __init__(self, process_index):
                self.process_index = process_index

        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(jax, "process_count", lambda: 3)
        monkeypatch.setattr(jax, "devices", lambda *a: [Device(0), Device(0), Device(2), Device(2)])
        with pytest.raises(ks.StrategyError, match=r"process\(es\) 1 have no gpu device, and one JAX job runs on "
                                                   r"one platform \(gpu here\).*JAX_PLATFORMS=cpu on every machine"):
            check_devices_per_process("MultiWorkerMirrored")
        monkeypatch.setattr(jax, "devices", lambda *a: [Device(p) for p in (0, 0, 1, 2, 2)])
        check_devices_per_process("MultiWorkerMirrored")  # 2, 1 and 2 GPUs: every process has some


if BACKEND == "tensorflow":

    def test_tensorflow_a_worker_without_the_jobs_gpus_gets_a_clear_error(monkeypatch):
        """TensorFlow takes a worker's GPUs as its local devices, or its CPU
        when it has none: the workers publish theirs (TF's coordination
        service, mocked with what the other two published) and all stop."""
        from tensorflow.python.eager import context

        from keras_strategies.backends.tensorflow.multi_worker import TFMultiWorkerMirrored
        from keras_strategies.cluster import ClusterSpec

        published = {"keras_strategies/local_devices/0": "1 GPU", "keras_strategies/local_devices/2": "1 GPU"}

        class Service:
            def set_config_key_value(self, key, value):
                published[key] = value

            def get_config_key_value(self, key):
                return published[key]

        class Extended:  # what MultiWorkerMirroredStrategy decided on a machine without GPUs
            worker_devices = ("/job:worker/replica:0/task:1/device:CPU:0",)
            _local_device_type = "CPU"

        monkeypatch.setattr(context, "context", Service)
        implementation = object.__new__(TFMultiWorkerMirrored)
        implementation.name = "MultiWorkerMirrored"
        implementation.native = type("Native", (), {"extended": Extended()})()
        implementation.cluster = ClusterSpec(rank=1, world_size=3)
        with pytest.raises(ks.StrategyError, match=r"local devices differ \(worker 0: 1 GPU, worker 1: 1 CPU, "
                                                   r"worker 2: 1 GPU\).*Give every worker a GPU, or hide the GPUs"):
            implementation.check_local_devices()


if BACKEND == "torch":

    def test_torch_a_machine_without_gpus_among_gpu_machines(monkeypatch):
        """Each process picks nccl with a GPU and gloo without: a CPU machine
        among GPU machines would not meet them. KERAS_STRATEGIES_TORCH_BACKEND=gloo
        on every machine makes one gloo group (gloo all-reduces CUDA tensors);
        nccl without a GPU is refused."""
        import torch

        from keras_strategies.backends.torch.multi_worker import process_group_backend

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert process_group_backend({}) == "nccl"
        assert process_group_backend({"KERAS_STRATEGIES_TORCH_BACKEND": "gloo"}) == "gloo"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert process_group_backend({}) == "gloo"
        with pytest.raises(ks.StrategyError, match="this machine has no GPU .* set KERAS_STRATEGIES_TORCH_BACKEND"
                                                   "=gloo on every machine"):
            process_group_backend({"KERAS_STRATEGIES_TORCH_BACKEND": "nccl"})
        with pytest.raises(ks.StrategyError, match="must be gloo or nccl; got 'mpi'"):
            process_group_backend({"KERAS_STRATEGIES_TORCH_BACKEND": "mpi"})
