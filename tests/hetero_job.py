"""Run by every process of tests/test_heterogeneous.py's jobs over machines
(and processes) of different sizes:

    python tests/hetero_job.py OUT_DIR

Each process first trains one shuffled epoch of one-hot examples (each
example moves only its own weight, by 2 * lr / batch when it is seen exactly
once), then under MultiWorkerMirrored with a global batch that does not
divide over the job's replicas (a StrategyError is expected), then with one
that does, next to a one-device reference on the same global batches; then
evaluates and predicts, evaluates a model built in the strategy's scope, and predicts then trains one
built by that predict (in the scope). It writes what it
saw to OUT_DIR/rank<K>.json and its weights to OUT_DIR/weights<K>.npz.

Environment (set per launcher by the test):
    HETERO_TF_LOGICAL_CPUS=2  TensorFlow: this process has 2 logical CPUs.
    HETERO_TF_UNEVEN=1        TensorFlow: MultiWorkerMirroredStrategy takes
        this process's logical CPUs as its local devices (as it does with
        GPUs), so the workers hold different numbers of replicas.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

if os.environ.get("HETERO_TF_LOGICAL_CPUS"):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    count = int(os.environ["HETERO_TF_LOGICAL_CPUS"])
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    if os.environ.get("HETERO_TF_UNEVEN"):
        from tensorflow.python.distribute import collective_all_reduce_strategy as collective

        def local_devices(self, resolver, worker_device):  # TF's choice, with CPUs standing in for GPUs
            return tuple(f"{worker_device}/device:CPU:{i}" for i in range(count)), "CPU"

        collective.CollectiveAllReduceExtended._initialize_local_devices = local_devices

out = sys.argv[1]
try:
    strategy = ks.MultiWorkerMirrored()
except ks.StrategyError as error:  # processes with different numbers of devices
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"strategy_error": str(error)}, f)
    sys.exit(3)
rank, replicas = strategy.worker_index, strategy.num_replicas_in_sync

import keras  # noqa: E402
import numpy as np  # noqa: E402
from models import build, initial_weights, make_data  # noqa: E402

# first, before any seed is set: left to itself, each worker would shuffle in its own order
n = 72
coverage = keras.Sequential([keras.Input((n,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
coverage.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
coverage.fit(np.eye(n, dtype="float32"), np.ones((n, 1), "float32"), batch_size=24, epochs=1, shuffle=True,
             verbose=0, distribution=strategy)
seen = coverage.get_weights()[0][:, 0]

result = {"rank": rank, "workers": strategy.num_workers, "replicas": replicas, "devices": strategy.devices}
x, y = make_data(n=72)
weights = initial_weights("functional")
model = build("functional", [w + rank for w in weights])  # worker 0's weights must win
bad = 32 if 32 % replicas else 30
try:
    model.fit(x, y, batch_size=bad, epochs=1, verbose=0, distribution=strategy)
    result["bad_batch_error"] = None
except ks.StrategyError as error:
    result["bad_batch_error"] = str(error)
history = model.fit(x, y, batch_size=24, epochs=2, shuffle=False, verbose=0, distribution=strategy)
reference = build("functional", weights)
ref_history = reference.fit(x, y, batch_size=24, epochs=2, shuffle=False, verbose=0)
evaluation = model.evaluate(x, y, batch_size=24, verbose=0, distribution=strategy)
predictions = model.predict(x, batch_size=24, verbose=0, distribution=strategy)
with strategy.scope():  # variables created in the scope, on every replica
    scoped = build("functional", weights)
scoped_evaluation = scoped.evaluate(x, y, batch_size=24, verbose=0)

# a model built by its first call, a split predict, then trained: its variables must be
# the strategy's (distributed over every process's devices), not this process's alone
with strategy.scope():
    late = keras.Sequential([keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    late.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
late_predictions = late.predict(x, batch_size=24, verbose=0)
late_start = [w.copy() for w in late.get_weights()]
late.fit(x, keras.utils.to_categorical(y, 3), batch_size=24, epochs=1, shuffle=False, verbose=0)
late_reference = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Dense(4, activation="relu"),
                                   keras.layers.Dense(3)])
late_reference.set_weights(late_start)
late_reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
late_predict_diff = float(np.abs(late_predictions - late_reference.predict(x, verbose=0)).max())
late_reference.fit(x, keras.utils.to_categorical(y, 3), batch_size=24, epochs=1, shuffle=False, verbose=0)
kernel = late.weights[0].value
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    late_distributed = isinstance(kernel, tf.distribute.DistributedValues)
elif keras.backend.backend() == "jax":
    import jax

    late_distributed = len(kernel.sharding.device_set) == len(jax.devices())
else:
    late_distributed = True  # one process, one device: nothing to lay out

np.savez(os.path.join(out, f"weights{rank}.npz"), *model.get_weights())
result.update(
    history=history.history,
    ref_history=ref_history.history,
    max_weight_diff=max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights())),
    coverage=seen.tolist(),
    evaluate=evaluation,
    ref_evaluate=reference.evaluate(x, y, batch_size=24, verbose=0),
    max_predict_diff=float(np.abs(predictions - reference.predict(x, batch_size=24, verbose=0)).max()),
    scoped_evaluate=scoped_evaluation,
    ref_scoped_evaluate=build("functional", weights).evaluate(x, y, batch_size=24, verbose=0),
    late_distributed=late_distributed,
    late_predict_diff=late_predict_diff,
    late_weight_diff=max(float(np.abs(a - b).max()) for a, b in zip(late.get_weights(),
                                                                    late_reference.get_weights())),
)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
print(f"process {rank} done")
