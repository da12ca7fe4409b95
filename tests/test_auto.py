"""`keras_strategies.auto()`: each branch of the decision with the environment
it reads (a dict passed as the environment, devices handed in), one real call
on this CPU-only machine, and the decision logged once."""

import importlib
import json
import logging
import os
import subprocess
import sys

import pytest

import keras_strategies as ks
from conftest import BACKEND
from keras_strategies import loader

auto_module = importlib.import_module("keras_strategies.auto")  # `ks.auto` is the function

TORCHRUN_2 = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
CLUSTERS = {
    "TF_CONFIG": {"TF_CONFIG": json.dumps({"cluster": {"worker": ["h0:1", "h1:1"]},
                                           "task": {"type": "worker", "index": 0}})},
    "torchrun": TORCHRUN_2,
    "KERAS_DISTRIBUTION": {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "h0:1,h1:1",
                           "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"},
    "SLURM": {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODELIST": "node[1-2]", "SLURM_JOB_ID": "7"},
}
WITH_PS = {
    "TF_CONFIG": {"TF_CONFIG": json.dumps({"cluster": {"chief": ["h0:1"], "worker": ["h1:1"], "ps": ["h2:1"]},
                                           "task": {"type": "worker", "index": 0}})},
    "num_ps": {**TORCHRUN_2, "WORLD_SIZE": "3", "KERAS_STRATEGIES_NUM_PS": "1"},
}


@pytest.fixture
def no_device_lookup(monkeypatch):
    """Fails the test if the decision asks the backend for its devices."""

    def looked(*args):
        raise AssertionError("the devices were looked up although the environment describes a cluster")

    monkeypatch.setattr(loader, "local_accelerators", looked)


@pytest.mark.parametrize("name", sorted(WITH_PS))
def test_a_cluster_with_parameter_servers_gives_parameter_server(name, no_device_lookup):
    cls, kwargs, reason = auto_module.choose(WITH_PS[name], devices=["tpu:0"])
    assert cls is ks.ParameterServer
    assert kwargs["cluster"].num_ps == 1 and kwargs["cluster"] == ks.resolve_cluster(WITH_PS[name])
    assert "a chief, 1 worker(s) and 1 parameter server(s)" in reason


@pytest.mark.parametrize("source", sorted(CLUSTERS))
def test_a_cluster_without_parameter_servers_gives_multi_worker_mirrored(source, no_device_lookup):
    cls, kwargs, reason = auto_module.choose(CLUSTERS[source], devices=["gpu:0", "gpu:1"])
    assert cls is ks.MultiWorkerMirrored
    assert kwargs["cluster"].world_size == 2 and kwargs["cluster"].source == source
    assert reason == f"the environment describes 2 processes ({source})"


@pytest.mark.parametrize("devices, expected, words", [
    (["gpu:0", "gpu:1", "gpu:2"], ks.Mirrored, "3 GPUs (gpu:0, gpu:1, gpu:2)"),
    (["tpu:0", "tpu:1", "tpu:2", "tpu:3"], ks.TPU, "4 TPU core(s)"),
    (["gpu:0"], ks.Default, "one GPU"),
    ([], ks.Default, "no GPU or TPU"),
], ids=["several_gpus", "tpu", "one_gpu", "nothing"])
def test_local_devices_decide_without_a_cluster(devices, expected, words):
    for environ in ({}, {"RANK": "0", "WORLD_SIZE": "1"}):  # a one-process "cluster" is none
        cls, kwargs, reason = auto_module.choose(environ, devices=devices)
        assert (cls, kwargs) == (expected, {})
        assert reason.startswith("no cluster in the environment") and words in reason


def test_the_devices_come_from_the_active_backend(monkeypatch):
    monkeypatch.setattr(loader, "local_accelerators", lambda: ["gpu:0", "gpu:1"])
    assert auto_module.choose({})[0] is ks.Mirrored


def test_this_cpu_machine_has_no_accelerator_and_auto_is_default(monkeypatch):
    """The backend's own lookup, and one real auto() reading os.environ."""
    assert loader.local_accelerators() == []
    for name in ("TF_CONFIG", "RANK", "WORLD_SIZE", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID", "KERAS_DISTRIBUTION_JOB_ADDRESSES", "SLURM_NTASKS",
                 "KERAS_STRATEGIES_NUM_PS"):
        monkeypatch.delenv(name, raising=False)
    strategy = ks.auto()
    assert type(strategy) is ks.Default and strategy.backend == BACKEND
    assert "auto" in ks.__all__


def test_auto_creates_the_chosen_strategy_with_the_cluster_it_read(monkeypatch, no_device_lookup):
    created = []

    class Recorder:
        def __init__(self, **kwargs):
            created.append(kwargs)

    monkeypatch.setattr(auto_module, "MultiWorkerMirrored", Recorder)
    assert isinstance(ks.auto(environ=TORCHRUN_2), Recorder)
    assert created == [{"cluster": ks.resolve_cluster(TORCHRUN_2)}]


def test_a_broken_cluster_description_is_a_cluster_error():
    with pytest.raises(ks.ClusterError, match="WORLD_SIZE"):
        ks.auto(environ={"RANK": "0"})


def test_each_decision_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(auto_module, "_logged", set())
    caplog.set_level(logging.INFO, logger="keras_strategies")
    for _ in range(3):
        assert type(ks.auto(environ={}, devices=[])) is ks.Default
    assert [r.getMessage() for r in caplog.records] == [
        "auto(): Default: no cluster in the environment, and no GPU or TPU on this machine"]
    assert {r.name for r in caplog.records} == {"keras_strategies"}
    ks.auto(environ={}, devices=["gpu:0"])  # another decision: logged too, once
    ks.auto(environ={}, devices=["gpu:0"])
    assert len(caplog.records) == 2 and "one GPU" in caplog.records[1].getMessage()


@pytest.mark.skipif(BACKEND == "jax", reason="JAX lists its devices by starting its backend, as any "
                    "one-machine strategy does when created; auto() looks only when there is no cluster")
def test_looking_for_devices_leaves_the_engine_unstarted():
    """TensorFlow: CPU replicas can still be made after the lookup (its runtime
    has not started); PyTorch: CUDA is not initialised (processes can fork)."""
    if BACKEND == "torch":
        import torch

        loader.local_accelerators()
        assert not torch.cuda.is_initialized()
        return
    code = ("import keras_strategies as ks; from keras_strategies import loader; "
            "assert loader.local_accelerators() == []; "
            "print('replicas', ks.Mirrored(['cpu:0', 'cpu:1']).num_replicas_in_sync)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env=dict(env, KERAS_BACKEND=BACKEND))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout
