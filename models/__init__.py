"""Qwen3 model definitions built from tuneforge TP layers and kernels."""
