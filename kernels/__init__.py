"""Triton kernels (installed as outlierq.kernels): tensors and scalars in, tensors out. Triton is
imported inside each module, so importing outlierq never needs it."""
