"""TensorFlow MultiWorkerMirrored, 2 processes: the time between two epochs of a
`fit` (the last step's end to the next epoch's first step: the epoch's logs,
the metrics' resets, the callbacks; with `--validation`, the validation too),
ours as shipped against ours with Keras's own metric resets and reads (a
reduction per variable; `--method ks_metric_reads` of run.py), alternating.

    python benchmarks/epoch_boundary.py [--rounds 3] [--validation]

Each run is its own 2-process job (keras_strategies.launch); prints each run's
median boundary and epoch time (ms), then the medians per method. A whole run's
throughput cannot show a cost of ~10 ms an epoch on this VM (its run-to-run
spread is larger); the boundary itself can.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, EPOCHS = 20, 12


def job(before, validation):
    """One process of the 2-process job (run by the launcher)."""
    sys.path.insert(0, HERE)
    import keras_strategies as ks

    if before:
        from keras_strategies.backends.tensorflow import base as tf_base
        from keras_strategies.backends.tensorflow import keras_fixes

        keras_fixes.assign_without_read = lambda variable, value: None
        tf_base.metrics_read_together = lambda model, strategy: model.get_metrics_result
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from workloads import build_keras, keras_optimizer, make_data

    strategy = ks.MultiWorkerMirrored()
    x, y = make_data("cnn", STEPS * 256)
    model = build_keras("cnn")
    model.compile(optimizer=keras_optimizer("adam"), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    marks = []

    class Marks(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                marks.append(("first", time.perf_counter()))

        def on_train_batch_end(self, batch, logs=None):
            if batch == STEPS - 1:
                float(logs["loss"])  # the step has finished
                marks.append(("last", time.perf_counter()))

    extra = {"validation_data": (x[:1024], y[:1024])} if validation else {}
    model.fit(x, y, batch_size=256, epochs=2, shuffle=False, verbose=0, distribution=strategy, **extra)  # warm
    model.fit(x, y, batch_size=256, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[Marks()],
              distribution=strategy, **extra)
    firsts = [t for kind, t in marks if kind == "first"]
    lasts = [t for kind, t in marks if kind == "last"]
    boundary = statistics.median(1000 * (f - l) for l, f in zip(lasts, firsts[1:]))
    epoch = statistics.median(1000 * (b - a) for a, b in zip(firsts, firsts[1:]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"RESULT boundary_ms={boundary:.1f} epoch_ms={epoch:.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--validation", action="store_true", help="validate on 4 batches after each epoch")
    parser.add_argument("--job", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return job(args.job == "before", args.validation)
    got = {"after": [], "before": []}
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    for r in range(args.rounds):
        for method in (["after", "before"] if r % 2 == 0 else ["before", "after"]):
            command = [sys.executable, "-m", "keras_strategies.launch", "--nproc-per-node", "2", "--timeout", "300",
                       os.path.abspath(__file__), "--job", method] + (["--validation"] if args.validation else [])
            output = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400).stdout
            found = re.search(r"RESULT boundary_ms=([\d.]+) epoch_ms=([\d.]+)", output)
            if not found:
                sys.exit(f"round {r} {method}: no result\n{output[-3000:]}")
            got[method].append((float(found[1]), float(found[2])))
            print(f"round {r} {method}: boundary {found[1]} ms, epoch {found[2]} ms", flush=True)
    for method, values in got.items():
        print(f"{method}: boundary median {statistics.median(v[0] for v in values):.1f} ms, "
              f"epoch median {statistics.median(v[1] for v in values):.1f} ms")


if __name__ == "__main__":
    main()
