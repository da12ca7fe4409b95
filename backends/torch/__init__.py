"""PyTorch backend: Default and OneDevice in this process.

`Mirrored` over one device is `OneDevice`. Over several devices it needs one
process per device (torch.distributed), which this release does not have yet:
it raises a clear error instead.
"""
