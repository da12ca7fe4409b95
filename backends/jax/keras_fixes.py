"""The JAX replacements of Keras functions named in `keras_strategies.patches`.

Each factory here is given Keras's original and returns what stands in for
it while one of this package's strategies runs.
"""

import collections
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from keras.src.distribution import TensorLayout, distribution_lib


class InputMode:
    """How batches become global arrays while one of our strategies runs.

    `global_batches`: every process holds the whole global batch (the
    multi-process strategies feed each process the full input), and each
    device takes its slice of it.
    """

    global_batches = False


input_mode = InputMode()


def _batch_partitions(sharding):
    spec = sharding.spec
    if not spec or spec[0] is None:
        return 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    parts = 1
    for name in names:
        parts *= sharding.mesh.shape[name]
    return parts


def replicating_distribute_data_input(original):
    """`distribute_data_input` that replicates a batch that cannot be split
    over the devices (the last, smaller one) instead of raising
    `IndivisibleError`, and follows `input_mode`."""

    def distribute_data_input(per_process_batch, layout, batch_dim_name):
        sharding = layout.backend_layout if isinstance(layout, TensorLayout) else layout
        if not isinstance(sharding, NamedSharding) or not per_process_batch.ndim:
            return original(per_process_batch, layout, batch_dim_name)
        indivisible = per_process_batch.shape[0] % _batch_partitions(sharding)
        single = jax.process_count() == 1
        if indivisible and (single or input_mode.global_batches):
            sharding = NamedSharding(sharding.mesh, PartitionSpec())
        if input_mode.global_batches or single:
            batch = per_process_batch
            return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
        return original(per_process_batch, layout, batch_dim_name)

    return distribute_data_input


def host_values_onto_mesh(original):
    """`distribute_tensor` that lays a host value (or an array of this process
    alone) onto a mesh spanning processes slice by slice, itself, instead of
    with `jax.device_put`, whose cross-process equality check reshapes the
    devices as processes x local devices: a ValueError when the processes
    hold different numbers of devices."""
    from keras.src.utils import jax_utils

    def distribute_tensor(tensor, layout):
        sharding = layout.backend_layout if isinstance(layout, TensorLayout) else layout
        if (isinstance(sharding, NamedSharding) and not sharding.is_fully_addressable
                and not jax_utils.is_in_jax_tracing_scope(tensor)
                and (not isinstance(tensor, jax.Array) or tensor.is_fully_addressable)):
            host = np.asarray(tensor)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return original(tensor, layout)

    return distribute_tensor


def mesh_shardings_kept(original):
    """`distribute_tensor` that gives an array the mesh's own sharding when it
    lies on the one device of a one-device mesh, instead of keeping its
    single-device sharding as "equivalent".

    The jitted step's cache tells the two apart: Keras resets its metrics to
    single-device zeros at each epoch's start, the step returns them on the
    mesh, and the step compiled again at the second step of a fit (and Keras's
    own `DataParallel` once more at the next epoch). Measured on one device,
    MLP: the train step compiled twice per fit, now once."""
    from keras.src.utils import jax_utils

    def distribute_tensor(tensor, layout):
        sharding = layout.backend_layout if isinstance(layout, TensorLayout) else layout
        if (isinstance(sharding, NamedSharding) and isinstance(tensor, jax.Array)
                and not jax_utils.is_in_jax_tracing_scope(tensor)
                and not isinstance(tensor.sharding, NamedSharding)
                and tensor.sharding.is_equivalent_to(sharding, tensor.ndim)):
            return jax.device_put(tensor, sharding)
        return original(tensor, layout)

    return distribute_tensor


def without_distribution(original):
    """A `CallbackList` hook run with no distribution active: what callbacks
    create (Keras's saving code builds a throw-away Optimizer, for one) stays
    local, instead of becoming a cross-process array that only the chief
    creates, which would leave the other workers out of the collective."""

    def hook(self, *args, **kwargs):
        active = distribution_lib.distribution()
        distribution_lib.set_distribution(None)
        try:
            return original(self, *args, **kwargs)
        finally:
            distribution_lib.set_distribution(active)

    hook.__name__ = original.__name__  # read by implementation.batch_hooks
    return hook


@contextlib.contextmanager
def unaliased_ema(model):
    """After a fit with `use_ema`, the model's variables get their own buffers.

    Keras's `finalize_variable_values` assigns each EMA average to its model
    variable, and a JAX variable's assign keeps the very array when its
    layout already matches: the model variable and the optimizer's average
    then share one buffer, which the next jitted step (an `evaluate`, a
    second `fit`) donates. The average is left deleted, and the next fit
    fails with "Buffer has been deleted or donated" (plain Keras 3.15 too:
    docs/upstream/jax-ema-donated-average.md).
    """
    try:
        yield
    finally:
        optimizer = getattr(model, "optimizer", None)
        if getattr(optimizer, "use_ema", False) and optimizer.built:
            shared = {id(v._value) for v in optimizer.variables if v._value is not None}
            for variable in model.trainable_variables:
                if variable._value is not None and id(variable._value) in shared:
                    variable._value = jax.numpy.copy(variable._value)


# How many calls of a jitted step may run ahead of the first unfinished one.
# XLA's CPU client admits 32 computations per device before a launch waits.
STEPS_IN_FLIGHT = 4


def bounded_steps(make_function, depth=STEPS_IN_FLIGHT):
    """A `Model._make_function` whose steps wait, before returning, for the
    step `depth` calls earlier to end.

    On host devices XLA's CPU client admits 32 computations per device; the
    launch of one more waits for a slot on one of the client's own threads
    (as many as the machine's cores). Keras's JAX `fit` never reads a step's
    result until the epoch ends, so a step's launch onto one device could wait
    there while the device's earlier steps needed that very thread, and the
    other device, inside the all-reduce, for them: XLA aborted the process
    after 40 s ("Termination timeout for all reduce ... only 1 of them
    arrived on time"). A few steps ahead keep the devices as busy, and the
    queue never fills (plain JAX: docs/upstream/jax-cpu-inflight-deadlock.md).

    Args:
        make_function: the model's own `_make_function`.
        depth: the calls that may run ahead of the first unfinished one.

    Returns:
        The replacement `_make_function`.
    """

    def _make_function(step_function, concatenate_outputs=False):
        pending = collections.deque()

        def step(state, data):
            outputs, state = step_function(state, data)
            pending.append(outputs)  # the state is donated to the next step; the outputs are not
            if len(pending) > depth:
                jax.block_until_ready(pending.popleft())
            return outputs, state

        return make_function(step, concatenate_outputs=concatenate_outputs)

    return _make_function


# -- jax-one-pass-moments -------------------------------------------------------
def one_pass_moments(layer):
    """`layer._moments` for a BatchNormalization whose batch is split over
    devices: the global batch's mean and variance from one cross-device sum
    forward and one backward, instead of two each.

    Keras's JAX moments are `jnp.mean` then `jnp.var`: over a sharded batch
    XLA all-reduces the mean, then the squared deviations from it, one after
    the other, and the backward pass does the same again (the variance's own
    path through the mean). Here both sums are taken from the same input in
    one pass, `E[d]` and `E[d^2]` of `d = x - K`, so XLA combines them into
    one all-reduce, and the variance is `E[d^2] - E[d]^2` (clipped at 0).
    The shift `K` is the layer's moving mean (no gradient; identical on every
    device), so the difference of squares stays well-conditioned once the
    moving mean follows the data: the one-pass formula that Flax's
    `BatchNorm` and Keras's synchronized TensorFlow statistics use, minus
    their cancellation when the mean is large against the spread. float16
    and bfloat16 inputs are computed in float32, as Keras does. With a mask,
    Keras's own method runs.

    Args:
        layer: a `keras.layers.BatchNormalization`.

    Returns:
        The replacement of `layer._moments`: `(inputs, mask) -> (mean, variance)`.
    """
    original = layer._moments

    def moments(inputs, mask):
        if mask is not None:
            return original(inputs, mask)
        axes = tuple(layer._reduction_axes)
        x = jnp.asarray(inputs)
        dtype = x.dtype
        if dtype in (jnp.float16, jnp.bfloat16):
            x = x.astype(jnp.float32)
        shift = jax.lax.stop_gradient(jnp.asarray(layer.moving_mean.value, x.dtype))
        shape = [1] * x.ndim
        for axis in range(x.ndim):
            if axis not in axes:
                shape[axis] = x.shape[axis]
        d = x - shift.reshape(shape)
        mean_d = jnp.mean(d, axes)
        mean = shift + mean_d
        variance = jnp.maximum(jnp.mean(jnp.square(d), axes) - jnp.square(mean_d), 0.0)
        if dtype in (jnp.float16, jnp.bfloat16):
            limit = jnp.finfo(dtype)
            mean = jnp.clip(mean, limit.min, limit.max).astype(dtype)
            variance = jnp.clip(variance, limit.min, limit.max).astype(dtype)
        return mean, variance

    return moments
