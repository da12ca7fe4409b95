"""Markdown table and PNG plot from a results JSON written by run.py.

    python benchmarks/report.py docs/benchmarks/results.json   # writes results.md and results.png
"""

import json
import os
import sys

SHORT = {"default": "Default", "mirrored": "Mirrored", "multi_worker": "MultiWorker",
         "central_storage": "CentralSt.", "parameter_server": "ParamServer"}
STRATEGY = {"default": "Default", "mirrored": "Mirrored", "multi_worker": "MultiWorkerMirrored",
            "central_storage": "CentralStorage", "parameter_server": "ParameterServer (replicas = workers)"}


def _left_out(cfg):
    """The leading epochs a run's throughput leaves out, in words."""
    warmup = cfg.get("warmup_epochs", 1)
    return "first" if warmup == 1 else f"first {warmup}"


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def markdown(data):
    meta = data["meta"]
    m = meta["machine"]
    cfg = meta["config"]
    lines = [
        f"Run {meta['date']}"
        + (f" (interrupted, resumed {', '.join(meta['resumed'])})" if meta.get("resumed") else "")
        + f" on {m['cpu']} ({m['cores']} cores, {m.get('memory_gib')} GiB), {m['platform']}, Python {m['python']}"
        + (f"; device {cfg['device']}: {'; '.join(m.get('gpus', []))}." if cfg.get("device") == "gpu" else "."),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"Load average before/after: {', '.join(f'{x:.2f}' for x in meta['load_average_before'])} / "
        + (", ".join(f"{x:.2f}" for x in meta["load_average_after"]) if "load_average_after" in meta
           else "not recorded: the run was stopped before its end (the runs it finished are summarized)")
        + f". {meta.get('note', '')}".rstrip(),
        "",
        f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s). Global batch {cfg['global_batch']}, "
        f"{cfg['steps_per_epoch']} steps/epoch, {cfg['epochs']} epochs per run ("
        f"{_left_out(cfg)} left out), "
        f"{cfg['repeats']} A/B rounds, {cfg.get('optimizer', 'Adam')}, "
        f"steps_per_execution {cfg.get('steps_per_execution', 1)}, no metrics, no shuffling. Threads: {cfg['threads']}.",
        "",
        "| backend | strategy | workload | replicas (procs) | method | role | samples/s median (min-max) "
        "| first step s | peak RSS MiB/proc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"ks": 0, "native": 1, "keras_ddp": 1, "torch_ddp": 2, "keras_fit": 3}
    for r in sorted(data["results"], key=lambda r: (r["backend"], r["strategy"], r["workload"],
                                                      r["replicas"], order.get(r["method"], 3))):
        if "samples_per_s" in r:
            t = r["samples_per_s"]
            thr = f"{t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f})"
            first = f"{r['first_step_s']:.2f}"
            rss = "/".join(f"{x:.0f}" for x in r["peak_rss_mib"])
        else:
            thr, first, rss = r["status"], "", ""
        procs = r.get("processes", "")
        lines.append(f"| {r['backend']} | {STRATEGY[r['strategy']]} | {r['workload']} | {r['replicas']} "
                     f"({procs}) | {r['label']} | {r['role']} | {thr} | {first} | {rss} |")
    lines += ["", "A/B: keras_strategies over the native way (target: throughput >= 0.95, torch >= 1.0 "
              "against the Keras DDP loop and >= 0.85 against plain torch; RSS <= 1.10; first step <= +1 s).",
              "", "| backend | strategy | workload | replicas | against | throughput A/B | peak RSS A/B "
              "| first step A-B s |", "|---|---|---|---|---|---|---|---|"]
    for c in data["comparisons"]:
        if "throughput_ratio" in c:
            vals = f"{c['throughput_ratio']:.2f} | {c['peak_rss_ratio']:.2f} | {c['first_step_delta_s']:+.2f}"
        else:
            vals = f"{c['status']} | | "
        lines.append(f"| {c['backend']} | {STRATEGY[c['strategy']]} | {c['workload']} | {c['replicas']} "
                     f"| {c['against_label']} | {vals} |")
    references = [(r, t) for r in data["results"] if r["method"] == "keras_fit" and "samples_per_s" in r
                  for t in data["results"] if t["method"] == "torch_ddp" and "samples_per_s" in t
                  and (t["backend"], t["strategy"], t["workload"], t["replicas"])
                  == (r["backend"], r["strategy"], r["workload"], r["replicas"])]
    if references:
        lines += ["", "Reference: Keras's own step cost. Plain Keras fit (one process, no distribution: Keras's "
                  "layers, loss, optimizer and fit loop) over the torch.nn loop, on the same data.", "",
                  "| backend | workload | replicas | plain Keras fit / torch.nn loop |", "|---|---|---|---|"]
        for r, t in references:
            lines.append(f"| {r['backend']} | {r['workload']} | {r['replicas']} "
                         f"| {r['samples_per_s']['median'] / t['samples_per_s']['median']:.2f} |")
    lines += ["", "Scaling efficiency = throughput(2 replicas) / (2 x throughput(1 replica)).", "",
              "| backend | strategy | workload | method | efficiency |", "|---|---|---|---|---|"]
    for s in data["scaling"]:
        lines.append(f"| {s['backend']} | {STRATEGY[s['strategy']]} | {s['workload']} | {s['label']} "
                     f"| {s['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def draw(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if "samples_per_s" in r]
    workloads = sorted({r["workload"] for r in ok})
    fig, axes = plt.subplots(len(workloads), 1, figsize=(13, 4.2 * len(workloads)), squeeze=False)
    colors = {"ks": "tab:blue", "native": "tab:orange", "keras_ddp": "tab:orange", "torch_ddp": "tab:gray",
              "native_sync_bn": "tab:green", "keras_fit": "tab:purple", "native_tape": "tab:gray",
              "native_tape_epochs": "tab:brown"}
    for ax, workload in zip(axes[:, 0], workloads):
        rows = sorted((r for r in ok if r["workload"] == workload),
                      key=lambda r: (r["backend"], r["strategy"], r["replicas"], r["method"] != "ks"))
        groups = []
        for r in rows:
            g = (r["backend"], r["strategy"], r["replicas"])
            if g not in groups:
                groups.append(g)
        width = 0.8 / max(sum(1 for r in rows if (r["backend"], r["strategy"], r["replicas"]) == g)
                          for g in groups)
        for gi, g in enumerate(groups):
            members = [r for r in rows if (r["backend"], r["strategy"], r["replicas"]) == g]
            for mi, r in enumerate(members):
                t = r["samples_per_s"]
                ax.bar(gi + (mi - (len(members) - 1) / 2) * width, t["median"], width,
                       yerr=[[t["median"] - t["min"]], [t["max"] - t["median"]]],
                       color=colors.get(r["method"], "tab:green"), capsize=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{b}\n{SHORT[s]}\nx{n}" for b, s, n in groups], fontsize=7)
        ax.set_ylabel("samples/s (median, min-max)")
        sync = any(r["method"] == "native_sync_bn" for r in rows)
        ax.set_title(f"{workload}: A = keras_strategies (blue), B = native (orange), "
                     f"lower bound: plain torch DDP / GradientTape coordinator loop (gray)"
                     + (", plain Keras fit without distribution (purple)"
                        if any(r["method"] == "keras_fit" for r in rows) else "")
                     + (", TF native with BatchNormalization(synchronized=True) (green)" if sync else ""),
                     fontsize=9)
    m = data["meta"]
    fig.suptitle(f"keras_strategies vs native, {m['date'][:10]}, {m['machine']['cpu']} "
                 f"({m['machine']['cores']} cores); load average before/after "
                 f"{m['load_average_before'][0]:.2f}/"
                 + (f"{m['load_average_after'][0]:.2f}" if "load_average_after" in m else "- (run stopped)"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(json_path, plot=True):
    with open(json_path) as f:
        data = json.load(f)
    stem = os.path.splitext(json_path)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(data))
    print(f"wrote {stem}.md")
    if plot:
        try:
            draw(data, stem + ".png")
            print(f"wrote {stem}.png")
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written")


if __name__ == "__main__":
    write_all(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks", "results.json"))
