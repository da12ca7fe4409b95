"""Smoke tests of the benchmark harness (benchmarks/run.py) on the current backend,
and of benchmarks/step_cost.py on torch.

A few steps, the MLP, one strategy, 2 replicas, one A B round: the JSON must hold
an A (keras_strategies) and a B (native) result with positive throughputs. It
asserts no time: the numbers of a smoke run mean nothing.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
# Mirrored is in one process on TF/JAX; on torch the two replicas are two processes.
STRATEGY = "multi_worker" if BACKEND == "torch" else "mirrored"
METHODS = "ks,keras_ddp" if BACKEND == "torch" else "ks,native"


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--backends", BACKEND,
         "--strategies", STRATEGY, "--methods", METHODS, "--workloads", "mlp", "--replicas", "2", "--repeats", "1",
         "--epochs", "2", "--steps", "3", "--batch", "64", "--timeout", "150", "--optimizer", "momentum",
         "--out", str(out), "--no-plot"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    results = [r for r in data["results"] if "samples_per_s" in r]
    roles = {r["role"] for r in results}
    assert {"A", "B"} <= roles, data["results"]
    for r in results:
        assert r["backend"] == BACKEND and r["replicas"] == 2
        assert r["samples_per_s"]["median"] > 0
        assert all(rss > 0 for rss in r["peak_rss_mib"])
    assert any("throughput_ratio" in c for c in data["comparisons"])
    assert (tmp_path / "results.md").exists()
    assert data["meta"]["config"]["optimizer"] == "SGD(learning_rate=0.01, momentum=0.9)"


def test_step_cost_smoke(tmp_path):
    """benchmarks/step_cost.py (torch only): every method trains and reports a positive time."""
    if BACKEND != "torch":
        pytest.skip("benchmarks/step_cost.py measures the torch step")
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "step_cost.py"), "--steps", "3", "--epochs", "2",
         "--rounds", "1", "--batch", "16", "--bypass-layer-call", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ms = json.loads(out.read_text())["ms_per_step"]
    assert set(ms) == {"ks", "keras_fit", "keras_ddp", "torch_ddp", "ks_no_layer_call", "keras_fit_no_layer_call"}
    assert all(v["median"] > 0 for v in ms.values())
