"""What the TensorFlow implementations share: real `tf.distribute` strategies
run under Keras's own fit.

Fixes applied around Keras 3.15 (all for the length of this package's runs):
- BatchNormalization moving statistics drifted apart between replicas under
  MirroredStrategy (their variables use aggregation NONE). Non-trainable
  floating variables are created with aggregation MEAN, and BatchNormalization
  computes its statistics over the global batch (`synchronized=True`), so every
  replica holds identical values and training equals one device. During a run
  its moving statistics, mirrored, update on each replica alone (aggregation
  NONE): their new values are already identical everywhere, and MEAN made 2
  all-reduces a layer each step, across processes under MultiWorkerMirrored.
- Keras scales each replica's loss by 1/num_replicas, which is wrong for an
  unevenly split (last) batch; each replica's loss is scaled by its share of
  the global batch instead.
- A model built outside `scope()` gets its variables re-created as
  distributed variables for the run, and plain ones afterwards.
"""

import contextlib

import tensorflow as tf
from keras.src.layers.normalization.batch_normalization import BatchNormalization
from tensorflow.python.distribute.values import MirroredVariable

from keras_strategies.backends.tensorflow.keras_fixes import (
    local_value,
    metrics_read_together,
    multi_step_function,
    one_allreduce_moments,
    replica_local_optimizer,
    share_weighted_train_step,
)
from keras_strategies.devices import parse_device
from keras_strategies.errors import StrategyError
from keras_strategies.implementation.base import Implementation
from keras_strategies.implementation.model_state import (
    batch_norms_with_keras_moments,
    reset_compiled_functions,
    restore_compiled_functions,
    stash_compiled_functions,
    state_variables,
)
from keras_strategies.patches import overriding


def tf_device(name):
    """The TensorFlow spelling of a Keras device name (`"/device:GPU:1"`)."""
    kind, index = parse_device(name)
    return f"/device:{kind.upper()}:{index}"


def computes_on_host():
    """Always `False` for `keras_strategies.implementation.host_memory`:
    TensorFlow's CPU allocator keeps the memory it frees (11 page faults a
    step on the benchmark CNN, against JAX's 28 000), so glibc's settings are
    left as they are."""
    return False


def gpu_count():
    """The GPUs TensorFlow sees."""
    return len(tf.config.list_physical_devices("GPU"))


def accelerators():
    """This machine's TPU cores, else its GPUs, as Keras names (`"tpu:0"`,
    `"gpu:1"`); `[]` when it has neither. For `keras_strategies.auto()`.

    `tf.config.list_physical_devices` only lists: the runtime does not start,
    so logical CPU devices and strategies can still be configured after it.
    A remote TPU named by `TPU_NAME` is not looked for.
    """
    tpus = tf.config.list_physical_devices("TPU")
    if tpus:
        return [f"tpu:{i}" for i in range(len(tpus))]
    return [f"gpu:{i}" for i in range(gpu_count())]


def logical_cpu_count():
    """The logical CPU devices TensorFlow has (1 unless split)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    config = tf.config.get_logical_device_configuration(cpu)
    return len(config) if config else 1


def ensure_logical_cpus(count, strategy_name):
    """Splits the host CPU into `count` logical devices if TF has not started."""
    if logical_cpu_count() >= count:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise StrategyError(
            f"{strategy_name} on the tensorflow backend needs {count} logical "
            f"CPU devices, but TensorFlow has already started with "
            f"{logical_cpu_count()}. Create the strategy before anything runs "
            "TensorFlow (before building a model), or call "
            "tf.config.set_logical_device_configuration("
            "tf.config.list_physical_devices('CPU')[0], "
            f"[tf.config.LogicalDeviceConfiguration()] * {count}) at the very "
            f"start of the program. ({error})"
        ) from None


def mean_aggregating_creator(next_creator, **kwargs):
    """Non-trainable float variables (BatchNorm statistics, ...) get MEAN
    aggregation so a replica-context assign keeps replicas identical."""
    aggregation = kwargs.get("aggregation")
    dtype = kwargs.get("dtype")
    if (
        kwargs.get("trainable") is False
        and aggregation in (None, tf.VariableAggregation.NONE)
        and dtype is not None
        and tf.as_dtype(dtype).is_floating
    ):
        kwargs["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kwargs)


def recreate_variables(model):
    """Re-creates every variable's tf.Variable under the current scope."""
    with tf.init_scope():
        for variable in state_variables(model):
            if variable._value is None:
                continue  # not initialised yet: it will be, under the scope
            value = tf.identity(tf.convert_to_tensor(local_value(variable._value)))
            variable._value = None
            variable._initialize(value)
    _index_optimizer_variables(model)


_DISTRIBUTED = "_ks_distributed_variables"


def keep_distributed_variables(model, owner):
    """Before a model's variables become plain again after a run of `owner`:
    keeps their distributed tf.Variables (and so the steps traced over them)
    for `owner`'s next run of the model."""
    variables = state_variables(model)
    model.__dict__[_DISTRIBUTED] = (owner, variables, [v._value for v in variables])


def reuse_distributed_variables(model, owner):
    """Puts back the distributed tf.Variables `owner` kept for this model, each
    assigned the model's current value, so that the steps traced over them
    run again without a new trace. False (nothing changed) when there are
    none, another strategy kept them, or the model's variables changed."""
    kept = model.__dict__.pop(_DISTRIBUTED, None)
    variables = state_variables(model)
    if (kept is None or kept[0] is not owner or len(kept[1]) != len(variables)
            or any(a is not b for a, b in zip(kept[1], variables))
            or any(v._value is None or d is None for v, d in zip(variables, kept[2]))):
        return False
    with tf.init_scope():
        for variable, distributed in zip(variables, kept[2]):
            # no read back: on a sync-on-read variable (metrics) a read is a reduction over the replicas
            distributed.assign(tf.convert_to_tensor(local_value(variable._value)), read_value=False)
            variable._value = distributed
    _index_optimizer_variables(model)
    return True


def _index_optimizer_variables(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        optimizer._trainable_variables_indices = {
            optimizer._var_key(v): i for i, v in enumerate(optimizer._trainable_variables)
        }


@contextlib.contextmanager
def replica_local_statistics(model):
    """While entered: the moving statistics of every BatchNormalization layer
    of `model` that are mirrored variables update on each replica alone
    (aggregation NONE instead of the MEAN they were created with).

    Only for a run in which BatchNormalization is synchronized: each replica
    then computes the same new value from the same all-reduced moments, so the
    MEAN's all-reduce (one per variable per step, across processes under
    MultiWorkerMirrored) changes nothing. CentralStorage's aggregating variables
    and TPU variables keep their MEAN."""
    swapped = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, BatchNormalization):
            for variable in (getattr(layer, "moving_mean", None), getattr(layer, "moving_variance", None)):
                value = getattr(variable, "_value", None)
                if type(value) is MirroredVariable and value._aggregation == tf.VariableAggregation.MEAN:
                    swapped.append(value)
    for value in swapped:
        value._aggregation = tf.VariableAggregation.NONE
    try:
        yield
    finally:
        for value in swapped:
            value._aggregation = tf.VariableAggregation.MEAN


@contextlib.contextmanager
def global_batch_training(model, num_replicas, owner):
    """During one fit/evaluate/predict with several replicas: BatchNormalization
    computes its statistics over the global batch, and each replica's loss is
    weighted by its share of the global batch. The model is left as it was.

    The steps traced this way are kept for `owner`'s next run of the model (the
    same variables: a model built in its scope), so that they are not traced again
    at every call."""
    if num_replicas == 1:
        yield
        return
    norms = [
        layer for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, BatchNormalization) and not layer.synchronized
    ]
    with contextlib.ExitStack() as stack:
        for layer in norms:
            stack.enter_context(overriding(layer, "synchronized", True, "tf-synchronized-batchnorm"))
        for layer in batch_norms_with_keras_moments(model):
            stack.enter_context(overriding(layer, "_moments", one_allreduce_moments(layer),
                                           "tf-one-allreduce-moments"))
        stack.enter_context(replica_local_statistics(model))
        stack.enter_context(overriding(
            model, "train_step", share_weighted_train_step(model.train_step, _folds_count(model)),
            "tf-share-weighted-step"))
        stack.enter_context(replica_local_optimizer(getattr(model, "optimizer", None)))
        if isinstance(owner.native, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
            # where it was measured (TPUStrategy's sync-on-read variables are TPU-specific, not run here)
            stack.enter_context(overriding(model, "get_metrics_result", metrics_read_together(model, owner.native),
                                           "tf-one-metrics-read"))
        if model.steps_per_execution > 1:
            for kind in ("train", "test"):
                stack.enter_context(overriding(model, f"make_{kind}_function", _multi_step_maker(model, kind),
                                               "tf-multi-step"))
        restore_compiled_functions(model, owner, values=True)
        try:
            yield
        finally:
            stash_compiled_functions(model, owner, values=True)


def _folds_count(model):
    """Whether the example counts can ride along with the gradient all-reduce:
    Keras's own train_step (every loss it differentiates is scaled) and no
    loss scale optimizer (see `share_weighted_train_step`)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    from keras.src.optimizers import LossScaleOptimizer

    return (type(model).train_step is TensorFlowTrainer.train_step
            and not isinstance(getattr(model, "optimizer", None), LossScaleOptimizer))


def _multi_step_maker(model, kind):
    """A per-model `make_train_function` / `make_test_function` building
    `keras_fixes.multi_step_function`."""
    attribute = f"{kind}_function"

    def make_function(force=False):
        if getattr(model, attribute) is None or force:
            setattr(model, attribute, multi_step_function(model, getattr(model, f"{kind}_step")))
        return getattr(model, attribute)

    return make_function


class TFImplementation(Implementation):
    """A real `tf.distribute` strategy (`native`) run under Keras's own fit.

    Subclasses create `native` in `__init__`; a model built outside the scope
    gets its variables re-created under the strategy for the run.
    """

    backend = "tensorflow"
    keras_patches = ("tf-loss-share", "tf-variable-updates", "tf-symbolic-build")

    @property
    def num_replicas_in_sync(self):
        return self.native.num_replicas_in_sync

    def default_devices(self):
        """The devices used when none are asked for: the first GPU, else the CPU."""
        return ["gpu:0" if gpu_count() else "cpu:0"]

    def available_devices(self, kind, requested):
        if kind == "cpu":
            ensure_logical_cpus(max(parse_device(d)[1] for d in requested) + 1, self.name)
            return [f"cpu:{i}" for i in range(logical_cpu_count())], ""
        return ([f"gpu:{i}" for i in range(gpu_count())] if kind == "gpu" else []), ""

    @contextlib.contextmanager
    def scope(self):
        with self.native.scope():
            with tf.variable_creator_scope(mean_aggregating_creator):
                yield

    def attach(self, model):
        with self.scope():
            if not reuse_distributed_variables(model, self):  # a later run with this strategy: no new trace
                recreate_variables(model)
        self._saved = (model._distribute_strategy, model._jit_compile)
        model._distribute_strategy = self.native  # the tf-strategy-attributes patch
        model._jit_compile = False  # as Keras does for models built in a scope
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = self.native
        reset_compiled_functions(model)

    def detach(self, model):
        keep_distributed_variables(model, self)  # with the steps stashed for them: until another strategy runs
        recreate_variables(model)
        model._distribute_strategy, model._jit_compile = self._saved
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = tf.distribute.get_strategy()
        reset_compiled_functions(model)

    @contextlib.contextmanager
    def run_context(self, model):
        with global_batch_training(model, self.num_replicas_in_sync, self), self.scope(), \
                self._optimizer_under_strategy(model):
            yield

    def _optimizer_under_strategy(self, model):
        """An optimizer created outside the scope, given to a model compiled
        in it, runs under the strategy (tf.distribute refuses it: "Mixing
        different tf.distribute.Strategy objects"), as long as it has not
        built its slots elsewhere."""
        optimizer = getattr(model, "optimizer", None)
        if (optimizer is None or optimizer.built or not hasattr(optimizer, "_distribution_strategy")
                or optimizer._distribution_strategy is self.native):
            return contextlib.nullcontext()
        return overriding(optimizer, "_distribution_strategy", self.native, "tf-strategy-attributes")
