"""What the JAX implementations share: `keras.distribution.DataParallel` meshes.

- Variables are replicated on the mesh, each global batch is sharded over its
  devices, and XLA's SPMD partitioner inserts the gradient all-reduce.
- A model built before the distribution was active gets its variables laid
  out on the mesh for the run, and moved back to the default device after.
- A batch that cannot be split over the devices (the last, smaller batch of an
  epoch) is replicated instead of sharded (`keras_fixes`): every device
  computes it whole, so the result equals one device and Keras's
  `IndivisibleError` never surfaces.
"""

import contextlib
import importlib.metadata
import importlib.util

import jax
import keras

from keras_strategies.backends.jax.keras_fixes import bounded_steps, one_pass_moments, unaliased_ema
from keras_strategies.devices import parse_device
from keras_strategies.errors import StrategyError
from keras_strategies.implementation.base import Implementation
from keras_strategies.implementation.model_state import (
    batch_norms_with_keras_moments,
    restore_compiled_functions,
    stash_compiled_functions,
    state_variables,
)
from keras_strategies.patches import overriding


def _backend_started():
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def ensure_cpu_devices(count, strategy_name):
    """Gives JAX `count` host devices if its backend has not started yet."""
    if not _backend_started():
        if jax.config.jax_num_cpu_devices < count:
            jax.config.update("jax_num_cpu_devices", count)
        return
    have = len(jax.devices("cpu"))
    if have < count:
        raise StrategyError(
            f"{strategy_name} on the jax backend needs {count} CPU devices, but "
            f"JAX has already started with {have}. Create the strategy before "
            "anything runs JAX (before building a model), or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} in the "
            "environment, or call "
            f'jax.config.update("jax_num_cpu_devices", {count}) before JAX starts.'
        )


def steps_in_flight_bounded(model, devices):
    """Context: on host (CPU) devices, with more than one in the mesh, the
    model's jitted steps never run far ahead of their results
    (`keras_fixes.bounded_steps`); elsewhere nothing changes."""
    if len(devices) < 2 or any(parse_device(device)[0] != "cpu" for device in devices):
        return contextlib.nullcontext()
    return overriding(model, "_make_function", bounded_steps(model._make_function), "jax-bounded-steps")


@contextlib.contextmanager
def global_moments_in_one_pass(model, replicas):
    """While entered, each BatchNormalization of `model` that keeps Keras's own
    `_moments` computes the global batch's statistics in one pass
    (`keras_fixes.one_pass_moments`, patch `jax-one-pass-moments`), when the
    batch is split over `replicas` >= 2 devices; at one replica the model
    runs Keras's own formula, as on one device.

    Args:
        model: the model of the run.
        replicas: the devices each global batch is split over.
    """
    with contextlib.ExitStack() as stack:
        if replicas >= 2:
            for layer in batch_norms_with_keras_moments(model):
                stack.enter_context(overriding(layer, "_moments", one_pass_moments(layer), "jax-one-pass-moments"))
        yield


def computes_on_host():
    """Whether JAX will compute on this machine's CPU, told without starting
    it: `JAX_PLATFORMS` names only `cpu`, or, unset, no GPU or TPU plugin is
    installed (`jax_plugins`, `libtpu`). For
    `keras_strategies.implementation.host_memory`: each jitted step's
    temporaries are one buffer XLA allocates anew every step.
    """
    platforms = [p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()]
    if platforms:
        return set(platforms) <= {"cpu"}
    if importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None:
        return False
    return not importlib.metadata.entry_points(group="jax_plugins")


def accelerators():
    """Every GPU or TPU device (Keras names) when the default platform is one, else [].

    Used by `Mirrored`'s defaults and by `keras_strategies.auto()`. It starts
    JAX's backend, as any strategy on one machine does when it is created;
    `auto()` calls it only when the environment describes no cluster (a
    multi-process job must run `jax.distributed.initialize()` first).
    """
    platform = jax.default_backend()
    return keras.distribution.list_devices(platform) if platform in ("gpu", "tpu") else []


class JaxImplementation(Implementation):
    """A `keras.distribution.DataParallel` mesh over the devices (`native`)."""

    backend = "jax"
    keras_patches = ("jax-indivisible-batch", "jax-one-device-mesh")

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        self.native = self.make_distribution()

    def make_distribution(self):
        """The `keras.distribution.Distribution` this strategy runs under."""
        return keras.distribution.DataParallel(devices=self.devices)

    def default_devices(self):
        """The devices used when none are asked for: the first one."""
        return [keras.distribution.list_devices(jax.default_backend())[0]]

    def available_devices(self, kind, requested):
        if kind == "cpu":
            ensure_cpu_devices(max(parse_device(d)[1] for d in requested) + 1, self.name)
        try:
            return keras.distribution.list_devices(kind), ""
        except RuntimeError:
            return [], ""  # JAX has no such platform here

    def scope(self):
        return self.native.scope()

    def attach(self, model):
        self.lay_out(model)
        restore_compiled_functions(model, self)  # same mesh, same layouts: no new compile

    def lay_out(self, model):
        """Puts every variable of the model on the mesh, with its layout."""
        for variable in state_variables(model):
            if variable._value is None:
                continue
            layout = self.native.get_variable_layout(variable)
            variable._layout = layout
            variable._value = self.place(variable._value, layout.backend_layout)

    def place(self, value, sharding):
        """`value` laid out with `sharding`."""
        return jax.device_put(value, sharding)

    def to_home(self, value):
        """`value` on the default device, where a detached model lives."""
        return jax.device_put(value, jax.devices()[0])

    def detach(self, model):
        for variable in state_variables(model):
            if variable._value is None:
                continue
            variable._layout = None
            variable._value = self.to_home(variable._value)
        stash_compiled_functions(model, self)

    @contextlib.contextmanager
    def run_context(self, model):
        # Keras creates the optimizer's slots and the metrics' state inside
        # fit/evaluate (`_symbolic_build`), where they came out on one device
        # beside the mesh-laid-out weights: Keras warns of "a mix of local ...
        # and distributed variables" and the step mixes devices. They are
        # laid out as soon as they exist.
        build = model._symbolic_build

        def symbolic_build(*args, **kwargs):
            result = build(*args, **kwargs)
            self.lay_out(model)
            return result

        with overriding(model, "_symbolic_build", symbolic_build, "jax-late-layout"), self.scope(), \
                unaliased_ema(model), steps_in_flight_bounded(model, self.devices), \
                global_moments_in_one_pass(model, self.num_replicas_in_sync):
            yield
