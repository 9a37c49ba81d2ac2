"""Compute kernels, each beside its pure-torch reference.

The model and the engine call these through small functions that pick the fast path on CUDA and the
reference path elsewhere, so one code path serves both devices and tests compare the two.
"""
