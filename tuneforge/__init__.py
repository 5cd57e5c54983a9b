"""tuneforge: pure-Triton communication-overlapped kernels for tensor-parallel LLM inference.

On a machine without a GPU, Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET=1``
is set here, before any kernel module is imported, unless the caller chose otherwise.
"""
import os


def _gpu_present() -> bool:
    # Cheap probe that avoids importing torch: NVIDIA and AMD device nodes.
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


if not _gpu_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__version__ = "0.1.0"
