"""`torch.distributed.rpc`: the engine of ParameterServer on PyTorch and JAX.

- `group`: joining the job's RPC group (a dynamic group, so that a restarted
  worker can join again), evicting a dead member, the chief's "done".
- `server`: a parameter server's variables and optimizer.
- `worker`: a worker's loop, inside its `fit`.
- `chief`: the coordinator's dispatch of updates to workers.
- `implementation`: the ParameterServer implementation they make up; the
  PyTorch and JAX modules (`backends/<backend>/parameter_server.py`) add how
  their backend computes gradients and applies them.

Payloads travel as torch tensors (TensorPipe sends them without pickling).
"""
