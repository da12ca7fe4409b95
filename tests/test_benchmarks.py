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


def test_predict_or_refit_smoke(tmp_path):
    """One process start per backend: benchmarks/refit.py on TensorFlow and JAX
    (the Mirrored over CPU replicas it times has no torch case), whose job
    branches per backend, reports positive times for every method;
    benchmarks/predict.py, whose job is the same on every backend, runs on
    torch: 1 and 2 workers give the same predictions."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if BACKEND == "torch":
        out = tmp_path / "predict.json"
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "predict.py"), "--backends", BACKEND, "--rows", "4096",
             "--calls", "1", "--rounds", "1", "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads(out.read_text())["results"][BACKEND]
        assert result["rows_per_s_1"] > 0 and result["rows_per_s_2"] > 0 and result["same_predictions"], result
        return
    out = tmp_path / "refit.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "refit.py"), "--backends", BACKEND, "--fits", "2",
         "--rounds", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    methods = json.loads(out.read_text())["results"][BACKEND]
    assert set(methods) == {"ks_fit", "ks_scope", "native"}
    assert all(m["first_s"] > 0 and m["later_s"] > 0 for m in methods.values()), methods
