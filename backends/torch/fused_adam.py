"""Keras's Adam update on torch in one fused kernel per step.

Keras 3.15's torch Adam (`torch_adam.Adam._parallel_update_step`) runs about
ten `torch._foreach_*` passes plus scalar ops per step: 2.75 ms for the
benchmark MLP (784-256-256-10) on one CPU thread, against 0.25 ms for torch's
fused Adam kernel (measured; `docs/benchmarks/README.md`). The two compute
the same update:

    Keras:  var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    fused:  var -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps')

with eps' = eps / sqrt(1 - b2^t), so the fused kernel is handed that epsilon
each step. The results agree to float rounding (1e-6 after 200 steps on a
linear model), not bit for bit: in a network whose ReLUs flip, such rounding
grows over training as any change of summation order does. It is therefore
used only where the gradient all-reduce already changes that order
(MultiWorkerMirrored, multi-device Mirrored); Default, OneDevice and
one-device Mirrored keep Keras's own update, bit for bit.

Only plain float32 Adam and AdamW (no amsgrad) are replaced (AdamW's update step
is Adam's: Keras applies its decoupled weight decay before it, in `apply()`); every other optimizer, and
everything `Optimizer.apply` does around the update (learning rate schedules,
weight decay, clipping, gradient accumulation, loss scaling, the iteration
count), is Keras's own.
"""

import contextlib
import math

import torch
from keras.src.backend.torch.optimizers.torch_adam import Adam as KerasTorchAdam
from keras.src.backend.torch.optimizers.torch_adamw import AdamW as KerasTorchAdamW

from keras_strategies.patches import overriding


def supports(optimizer):
    """Whether `optimizer` gets the fused update."""
    return (
        # AdamW's update step is Adam's: Keras applies the decay before it, in apply()
        type(optimizer) in (KerasTorchAdam, KerasTorchAdamW)
        and not optimizer.amsgrad
        and hasattr(torch, "_fused_adam_")
        and all(isinstance(b, float) for b in (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon))
    )


def fused_update_step(optimizer):
    """A replacement for `optimizer._backend_update_step`."""
    original = optimizer._backend_update_step

    @torch.no_grad()
    def update_step(grads, variables, learning_rate):
        params = [v.value for v in variables]
        device = params[0].device
        if any(p.dtype != torch.float32 or p.device != device for p in params) or any(
            g.dtype != torch.float32 or g.device != device for g in grads
        ):
            return original(grads, variables, learning_rate)
        index = optimizer._get_variable_index
        momentums = [optimizer._momentums[index(v)].value for v in variables]
        velocities = [optimizer._velocities[index(v)].value for v in variables]
        step = float(optimizer.iterations.value) + 1.0  # Keras counts after the update
        correction = math.sqrt(1.0 - optimizer.beta_2**step)
        steps = [torch.tensor(step, device=device)] * len(params)
        torch._fused_adam_(
            params,
            [g.contiguous() for g in grads],
            momentums,
            velocities,
            [],
            steps,
            lr=float(learning_rate),
            beta1=optimizer.beta_1,
            beta2=optimizer.beta_2,
            weight_decay=0.0,  # Keras applies its own weight decay in apply()
            eps=optimizer.epsilon / correction,
            amsgrad=False,
            maximize=False,
        )

    return update_step


def fused_adam(optimizer):
    """While active, `optimizer` (if a plain Keras Adam or AdamW) updates in one kernel
    (the `torch-fused-adam` patch)."""
    if optimizer is None or not supports(optimizer):
        return contextlib.nullcontext()
    return overriding(optimizer, "_backend_update_step", fused_update_step(optimizer), "torch-fused-adam")
