"""JAX backend: the strategies are `keras.distribution.DataParallel` meshes.

- Variables are replicated on the mesh, each global batch is sharded over its
  devices, and XLA's SPMD partitioner inserts the gradient all-reduce.
- A model built before the distribution was active gets its variables laid
  out on the mesh for the run, and moved back to the default device after.
- A batch that cannot be split over the devices (the last, smaller batch of an
  epoch) is replicated instead of sharded: every device computes it whole, so
  the result equals one device and Keras's `IndivisibleError` never surfaces.
"""

import contextlib

import jax
import keras
from keras_strategies.backends.jax.common import ensure_cpu_devices

from keras_strategies.backend_base import (
    BackendStrategy,
    restore_compiled_functions,
    stash_compiled_functions,
    state_variables,
)
from keras_strategies.devices import check_available, parse_device


def create(strategy, devices, **options):
    """Returns the JAX implementation of `strategy`."""
    return JaxStrategy(strategy, devices, **options)


class JaxStrategy(BackendStrategy):
    backend = "jax"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        if self.kind == "default":
            self.native = None
        elif self.kind in ("one_device", "mirrored"):
            self.native = keras.distribution.DataParallel(devices=self.devices)
        else:
            raise self.unsupported(f"unknown strategy kind {self.kind!r}")

    def resolve_devices(self, requested):
        if requested is None:
            platform = jax.default_backend()
            if self.kind == "mirrored" and platform in ("gpu", "tpu"):
                return keras.distribution.list_devices(platform)
            return [keras.distribution.list_devices(platform)[0]]
        kind = parse_device(requested[0])[0]
        if kind == "cpu":
            ensure_cpu_devices(max(parse_device(d)[1] for d in requested) + 1, self.name)
        try:
            available = keras.distribution.list_devices(kind)
        except RuntimeError:
            available = []  # JAX has no such platform here
        check_available(requested, available, self.name, self.backend)
        return requested

    def scope(self):
        return self.native.scope() if self.native else contextlib.nullcontext()

    def attach(self, model):
        if self.native is None:
            return
        self._lay_out(model)
        restore_compiled_functions(model, self)  # same mesh, same layouts: no new compile

    def _lay_out(self, model):
        for variable in state_variables(model):
            if variable._value is None:
                continue
            layout = self.native.get_variable_layout(variable)
            variable._layout = layout
            variable._value = jax.device_put(variable._value, layout.backend_layout)

    @contextlib.contextmanager
    def run_context(self, model):
        if self.native is None:
            yield
            return
        # Keras creates the optimizer's slots and the metrics' state inside
        # fit/evaluate (`_symbolic_build`), where they came out on one device
        # beside the mesh-laid-out weights: Keras warns of "a mix of local ...
        # and distributed variables" and the step mixes devices. They are
        # laid out as soon as they exist.
        build = model._symbolic_build

        def symbolic_build(*args, **kwargs):
            result = build(*args, **kwargs)
            self._lay_out(model)
            return result

        model.__dict__["_symbolic_build"] = symbolic_build
        try:
            with self.scope():
                yield
        finally:
            model.__dict__.pop("_symbolic_build", None)

    def detach(self, model):
        if self.native is None:
            return
        home = jax.devices()[0]
        for variable in state_variables(model):
            if variable._value is None:
                continue
            variable._layout = None
            variable._value = jax.device_put(variable._value, home)
        stash_compiled_functions(model, self)
