"""The `tuneforge` command. Each area adds its own subcommands through a ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

import tuneforge  # noqa: F401  (selects the interpreter on GPU-less machines before kernels load)
from tuneforge.errors import TuneforgeError

# module -> it registers these subcommands
AREAS = ("tuneforge.tune.cli", "tuneforge.db.cli", "tuneforge.engine.cli", "tuneforge.engine.export_onnx",
         "tuneforge.dashboard.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description="Tune, store and serve communication-"
                                "overlapped Triton kernels for tensor-parallel Qwen3 inference.")
    p.add_argument("--version", action="version", version=f"tuneforge {tuneforge.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:   # that area is not built yet
                continue
            raise
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # as typed, for a result's recorded command
    try:
        return int(args.func(args) or 0)
    except TuneforgeError as e:
        print(f"tuneforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
