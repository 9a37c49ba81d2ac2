"""Compute kernels, each beside its pure-torch reference.

The model and the engine call these through small functions that pick the fast path on CUDA and the
reference path elsewhere, so one code path serves both devices and tests compare the two.
"""

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter's launches): launch shapes that
    must fill the card size themselves by it."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
