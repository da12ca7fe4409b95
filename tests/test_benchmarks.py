"""Smoke tests of the benchmark harness (benchmarks/run.py) on the current backend,
of benchmarks/step_cost.py on torch, of benchmarks/same_process.py on TensorFlow, and of
benchmarks/before_after.py and benchmarks/patch_ab.py on JAX.

A few steps, the MLP, one strategy, 2 replicas, one A B round: the JSON must hold
an A (keras_strategies) and a B (native) result with positive throughputs. It
asserts no time: the numbers of a smoke run mean nothing.
"""

import json
import shutil
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
# Mirrored is in one process on TF/JAX; on torch the two replicas are two processes.
# TensorFlow also runs MultiWorkerMirrored against its hand-written native loops
# (Keras's own fit cannot run under MultiWorkerMirroredStrategy).
STRATEGY = {"torch": "multi_worker", "tensorflow": "mirrored,multi_worker"}.get(BACKEND, "mirrored")
METHODS = {"torch": "ks,keras_ddp,torch_ddp_tensors",
           "tensorflow": "ks,native,native_tape,native_tape_epochs"}.get(BACKEND, "ks,native")


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
    if BACKEND == "tensorflow":
        measured = {(r["strategy"], r["method"]) for r in results}
        assert {("multi_worker", "ks"), ("multi_worker", "native_tape"),
                ("multi_worker", "native_tape_epochs"), ("mirrored", "native")} <= measured, measured
        assert {r["role"] for r in results if r["method"].startswith("native_tape")} == {"lower bound"}
    if BACKEND == "torch":  # the loop with its batches in memory: on request, a lower bound
        assert {r["role"] for r in results if r["method"] == "torch_ddp_tensors"} == {"lower bound"}, results
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


def test_same_process_default_runs_the_same_python_per_step(tmp_path):
    """benchmarks/same_process.py (TensorFlow: its per-step Python is the
    same from run to run): `fit(distribution=Default())` makes as many Python
    calls per step and inside an epoch's clock as plain `fit`, its traced
    training step has the same operations, type for type, and both train."""
    if BACKEND != "tensorflow":
        pytest.skip("one backend is enough for the script; TensorFlow's call count per step is exact")
    out = tmp_path / "same.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "same_process.py"), "--steps", "16", "--batch", "64",
         "--epochs", "1", "--rounds", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    calls = result["python_calls_per_step"]
    assert calls["B"] > 100 and abs(calls["A"] - calls["B"]) <= 1, calls
    epoch_calls = result["python_calls_per_epoch"]
    assert epoch_calls["B"] > 1000 and epoch_calls["A"] == epoch_calls["B"], epoch_calls
    ops = result["graph_ops"]
    assert sum(ops["B"].values()) > 100 and ops["A"] == ops["B"], ops
    assert result["median_A"] > 0 and result["median_B"] > 0 and len(result["paired_ratios"]) == 2


@pytest.mark.in_process
def test_an_interrupted_run_resumes_at_the_run_where_it_stopped(tmp_path, monkeypatch):
    """benchmarks/run.py keeps every finished run in OUT.partial, an
    unfinished case's too; stopped in the middle of its first case's second
    round, `--resume` measures only the runs still missing (that round's
    methods in its order, then the next case), the JSON holds every run once
    and the partial file is gone. A resume with other options is refused,
    naming them. The measurements are stand-ins: this is the harness's
    bookkeeping."""
    monkeypatch.setattr(sys, "path", [os.path.join(ROOT, "benchmarks"), *sys.path])  # run.py adds itself too
    import run

    calls = []

    def measure(backend, strategy, method, workload, replicas, args, tmp):
        calls.append((strategy, method))
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt
        return dict(backend=backend, strategy=strategy, method=method, workload=workload, replicas=replicas,
                    processes=1, threads_per_process=replicas, wall_s=1.0, exit_code=0, status="ok",
                    samples_per_s=[1000.0 * len(calls)] * 2, cpu_us_per_sample=[[10.0, 10.0]], first_epoch_s=1.0,
                    first_step_s=0.5, steps_seen=6, peak_rss_mib=[100.0])

    monkeypatch.setattr(run, "measure", measure)
    out = str(tmp_path / "r.json")
    argv = ["--backends", "torch", "--strategies", "default,central_storage", "--workloads", "mlp",
            "--replicas", "1,2", "--repeats", "2", "--out", out, "--no-plot"]
    # the plan: (default, x1): ks native, native ks; (central_storage, x2): ks, ks
    stop_at = 3
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    assert not os.path.exists(out)
    with open(out + ".partial") as f:
        partial = json.load(f)
    assert partial["done"] == []
    assert [(r["method"], r["repeat"]) for r in partial["runs"]] == [("ks", 0), ("native", 0)]
    # a stopped run's partial file can be summarized as it is (a lease ended): its tables say it was stopped
    stopped = str(tmp_path / "stopped.json")
    shutil.copy(out + ".partial", stopped)
    assert run.main(["--resummarize", stopped, "--no-plot"]) == 0
    stopped_md = (tmp_path / "stopped.md").read_text()
    assert "stopped before its end" in stopped_md
    assert "| torch | Default | mlp | 1 | plain Keras fit | 0.50 |" in stopped_md  # ks 1000 / native 2000

    with pytest.raises(SystemExit, match="repeats differ"):
        run.main(argv[:-5] + ["--repeats", "3", "--out", out, "--no-plot", "--resume"])

    calls.clear()
    stop_at = None
    assert run.main(argv + ["--resume"]) == 0
    assert calls == [("default", "native"), ("default", "ks"), ("central_storage", "ks"), ("central_storage", "ks")]
    assert not os.path.exists(out + ".partial")
    with open(out) as f:
        data = json.load(f)
    assert [(r["strategy"], r["method"], r["repeat"]) for r in data["runs"]] == [
        ("default", "ks", 0), ("default", "native", 0), ("default", "native", 1), ("default", "ks", 1),
        ("central_storage", "ks", 0), ("central_storage", "ks", 1)]
    assert len(data["meta"]["resumed"]) == 1 and "date_now" not in data["meta"]
    assert "resumed" in (tmp_path / "r.md").read_text()


@pytest.mark.in_process
def test_stopping_a_measurement_that_just_ended_is_not_an_error(monkeypatch):
    """A budget's SIGTERM can reach run.py as its measurement's process
    group ends: stopping a group already gone returns the run's output
    (on the fourth GPU lease it raised ProcessLookupError and lost the
    part's summary)."""
    monkeypatch.setattr(sys, "path", [os.path.join(ROOT, "benchmarks"), *sys.path])
    import run

    proc = subprocess.Popen([sys.executable, "-c", "print('done')"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.wait(timeout=60)  # reaped: its process group no longer exists
    assert run._stop(proc).strip() == "done"


def test_warmup_epochs_leave_out_the_leading_epochs(tmp_path, monkeypatch):
    """`--warmup-epochs 2` leaves the first two epochs of a run out of its
    throughput (the second epoch of a Keras DataParallel fit on a GPU compiles
    again); as many warm-up epochs as epochs is refused."""
    monkeypatch.setattr(sys, "path", [os.path.join(ROOT, "benchmarks"), *sys.path])
    import run

    report = dict(epoch_seconds=[4.0, 2.0, 1.0, 0.5], epoch_cpu_seconds=[4.0, 2.0, 1.0, 0.5],
                  samples_per_epoch=100, first_step_s=0.1, steps_seen=[1] * 4, peak_rss_mib=1.0)
    args = run._parser().parse_args(["--warmup-epochs", "2", "--epochs", "4"])
    state = run.steady_state([report], args.warmup_epochs)
    assert state["samples_per_s"] == [100.0, 200.0]
    assert state["cpu_us_per_sample"] == [[1e4, 5e3]] and state["first_epoch_s"] == 4.0
    assert run.steady_state([report], 1)["samples_per_s"] == [50.0, 100.0, 200.0]
    with pytest.raises(SystemExit, match="warmup-epochs 4 leaves no epoch"):
        run.main(["--warmup-epochs", "4", "--epochs", "4", "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("method", ["native", "ks"])
def test_ceiling_smoke(tmp_path, method):
    """benchmarks/ceiling.py (torch: the fastest start): one process alone at
    the batch and at half of it, then two at half side by side, each pinned
    to its own core, their throughput counted over epochs both ran through;
    plain Keras fit, and ours (each process a job of one, every process given
    the host-memory settings)."""
    if BACKEND != "torch":
        pytest.skip("one backend is enough: the script's logic is the same for each")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the pair needs two cores")
    out = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "ceiling.py"), "--backends", "torch", "--workloads", "mlp",
         "--rounds", "1", "--epochs", "6", "--steps", "20", "--batch", "64", "--out", str(out), "--method", method]
        + (["--host-memory", "keep"] if method == "ks" else []),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result, = json.loads(out.read_text())["results"]
    pair, = result["runs"]["pair"]
    assert len(pair["samples_per_s"]) == 2 and all(n >= 1 for n in pair["epochs_counted"]), pair
    assert len(pair["cores"][0]) == len(pair["cores"][1]) == 1 and pair["cores"][0] != pair["cores"][1], pair
    assert result["ceiling"] == pytest.approx(result["pair"] / (2 * result["alone"]))
    assert all(result[k] > 0 for k in ("alone", "alone_half", "pair")), result
    assert [r["method"] for way in ("alone", "alone_half") for r in result["runs"][way]] == [method] * 2, result
    assert pair["method"] == [method] * 2, pair
    header = (tmp_path / "ceiling.md").read_text().splitlines()[0]
    assert f"Method `{method}`" in header and f"host memory `{'keep' if method == 'ks' else 'default'}`" in header, header


def test_allreduce_share_smoke(tmp_path):
    """benchmarks/allreduce_share.py (torch only): ours and the plain torch.nn
    DDP loop in turns, one process, two, and two whose hook returns its bucket
    unsummed: every step timed after the first epoch, the all-reduce timed in
    `two` only, and the predicted step at least the free ranks' slower mean."""
    if BACKEND != "torch":
        pytest.skip("benchmarks/allreduce_share.py measures PyTorch's DDP step")
    out = tmp_path / "share.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "allreduce_share.py"), "--method", "ks,torch",
         "--rounds", "1", "--steps", "4", "--epochs", "2", "--workload", "mlp", "--timeout", "150",
         "--json", str(out), "--out", str(tmp_path / "share.txt")],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["method"] for r in rounds] == ["ks", "torch"], rounds
    for r in rounds:
        runs = r["runs"]
        assert [len(runs[name]) for name in ("one", "two", "free")] == [1, 2, 2], runs
        for rank in runs["one"] + runs["two"] + runs["free"]:
            assert len(rank["step_ms"]) == 3 and min(rank["step_ms"]) > 0, rank  # epoch 2, its first step left out
        assert all(min(rank["hook_ms"]) > 0 for rank in runs["two"]), runs["two"]  # the all-reduce, timed
        assert all(rank["hook_ms"] == [0.0] for rank in runs["free"]), runs["free"]  # no all-reduce there
        assert r["predicted_ms"] >= max(r["free_ms"]) and r["allreduce_ms"] > 0, r
        assert r["scaling_two"] == pytest.approx(r["one_ms"] / (2 * r["two_ms"]))
    assert "ks: median over rounds" in (tmp_path / "share.txt").read_text()


def test_before_after_smoke(tmp_path):
    """benchmarks/before_after.py: run.py from a worktree of a commit and from
    the working tree, in turns (the earlier tree importing its own code, which the script checks), and the
    worktree gone after."""
    if BACKEND != "jax":
        pytest.skip("one backend is enough: the script's logic is the same for each")
    out = tmp_path / "before-after.txt"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "before_after.py"), "--before", "HEAD", "--rounds", "1",
         "--timeout", "200", "--out", str(out), "--", "--backends", "jax", "--strategies", "default",
         "--workloads", "mlp", "--replicas", "1", "--epochs", "2", "--steps", "3", "--batch", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=450,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "turn 0 before" in report and "turn 0 after" in report and "after / before" in report, report
    trees = subprocess.run(["git", "-C", ROOT, "worktree", "list"], capture_output=True, text=True).stdout
    assert "ks-before-" not in trees, trees


def test_patch_ab_smoke(tmp_path):
    """benchmarks/patch_ab.py: one process, ours with a run patch (A) and with
    it left out (B), in turns; what each run had applied is recorded, and a
    patch that is not a run patch is refused."""
    if BACKEND != "jax":
        pytest.skip("one backend is enough: the script's logic is the same for each")
    out = tmp_path / "patch-ab.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = os.path.join(ROOT, "benchmarks", "patch_ab.py")
    proc = subprocess.run(
        [sys.executable, script, "--patch", "unread-batch-logs", "--steps", "4", "--batch", "64", "--epochs", "1",
         "--rounds", "2", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    applied = result["patches_applied"]
    assert "unread-batch-logs" in applied["A"] and "unread-batch-logs" not in applied["B"], applied
    assert set(applied["A"]) - set(applied["B"]) == {"unread-batch-logs"}, applied
    assert len(result["samples_per_s"]["A"]) == len(result["samples_per_s"]["B"]) == 2
    assert result["median_with"] > 0 and result["median_without"] > 0
    refused = subprocess.run([sys.executable, script, "--patch", "torch-ddp-step"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "not a run patch" in refused.stderr, refused.stderr[-2000:]
