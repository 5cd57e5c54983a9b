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


def _import_the_kernels_distribution() -> None:
    """The source tree's ``kernels/`` folder (installed as ``tuneforge.kernels``) shadows the PyPI package
    ``kernels`` (Hugging Face's kernel hub, a dependency of transformers >= 5.2x) wherever the tree's root
    is on ``sys.path`` (``python3 -m pytest`` from the root, the benchmark scripts): transformers then finds
    the distribution's metadata, imports the folder and fails (``cannot import name 'CUDAProperties'``).
    Where that would happen, import the distribution itself first, from the path without the root."""
    import importlib.util
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in sys.modules or not os.path.exists(os.path.join(root, "kernels", "gemm.py")):   # not the tree
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or not (spec.origin or "").startswith(os.path.join(root, "kernels") + os.sep):
        return
    try:
        from importlib.metadata import PackageNotFoundError, version
        version("kernels")
    except PackageNotFoundError:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        import kernels  # noqa: F401  (the distribution, now in sys.modules)
    except ImportError:
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_import_the_kernels_distribution()
