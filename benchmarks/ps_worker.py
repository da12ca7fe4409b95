"""One ParameterServer benchmark measurement, run by every process of the job
(`keras-strategies launch --nproc-per-node N --num-ps 1`): a chief, N - 2
workers and one parameter server.

Methods:
    ks      keras_strategies: model.fit(..., distribution=ParameterServer())
    native  TensorFlow only: the hand-written ClusterCoordinator loop a Keras 3
            user writes today in place of fit (Keras 3's fit refuses the
            strategy): the compiled model's own `train_step` (loss tracking
            included, as fit's), scheduled with `ClusterCoordinator.schedule`
            over a per-worker dataset, joined at every epoch.
    native_tape  TensorFlow only, a lower bound: the loop of tf.distribute's
            parameter-server tutorial, a tf.function step with GradientTape and
            the Keras optimizer's apply_gradients, without Keras's loss tracking.

Each update is one worker's batch of `--batch` examples; the chief writes
OUT.rank0.json with the seconds of each epoch of `--steps` updates, and as
"first step" the seconds from the model's build to the end of the first epoch
(both ways: the variables' creation on the servers, the per-worker dataset,
tracing; until 2026-12-02 the native ways started their clock after those).
"""

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import OPTIMIZERS, build_keras, keras_optimizer, make_data, set_seed  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--method", required=True, choices=["ks", "native", "native_tape"])
parser.add_argument("--workload", default="mlp")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--steps", type=int, default=50, help="updates per epoch")
parser.add_argument("--batch", type=int, default=256, help="examples per update")
parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS),
                    help="the Keras optimizer, applied on the parameter servers (workloads.py OPTIMIZERS)")
parser.add_argument("--out", required=True)
args = parser.parse_args()


def write(epoch_seconds, first_step_s):
    result = dict(method=args.method, strategy="parameter_server", workload=args.workload,
                  epoch_seconds=epoch_seconds, epoch_cpu_seconds=[], samples_per_epoch=args.steps * args.batch,
                  steps_per_epoch=args.steps, steps_seen=[args.steps] * len(epoch_seconds),
                  first_step_s=first_step_s,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    with open(f"{args.out}.rank0.json", "w") as f:
        json.dump(result, f)


def run_ours():
    import keras_strategies as ks

    strategy = ks.ParameterServer()
    import keras

    x, y = make_data(args.workload, args.steps * args.batch)
    start = time.perf_counter()
    set_seed(0)
    model = build_keras(args.workload)
    model.compile(optimizer=keras_optimizer(args.optimizer),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    times, begin, ends = [], [0.0], []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            begin[0] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())
            times.append(ends[-1] - begin[0])

    model.fit(x, y, batch_size=args.batch, epochs=args.epochs, steps_per_epoch=args.steps, shuffle=False,
              verbose=0, callbacks=[Timer()], distribution=strategy)
    write(times, ends[0] - start)


def native_cluster(reservation):
    """The TF cluster the launcher's processes make (the plumbing a user writes
    by hand or gets from TF_CONFIG; not part of what is measured); this
    process serves on `reservation`'s port."""
    from keras_strategies.cluster import resolve_cluster
    from keras_strategies.cluster.rendezvous import exchange_addresses

    cluster = resolve_cluster()
    processes = cluster.world_size + cluster.num_ps
    addresses = exchange_addresses(cluster.coordinator, cluster.process_index, processes, reservation.port, 300)
    workers = cluster.world_size
    spec = {"chief": addresses[:1], "worker": addresses[1:workers], "ps": addresses[workers:]}
    return cluster, spec


def run_native():
    import tensorflow as tf

    from keras_strategies.launch.ports import reserve_port

    reservation = reserve_port()  # held until the server runs: no other socket takes the port meanwhile
    cluster, spec = native_cluster(reservation)
    if cluster.task_type != "chief":
        config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=len(spec["worker"]) + 1,
                                          intra_op_parallelism_threads=1)
        server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=cluster.task_type,
                                      task_index=cluster.task_index, config=config, start=True)
        reservation.close()
        server.join()
    import keras

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec), task_type="chief", task_id=0, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    reservation.close()
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    x, y = make_data(args.workload, args.steps * args.batch)
    start = time.perf_counter()  # as ours: the variables' creation on the servers and the per-worker dataset count
    set_seed(0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        model = build_keras(args.workload)
        optimizer = keras_optimizer(args.optimizer)
        if args.method == "native":
            model.compile(optimizer=optimizer, loss=loss_fn)
            model._symbolic_build(data_batch=(x[:2], y[:2]))  # build the loss tracker here, on the chief
        optimizer.build(model.trainable_variables)

    def dataset_fn():
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.batch).prefetch(1)

    iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))

    def tape_step(batch):
        features, labels = batch
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(features, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    replica_fn = model.train_step if args.method == "native" else tape_step

    @tf.function
    def step_fn(iterator):
        return strategy.run(replica_fn, args=(next(iterator),))

    times = []
    for _ in range(args.epochs):
        begin = time.perf_counter()
        for _ in range(args.steps):
            coordinator.schedule(step_fn, args=(iterator,))
        coordinator.join()
        times.append(time.perf_counter() - begin)
    write(times, times[0] + begin - start - sum(times[:-1]))
    for job in ("worker", "ps"):  # the servers' join() never returns: end them
        for index in range(len(spec[job])):
            try:
                with tf.device(f"/job:{job}/replica:0/task:{index}/device:CPU:0"):
                    tf.raw_ops.Abort(error_msg="done", exit_without_error=True)
            except Exception:  # noqa: BLE001 - the server went: that was the point
                pass
    os._exit(0)


if args.method == "ks":
    run_ours()
else:
    run_native()
