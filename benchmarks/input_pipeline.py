"""TensorFlow MultiWorkerMirrored: what reading one step's input costs a worker.

    python -m keras_strategies.launch --nproc-per-node 2 benchmarks/input_pipeline.py

No training: each worker pulls batches through a `tf.function` that only sums
them on its replica, 100 steps at a time, from three distributed datasets over
the same arrays (the benchmark CNN's input, global batch 256), in turns:
`before`, `backends/tensorflow/one_iterator.endless_batches`'s dataset of
global batches of unknown cardinality given to `experimental_distribute_dataset`
(ours before: every worker gathers every global batch and keeps its share, and
the workers agree at each step on whether input is left); `global_batches`,
the same said to be endless; `own_parts`, `endless_batches` given the strategy
(each worker's pipeline makes only its replicas' parts; ours now); `tutorial`,
TensorFlow's custom-training-loop tutorial (`distribute_datasets_from_function`,
each worker slicing and batching its shard, `repeat()`). Prints each worker's
ms per step of every block.
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

from workloads import make_data, tf_multi_worker_strategy  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)  # as run.py's workers
tf.config.threading.set_inter_op_parallelism_threads(1)
RANK = int(os.environ.get("RANK", "0"))
BATCH, STEPS, ROUNDS = 256, 100, 6
strategy = tf_multi_worker_strategy()

from keras_strategies.backends.tensorflow.one_iterator import endless_batches  # noqa: E402

x, y = make_data("cnn", BATCH * 20)
said_endless = tf.data.experimental.assert_cardinality
tf.data.experimental.assert_cardinality = lambda cardinality: (lambda dataset: dataset)
before, _ = endless_batches(x, y, None, BATCH, None, False, 0, 0)  # as before: cardinality unknown
tf.data.experimental.assert_cardinality = said_endless
global_batches, _ = endless_batches(x, y, None, BATCH, None, False, 0, 0)
own_parts, _ = endless_batches(x, y, None, BATCH, None, False, 0, 0, strategy)


def tutorial(context):
    data = tf.data.Dataset.from_tensor_slices((x, y))
    per_replica = context.get_per_replica_batch_size(BATCH)
    return data.shard(context.num_input_pipelines, context.input_pipeline_id).batch(per_replica).repeat()


iterators = {
    "before": iter(strategy.experimental_distribute_dataset(before)),
    "global_batches": iter(strategy.experimental_distribute_dataset(global_batches)),
    "own_parts": iter(own_parts),
    "tutorial": iter(strategy.distribute_datasets_from_function(tutorial)),
}


@tf.function
def pull(iterator):
    bx, by = next(iterator)
    return strategy.run(lambda a, b: tf.reduce_sum(a) + tf.cast(tf.reduce_sum(b), tf.float32), args=(bx, by))


for iterator in iterators.values():
    for _ in range(5):  # tracing, the pipelines' start
        pull(iterator)
times = {name: [] for name in iterators}
for turn in range(ROUNDS):
    for name in (list(iterators) if turn % 2 == 0 else list(iterators)[::-1]):
        begin = time.perf_counter()
        for _ in range(STEPS):
            value = pull(iterators[name])
        float(strategy.experimental_local_results(value)[0])
        times[name].append((time.perf_counter() - begin) * 1000 / STEPS)
print(f"worker {RANK}: ms per step, {ROUNDS} blocks of {STEPS} steps: "
      + "; ".join(f"{name} {' '.join(f'{t:.2f}' for t in ts)}" for name, ts in times.items()), flush=True)
