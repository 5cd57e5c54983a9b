"""Triton kernels, one op per file; each registers its Template on import."""
