"""Host memory kept mapped between training steps (glibc's `malloc`, on the CPU).

With glibc's defaults a buffer above its mmap threshold is mapped when it is
allocated and unmapped when it is freed, and the heap's free top above its
trim threshold goes back to the kernel. A training step on the CPU allocates
its activations and temporaries anew every step, so every step faults each
4 KiB page of them in again, and the kernel zeroes it. Measured on one core,
idle Intel VM, Keras 3.15.1 `fit`, global batch 256 (2026-12-06):

- JAX: XLA's CPU runtime allocates each jitted step's temporaries as one
  buffer (114 MB for the benchmark CNN) on one of its own threads, whose
  malloc arena maps anything above 64 MiB: 28 000 page faults a step, the
  CNN's step 121 ms; BN convnet 24 000 faults, 130 ms.
- PyTorch: activations above the mmap threshold, or trimmed off the heap's
  top: 7 000 faults a step (CNN, 80 ms), 11 000-16 000 (BN convnet).
- TensorFlow: 11 a step; its CPU allocator keeps what it frees. Left alone.

Kept mapped (every thread allocates from glibc's main arena, which then
serves large buffers from its heap instead of mapping them, and keeps up to
1 GiB of free top), the same steps fault 0-9 times: JAX CNN 83 ms, BN
convnet 93 ms; PyTorch CNN 69 ms, BN convnet 100 ms; the MLPs unchanged.
The process keeps its peak host memory (up to 1 GiB more) instead of
handing freed memory back, as the engines' own caching allocators do on
accelerators.

This module applies it when `keras_strategies` is imported, if the active
backend computes on this machine's CPU (each backend says:
`keras_strategies.backends.<backend>.base.computes_on_host`), on Linux with
glibc. It must come before the engine's threads first allocate (JAX: before
anything runs JAX); import `keras_strategies` before running the engine.
`KERAS_STRATEGIES_KEEP_HOST_MEMORY=0` leaves glibc's defaults, `=1` applies
it whatever the backend and devices.
"""

import ctypes
import os

from keras_strategies.errors import StrategyError

VARIABLE = "KERAS_STRATEGIES_KEEP_HOST_MEMORY"
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept instead of returned to the kernel

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

_state = {"kept": False, "reason": "not asked yet"}


def requested(environ=None):
    """What `KERAS_STRATEGIES_KEEP_HOST_MEMORY` asks for.

    Args:
        environ: the environment (`os.environ` when `None`).

    Returns:
        `True` (keep it, whatever the backend), `False` (glibc's defaults)
        or `None` (unset: when the backend computes on the CPU).

    Example:
    >>> requested({"KERAS_STRATEGIES_KEEP_HOST_MEMORY": "0"})
    False
    """
    environ = os.environ if environ is None else environ
    value = environ.get(VARIABLE, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise StrategyError(
        f"{VARIABLE}={environ[VARIABLE]!r}: use 1 to keep host memory mapped between "
        "training steps, 0 to leave glibc's malloc settings as they are, or leave it "
        "unset (kept when the backend computes on the CPU)."
    )


def _glibc_mallopt():
    """glibc's `mallopt`, or `None` where the C library is not glibc."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep(computes_on_host, environ=None):
    """Keeps host memory mapped between steps, when asked or wanted.

    Args:
        computes_on_host: a callable returning whether the active backend
            computes on this machine's CPU; called only when the variable is
            unset.
        environ: the environment (`os.environ` when `None`).

    Returns:
        `True` when glibc's settings were changed, else `False`; `state()`
        says why.

    Example:
    >>> keep(lambda: True, environ={"KERAS_STRATEGIES_KEEP_HOST_MEMORY": "0"})
    False
    """
    wanted = requested(environ)
    if wanted is False:
        return _note(False, f"{VARIABLE}=0")
    if wanted is None and not computes_on_host():
        return _note(False, "the backend computes on an accelerator, or keeps its host memory itself")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return _note(False, "the C library is not glibc")
    if not all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS):
        return _note(False, "glibc refused the settings")
    return _note(True, f"{VARIABLE}=1" if wanted else "the backend computes on the CPU")


def state():
    """Whether host memory is kept mapped in this process, and why.

    Returns:
        A dict: `kept` (bool) and `reason` (str).

    Example:
    >>> sorted(state())
    ['kept', 'reason']
    """
    return dict(_state)


def _note(kept, reason):
    _state.update(kept=kept, reason=reason)
    return kept
