"""What every backend's implementation of a strategy builds on, written once.

- `base`: `Implementation`, the class each backend's strategy subclasses, and
  the order in which a fit/evaluate/predict call runs.
- `multi_process`: the one multi-process layer (MultiWorkerMirrored,
  multi-process Mirrored on PyTorch, ParameterServer): the cluster, timeouts,
  chief-only callbacks (`chief_only`), the watchdog (`watchdog`), lost peers.
- `data`: splitting fit/evaluate input between workers.
- `model_state`: a model's variables and the steps compiled for it.
- `placement`: where CentralStorage keeps variables, and finding TPUs.
"""
