"""PyTorch implementations: Keras device placement, `torch.distributed` and DDP (see `local.py`)."""
