"""The TensorFlow replacements of Keras functions named in `keras_strategies.patches`.

Each `*` function here is a factory: given Keras's original, it returns what
stands in for it while one of this package's strategies runs.
"""

import contextlib
import threading

import tensorflow as tf
from keras.src import tree
from keras.src.backend.common.stateless_scope import StatelessScope, in_stateless_scope
from keras.src.trainers.data_adapters import data_adapter_utils
from tensorflow.python.distribute import ps_values
from tensorflow.python.distribute import values as tf_values

# -- tf-loss-share / tf-share-weighted-step ---------------------------------
_replica_state = threading.local()  # MirroredStrategy runs replicas in threads


def share_scaled_loss(original):
    """`scale_loss_for_distribution` / `unscale_...`: by this replica's share
    of the global batch (set by `share_weighted_train_step`), not 1/replicas;
    or by its example count, when the gradient all-reduce divides by the
    summed counts afterwards (see `share_weighted_train_step`)."""
    unscale = original.__name__.startswith("unscale")

    def scaled(value):
        share = getattr(_replica_state, "share", None)
        if share is None:
            share = getattr(_replica_state, "count", None)
            if share is None:
                return original(value)
            if not unscale:
                _replica_state.count_weighted = True  # the gradients need dividing by the summed counts
        share = tf.cast(share, value.dtype)
        return tf.math.divide_no_nan(value, share) if unscale else value * share

    return scaled


def share_weighted_train_step(train_step, fold_count=False):
    """`train_step` with each replica's share of the global batch recorded.

    Args:
        train_step: the model's train_step.
        fold_count: weight each replica's loss by its example count, and let
            the gradient all-reduce of `replica_local_optimizer` carry the
            count and divide by the sum (one collective a step). Else (a
            custom train_step, whose losses may not all be scaled; a loss
            scale optimizer, whose float16 backward would see values the
            global batch size times larger) the counts get a collective of
            their own before the step and the loss is weighted by the share.
    """

    def step(data):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return train_step(data)
        x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
        local = tf.cast(tf.shape(tree.flatten(x)[0])[0], tf.float32)
        if fold_count:
            _replica_state.count = local
        else:
            _replica_state.share = local / context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        try:
            return train_step(data)
        finally:
            _replica_state.share = _replica_state.count = None
            _replica_state.count_weighted = False

    return step


# -- tf-variable-updates ---------------------------------------------------------
_local = threading.local()  # .active: inside a replica-local optimizer apply


@contextlib.contextmanager
def replica_local_updates():
    """While entered, this replica's variable updates go to its own copy
    (see `replica_local_optimizer`)."""
    previous = getattr(_local, "active", False)
    _local.active = True
    try:
        yield
    finally:
        _local.active = previous


def assign_without_read(variable, value):
    """Assigns `value` to a Keras variable whose value is a sync-on-read
    variable without reading it back (see `variable_update`); returns the
    assigned tensor, or `None` (nothing done) for any other variable."""
    if not isinstance(variable._value, tf_values.SyncOnReadVariable):
        return None
    value = variable._convert_to_tensor(value, dtype=variable._dtype)
    if value.shape != variable.shape:
        return None  # Keras's own assign raises its error
    variable._value.assign(tf.cast(value, variable._value.dtype), read_value=False)
    return value


def metrics_read_together(model, strategy):
    """`model.get_metrics_result` that reads every metric variable with one
    reduction (per dtype and aggregation) instead of one each.

    Outside a step (each epoch's and each validation's logs) Keras reads its
    metrics' sync-on-read variables one by one, each read a reduction over the
    replicas, across the workers an all-reduce: two for the loss, two for
    each mean metric, about 5 ms each between two processes here. They are
    packed into one tensor per replica, reduced once, and the metrics compute
    their results from those values (`StatelessScope`). In a step (replica
    context, traced) Keras's own method runs."""
    original = model.get_metrics_result

    def get_metrics_result():
        if tf.inside_function() or not tf.distribute.in_cross_replica_context():
            return original()
        groups = {}
        for metric in model.metrics:
            for variable in metric.variables:
                value = variable._value
                if (isinstance(value, tf_values.SyncOnReadVariable) and value.aggregation in _PACKED
                        and value.shape.is_fully_defined()):
                    groups.setdefault((value.dtype, value.aggregation), {})[id(variable)] = variable
        if sum(len(group) for group in groups.values()) < 2:
            return original()
        mapping = []
        for (dtype, aggregation), group in groups.items():
            variables = list(group.values())
            mapping += zip(variables, _reduce_together(strategy, variables, _PACKED[aggregation]))
        with StatelessScope(state_mapping=mapping):
            return original()

    return get_metrics_result


_PACKED = {tf.VariableAggregation.SUM: tf.distribute.ReduceOp.SUM,
           tf.VariableAggregation.MEAN: tf.distribute.ReduceOp.MEAN}


def _reduce_together(strategy, variables, op):
    """The cross-replica values of sync-on-read `variables` (one dtype), with one
    reduction: each replica's components concatenated, reduced, split again."""
    locals_ = [strategy.experimental_local_results(v._value) for v in variables]
    packed = []
    for replica, device in enumerate(strategy.extended.worker_devices):
        with tf.device(device):
            packed.append(tf.concat([tf.reshape(parts[replica], [-1]) for parts in locals_], axis=0))
    reduced = strategy.reduce(op, tf_values.PerReplica(tuple(packed)), axis=None)
    sizes = [v._value.shape.num_elements() for v in variables]
    return [tf.reshape(part, v._value.shape) for part, v in zip(tf.split(reduced, sizes), variables)]


def _local_target(value):
    """The variable this replica writes in a replica-local update, or `None`
    when this replica writes nothing (a variable stored once, updated by
    replica 0: CentralStorage)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return value._get_on_device_or_primary()
    if isinstance(value, ps_values.AggregatingVariable):
        context = tf.distribute.get_replica_context()
        replica = tf.get_static_value(context.replica_id_in_sync_group) if context else 0
        return value._v if replica in (0, None) else None
    return value


def _stored_once_unaggregated(value):
    """A CentralStorage variable without aggregation updated in a replica
    (a random generator's state): replica 0 writes it, as one device would."""
    return (isinstance(value, ps_values.AggregatingVariable)
            and value.aggregation == tf.VariableAggregation.NONE
            and tf.distribute.get_replica_context() is not None
            and tf.distribute.get_replica_context().num_replicas_in_sync > 1)


def variable_update(original):
    """`Variable.assign`/`assign_add`/`assign_sub` for the strategies' variables.

    - In a replica-local optimizer apply: each replica writes its own copy
      (all replicas compute the same update from the all-reduced gradients).
    - Keras implements `assign_add(delta)` as `assign(self + delta)`. On an
      `AggregatingVariable` with SUM aggregation (every metric's total and
      count under CentralStorage), each replica's `assign(old + delta_i)` is
      summed into `2 * old + sum(delta)`; on a parameter server's variable
      two workers' read-modify-writes interleave and one is lost.
      TensorFlow's own `assign_add` reduces the deltas, and is one atomic op
      on the server.
    - Keras's `assign` reads the variable back (`read_value=True`) and drops
      what it read; on a sync-on-read variable (every metric's state under
      MirroredStrategy and MultiWorkerMirroredStrategy) that read is a
      reduction over the replicas, across the workers an all-reduce: one per
      metric variable at each reset (each epoch, each validation). Assigned
      without the read.
    """
    name = original.__name__
    native = (ps_values.AggregatingVariable, ps_values.CachingVariable)

    def update(self, value):
        if in_stateless_scope():
            return original(self, value)
        if name == "assign":
            assigned = assign_without_read(self, value)
            if assigned is not None:
                return assigned
        if getattr(_local, "active", False) or _stored_once_unaggregated(self._value):
            value = self._convert_to_tensor(value, dtype=self._dtype)
            target = _local_target(self._value)
            if target is not None:
                getattr(target, name)(value)
            return value
        if name == "assign" or not isinstance(self._value, native):
            return original(self, value)
        value = self._convert_to_tensor(value, dtype=self._dtype)
        getattr(self._value, name)(value)
        return value

    return update


def _optimizers(optimizer):
    """The optimizer and every optimizer it wraps (LossScaleOptimizer)."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def _local_assigns(optimizer):
    def write(name):
        def assign(variable, value):
            from keras.src import backend

            value = tf.cast(value, variable.dtype)
            target = _local_target(variable.value if isinstance(variable, backend.Variable) else variable)
            if target is not None:
                getattr(target, name)(value)

        return assign

    def update_step(grads, trainable_variables, learning_rate):
        for grad, variable in zip(grads, trainable_variables):
            if grad is not None:
                optimizer.update_step(grad, variable, learning_rate)

    def weight_decay(variables):
        if optimizer.weight_decay is None:
            return
        for variable in variables:
            if optimizer._use_weight_decay(variable):
                rate = tf.cast(optimizer.learning_rate, variable.dtype) * tf.cast(optimizer.weight_decay, variable.dtype)
                optimizer.assign_sub(variable, variable * rate)

    def accumulate(grads, accumulators):
        for grad, accumulator in zip(grads, accumulators):
            optimizer.assign(accumulator, accumulator + grad)

    def overwrite_with_average(trainable_variables):
        for variable, average in zip(trainable_variables, optimizer._model_variables_moving_average):
            optimizer.assign(variable, average)

    functions = {"assign": write("assign"), "assign_add": write("assign_add"), "assign_sub": write("assign_sub"),
                 "_backend_update_step": update_step, "_apply_weight_decay": weight_decay,
                 "_backend_increment_gradient_accumulators": accumulate,
                 "_overwrite_model_variables_with_average_value": overwrite_with_average}
    if hasattr(optimizer, "_tf_apply"):  # LossScaleOptimizer: its backend-neutral apply, no merge_call
        functions["_tf_apply"] = optimizer._common_apply
    return functions


def _summed_gradients(context, grads):
    """Every replica's gradients summed, in one all-reduce. When the loss was
    weighted by the example count (`share_weighted_train_step(fold_count=True)`),
    the count rides along and the sums are divided by the summed count: the
    global batch's gradient, exact for an uneven last batch."""
    present = [g for g in grads if g is not None]
    count = getattr(_replica_state, "count", None)
    if count is not None:
        *present, total = context.all_reduce(tf.distribute.ReduceOp.SUM, present + [count])
        if getattr(_replica_state, "count_weighted", False):
            present = [_divided(g, total) for g in present]
    elif present:
        present = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
    reduced = iter(present)
    return [None if g is None else next(reduced) for g in grads]


def _divided(gradient, total):
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values / tf.cast(total, gradient.values.dtype), gradient.indices,
                                gradient.dense_shape)
    return gradient / tf.cast(total, gradient.dtype)


@contextlib.contextmanager
def replica_local_optimizer(optimizer):
    """While entered, `optimizer` applies updates as one device would, on each
    replica at once: its `apply` all-reduces the gradients first (the loss
    was weighted by each replica's share of the global batch, so their sum is
    the global batch's gradient), then every replica runs Keras's whole
    `apply` on that gradient and updates its own copy of the variables.

    Keras's TensorFlow optimizer instead all-reduces inside its update step
    and applies the update in a `merge_call`: clipping (`clipnorm`,
    `clipvalue`, `global_clipnorm`) then sees each replica's gradient rather
    than the global one, and every `cond` around an update
    (`gradient_accumulation_steps`, `use_ema` with an overwrite frequency,
    `LossScaleOptimizer`) fails with "`merge_call` called while defining a
    new graph". The patch `tf-replica-local-optimizer`.
    """
    from keras_strategies.patches import overriding

    if optimizer is None:
        yield
        return
    original_apply = optimizer.apply

    def apply(grads, trainable_variables=None):
        context = tf.distribute.get_replica_context()
        if context is None or getattr(_local, "active", False):
            return original_apply(grads, trainable_variables)
        if context.num_replicas_in_sync > 1:  # one replica (a ParameterServer worker): nothing to sum
            grads = _summed_gradients(context, grads)
        with replica_local_updates():
            return original_apply(grads, trainable_variables)

    with contextlib.ExitStack() as stack:
        stack.enter_context(overriding(optimizer, "apply", apply, "tf-replica-local-optimizer"))
        for inner in _optimizers(optimizer):
            for name, function in _local_assigns(inner).items():
                stack.enter_context(overriding(inner, name, function, "tf-replica-local-optimizer"))
        yield


# -- tf-multi-step -----------------------------------------------------------------
def multi_step_function(model, step_function):
    """Keras's train/test function for `steps_per_execution > 1` under a
    strategy with several replicas: `steps_per_execution` steps in one
    `tf.function`, the next batch fetched only while steps remain.

    Keras's own (`TensorFlowTrainer._make_function`) calls its one-step
    `tf.function` inside a `tf.cond` in the loop; under MirroredStrategy that
    fails with "You must feed a value for placeholder tensor
    'while/cond/Placeholder'". Here the step runs in the loop's body and only
    the fetch of the next batch is conditional.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    strategy, steps = model.distribute_strategy, model.steps_per_execution

    def one_step(data):
        outputs = strategy.run(step_function, args=(data,))
        return tf_trainer.reduce_per_replica(outputs, strategy, reduction="auto")

    @tf.function(reduce_retracing=True)
    def multi_step(iterator):
        outputs = one_step(next(iterator))

        def more(step, outputs, following):
            return tf.logical_and(step < steps, following.has_value())

        def body(step, outputs, following):
            outputs = one_step(following.get_value())
            following = tf.cond(step + 1 < steps, iterator.get_next_as_optional, lambda: following)
            return step + 1, outputs, following

        _, outputs, _ = tf.while_loop(more, body, (tf.constant(1), outputs, iterator.get_next_as_optional()))
        return outputs

    def function(iterator):
        try:
            return multi_step(iterator)
        except tf.errors.OutOfRangeError:
            raise StopIteration from None

    return function


# -- tf-symbolic-build (and keras-team/keras#20585) ---------------------------
def symbolic_build_from_spec(original):
    """`_maybe_symbolic_build` without a batch drawn from a distributed iterator.

    Keras's opens the distributed dataset's iterator at every `fit`, `evaluate`
    (each validation too) and `predict` call, takes one batch, reduces it
    across the replicas and drops the iterator while its per-device prefetch
    still runs: TensorFlow cancels the fetch in flight ("Local rendezvous is
    aborting"), ~0.15 s a call, and once on a starved 2-core CI machine a
    segmentation fault in one of TensorFlow's threads. Under
    MultiWorkerMirroredStrategy the batch is a `PerReplica` that the build
    cannot read (keras-team/keras#20585). The batch only gives shapes and
    dtypes, and only while something is unbuilt: then they come from the
    dataset's element spec (one replica's); nothing is drawn. Specs other
    than dense tensors (sparse, ragged, optional) keep Keras's way, with this
    worker's values."""

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            if _needs_batch(self):
                data_batch = _symbolic_batch(getattr(iterator, "_distributed_dataset", None))
                if data_batch is None:
                    for _, _, it in iterator:
                        data_batch = tf.nest.map_structure(local_value, next(it))
                        break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    return maybe_symbolic_build


def _needs_batch(model):
    """Whether Keras's `_symbolic_build` reads a batch (the same test)."""
    return (
        not all(layer.built for layer in model._flatten_layers())
        or (model._compile_metrics is not None and not model._compile_metrics.built)
        or (model._compile_loss is not None and not model._compile_loss.built)
    )


def _symbolic_batch(dataset):
    """Keras tensors shaped like one replica's batch of `dataset` (a
    `tf.distribute` dataset), from its element spec; None where a leaf is not
    a dense tensor."""
    from keras.src.backend import KerasTensor, standardize_dtype
    from tensorflow.python.distribute.values import PerReplicaSpec

    spec = getattr(dataset, "element_spec", None)
    if spec is None:
        return None
    leaves = []

    def symbolic(leaf):
        if isinstance(leaf, PerReplicaSpec):
            leaf = leaf._value_specs[0]
        if type(leaf) is not tf.TensorSpec or leaf.shape.rank is None:
            leaves.append(None)
            return None
        leaves.append(leaf)
        return KerasTensor(tuple(leaf.shape), standardize_dtype(leaf.dtype))

    batch = tf.nest.map_structure(symbolic, spec)
    return batch if leaves and all(leaf is not None for leaf in leaves) else None


def scalar_safe_reduce(original):
    """`reduce_per_replica` calls `strategy.reduce("MEAN", v, axis=0)` on
    scalar logs under a collective strategy (`Invalid reduction dimension 0`);
    scalars are reduced with `axis=None`."""

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto":
            reduction = "mean"
        if reduction in ("mean", "sum") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            op = "MEAN" if reduction == "mean" else "SUM"

            def reduce(value):
                if not isinstance(value, tf.distribute.DistributedValues):
                    return value
                axis = 0 if value.values[0].shape.rank else None
                return strategy.reduce(op, value, axis=axis)

            return tf.nest.map_structure(reduce, values)
        return original(values, strategy, reduction)

    return reduce_per_replica


def local_value(value):
    """This replica's copy of a distributed value, read without a collective
    (reading an on-read variable whole would all-reduce)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


# -- tf-one-allreduce-moments -------------------------------------------------
def one_allreduce_moments(layer):
    """`layer._moments` for a synchronized BatchNormalization: the global
    batch's mean and variance from one all-reduce a call instead of three.

    Keras's synchronized moments (`backend.tensorflow.nn._compute_moments_sync`)
    all-reduce the sum, the sum of squares and a count, each on its own, and
    count by summing a tensor of ones as large as the input. Here the count
    comes from the input's shape, and the three ride in one tensor; the
    formula is Keras's (`E[x^2] - E[x]^2`, clipped at 0), float16 and bfloat16
    inputs computed in float32 as Keras does. Outside a replica context, or
    with a mask, Keras's own method runs."""
    original = layer._moments

    def moments(inputs, mask):
        context = tf.distribute.get_replica_context()
        if mask is not None or context is None or not layer.synchronized:
            return original(inputs, mask)
        axes = list(layer._reduction_axes)
        x = tf.convert_to_tensor(inputs)
        dtype = x.dtype
        if dtype in (tf.float16, tf.bfloat16):
            x = tf.cast(x, tf.float32)
        total = tf.reduce_sum(x, axis=axes)
        squares = tf.reduce_sum(tf.square(x), axis=axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), x.dtype)
        size = tf.size(total)
        packed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                    tf.concat([total, squares, tf.reshape(count, [1])], axis=0))
        count = packed[2 * size]
        mean = tf.math.divide_no_nan(packed[:size], count)
        variance = tf.maximum(tf.math.divide_no_nan(packed[size:2 * size], count) - tf.square(mean), 0.0)
        if dtype in (tf.float16, tf.bfloat16):
            mean = tf.cast(tf.clip_by_value(mean, dtype.min, dtype.max), dtype)
            variance = tf.cast(tf.clip_by_value(variance, dtype.min, dtype.max), dtype)
        return mean, variance

    return moments
