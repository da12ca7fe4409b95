"""PyTorch implementations: Keras device placement, torch.distributed + DDP (see `base.py`)."""
