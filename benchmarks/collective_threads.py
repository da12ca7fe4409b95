"""TensorFlow MultiWorkerMirrored: a worker's threads, CPU and peak RSS per epoch,
with the collectives' deadline kept during the run (`--before`: as before
commit 640d337) or not (the default, the watchdog keeps the timeout).

    KERAS_BACKEND=tensorflow python -m keras_strategies.launch --nproc-per-node 2 \\
        benchmarks/collective_threads.py [--before] [--epochs 6] [--workload bn_convnet]

Worker 0 prints one line, `THREADS before|after WORKLOAD {json}`: for each
epoch its wall seconds, CPU seconds (this process) and thread count, and the
peak RSS in MiB. 40 steps an epoch, global batch 256, SGD(0.01); the
KERAS_STRATEGIES_TIMEOUT default (1800 s) unless set.
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before TensorFlow starts)

parser = argparse.ArgumentParser()
parser.add_argument("--before", action="store_true", help="keep the collectives' deadline during the run")
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--workload", default="bn_convnet")
args = parser.parse_args()

strategy = ks.MultiWorkerMirrored()
if args.before:
    from keras_strategies.backends.tensorflow import multi_worker

    multi_worker.watched_collectives = lambda options, watched: contextlib.nullcontext()

import keras  # noqa: E402
from workloads import build_keras, make_data  # noqa: E402

STEPS = 40
x, y = make_data(args.workload, 256 * STEPS)
epochs = []


class PerEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        epochs.append([round(time.perf_counter() - self.wall, 3), round(time.process_time() - self.cpu, 3),
                       len(os.listdir("/proc/self/task"))])


model = build_keras(args.workload)
model.compile(optimizer=keras.optimizers.SGD(0.01),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=256, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[PerEpoch()],
          distribution=strategy)
if strategy.worker_index == 0:
    print("THREADS", "before" if args.before else "after", args.workload, json.dumps(
        {"epochs": epochs, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}), flush=True)
