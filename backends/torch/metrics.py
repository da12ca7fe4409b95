"""Metrics of a multi-process PyTorch run: results from the state (totals and
counts) summed over every worker, so every worker logs the global values."""

import functools
import math

import torch
import torch.distributed as dist
from keras.src.backend.torch.core import to_torch_dtype
from keras.src.metrics.reduction_metrics import Mean
from keras.src.trainers.trainer import Trainer


def reduced_metric_variables(model):
    """The metric variables that are summed (or averaged) over workers."""
    return [v for v in model.metrics_variables if v.aggregation in ("sum", "mean")]


def flat_metric_state(variables, dtype):
    """Every variable's value in one flat tensor."""
    return torch.cat([v.value.detach().reshape(-1).to(dtype) for v in variables])


def metric_versions(variables):
    """In-place updates bump a tensor's version: the same on every worker,
    since every worker runs the same updates (NaN-safe, unlike values)."""
    return tuple(v.value._version for v in variables)


def float32_mean_state(metric):
    """`(total, count)`, the tensors of a Keras `Mean` itself (not a
    subclass: those have their own `result`) kept in float32, such as the
    loss tracker; None for any other metric."""
    if type(metric) is not Mean or metric.dtype != "float32":
        return None
    # the tensors themselves (as `global_metrics` swaps them): `.value`'s
    # autocast and stateless-scope checks (about 5 us each) change nothing
    # for a float32 metric outside a layer's call
    total, count = metric.total._value, metric.count._value
    if total.dtype != torch.float32 or count.dtype != torch.float32:
        return None
    return total, count


def mean_result(metric):
    """`metric.result()` for a float32 `Mean` (the loss tracker, say) with
    the torch operations of Keras's `divide_no_nan`, which is what that
    method runs, without its dtype inference and conversions (about 70 us
    of a step on one thread); None for any other metric."""
    state = float32_mean_state(metric)
    if state is None:
        return None
    total, count = state
    zero = count == 0
    return torch.where(zero, 0, torch.divide(total, torch.where(zero, 1, count)))


def metrics_result(model):
    """`Trainer.get_metrics_result(model)`, with `mean_result` where it
    applies: the same values."""
    results = {}
    for metric in model.metrics:
        result = mean_result(metric)
        if result is None:
            result = metric.result()
        if isinstance(result, dict):
            results.update(result)
        else:
            results[metric.name] = result
    return results


def global_metrics(model, get_metrics_result, step, world_size):
    """`model.get_metrics_result` computed from the state summed over workers.

    Args:
        model: the Keras model.
        get_metrics_result: the model's own method.
        step: the `ddp.DataParallelStep`; its `metric_cache` holds the state
            already reduced in this step's gradient all-reduce, if any.
        world_size: the number of workers (for MEAN-aggregated variables).

    Returns:
        The replacement method.
    """
    if getattr(get_metrics_result, "__func__", None) is Trainer.get_metrics_result:
        get_metrics_result = functools.partial(metrics_result, model)

    def result():
        variables = reduced_metric_variables(model)
        if not variables:
            return get_metrics_result()
        cache, step.metric_cache = step.metric_cache, None
        if cache is not None and cache[0] == metric_versions(variables):
            flat = cache[1]  # reduced in this step's gradient all-reduce
            step.metric_cache = cache
        else:
            flat = flat_metric_state(variables, torch.float64)
            dist.all_reduce(flat)
        # the results are computed from the global state, which stands in
        # for each variable's own tensor (swapped, not copied) meanwhile
        local = [v._value for v in variables]
        offset = 0
        try:
            for variable in variables:
                shape = tuple(variable.shape)
                size = math.prod(shape)
                total = flat[offset:offset + size].reshape(shape)
                offset += size
                if variable.aggregation == "mean":
                    total = total / world_size
                variable._value = total.to(to_torch_dtype(variable.dtype))
            return get_metrics_result()
        finally:
            for variable, value in zip(variables, local):
                variable._value = value

    return result
