"""`tuneforge export-onnx`: the model's torch path as an ONNX graph (``model.onnx``) plus one external
weights file (``model.onnx.data``), viewable in Netron and runnable in onnxruntime.

The graph is the prefill forward from an empty cache: ``tokens`` int64 [1, T] -> ``logits`` [1, T,
vocab], T dynamic, every op its torch baseline (``--dispatch baseline``). Prefill attends only to its
own keys, so the cache writes are left out (``_NoCache``). Sparse layers run ``ExportOps.moe_experts``:
the baseline's per-expert loop reads the routing back to the host (data-dependent control flow), so
the graph computes every expert on every token and weights each output by the router's weights
scattered over the experts (zero for the experts a token did not pick): the same sum, at experts /
top_k times the routed expert FLOPs and an [experts, T, 2 moe_intermediate] activation.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.engine.dispatch import Ops
from tuneforge.engine.tp import TPStep
from tuneforge.errors import InputError
from tuneforge.models.qwen3 import Step

EXTRA = "tuneforge[onnx]"
GRAPH, WEIGHTS = "model.onnx", "model.onnx.data"


class _NoKeys:
    """Builds no lookup keys: a key's int(tokens) would fix the graph's symbolic token count."""

    def __getattr__(self, name):
        return lambda *args, **dims: None


class ExportOps(Ops):
    """Baseline dispatch that looks nothing up, with the MoE experts in a trace-friendly form (no host
    reads)."""
    problems = _NoKeys()

    def __init__(self):
        super().__init__("baseline")

    def _run(self, problem, kernel, baseline):
        return baseline()

    def tp_step(self, m, dtype, shard, **dims) -> TPStep:
        return TPStep(shard, m)    # TP 1: the torch path, every token on this rank

    def moe_experts(self, x, gate_up, down, weights, ids):
        dense = torch.zeros(ids.shape[0], gate_up.shape[0], dtype=x.dtype, device=x.device)
        dense = dense.scatter(1, ids.long(), weights.to(x.dtype))              # [tokens, experts]
        h = torch.einsum("th,enh->etn", x, gate_up)                            # [experts, tokens, 2 inter]
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down)              # [experts, tokens, hidden]
        return torch.einsum("te,eth->th", dense, y)


class _NoCache:
    """A prefill from an empty cache reads nothing back, so the graph keeps no cache."""
    sharded = False          # KVCache's layout flag: split by heads (nothing gathered)

    def slots(self, positions):
        return positions

    def write(self, layer, rows, slots, kv) -> None:
        pass

    def planes(self, layer) -> None:
        return None


class Prefill(nn.Module):
    """tokens [1, T] -> logits [1, T, vocab] through ``ops``."""

    def __init__(self, model, ops):
        super().__init__()
        self.model, self.ops = model, ops

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        step = Step(rows=torch.zeros_like(positions), positions=positions, prefill=True, kv_len=tokens.shape[1])
        return self.model(tokens, step, _NoCache(), self.ops)[None]


def check_ready(out_dir: str) -> None:
    """Before any weights load: the onnx extra is installed (else one line naming it), ``out_dir`` is
    no file."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter)
    except ModuleNotFoundError as e:
        raise InputError(f"export-onnx needs the onnx extra ({e.name} is not installed): "
                         f"pip install '{EXTRA}'") from None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} is a file, not a directory")


def export(model, out_dir: str, example_tokens: int = 8) -> str:
    """Write ``model``'s prefill graph and its weights into ``out_dir``; the graph's path."""
    check_ready(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, GRAPH)
    tokens = torch.zeros(1, example_tokens, dtype=torch.long)
    seq = torch.export.Dim("T", min=1, max=model.cfg.max_positions)
    prefill = Prefill(model, ExportOps()).eval()
    with torch.inference_mode(False), torch.no_grad():
        # one eager pass first fills rope.inv_freq's cache, so the graph holds transformers' exact fp32
        # frequencies as a constant (traced, theta ** (arange / d) came out wrong in onnxruntime)
        prefill(tokens)
        program = torch.onnx.export(prefill, (tokens,), input_names=["tokens"], output_names=["logits"],
                                    dynamic_shapes={"tokens": {1: seq}}, dynamo=True, verbose=False)
    for stale in (path, os.path.join(out_dir, WEIGHTS)):
        if os.path.exists(stale):
            os.remove(stale)
    program.save(path, external_data=True)     # the initializers into one file, WEIGHTS beside the graph
    return path


def register(subparsers) -> None:
    p = subparsers.add_parser("export-onnx", help="export the prefill forward (torch path) as ONNX",
                              description="Export the prefill forward (tokens [1, T] -> logits [1, T, vocab], "
                                          "T dynamic; fp32; every op its torch baseline, MoE experts computed "
                                          f"densely) as {GRAPH} + {WEIGHTS}. Needs the onnx extra.")
    p.add_argument("--model", required=True, help="a built-in model name or a Hugging Face checkpoint directory")
    p.add_argument("--random-weights", action="store_true", help="random weights instead of a checkpoint")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="keep only the first N layers")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args) -> int:
    from tuneforge.models.configs import load_config
    from tuneforge.models.loading import load_model
    check_ready(args.out)
    cfg = load_config(args.model)
    if args.layers is not None:
        if not 1 <= args.layers <= cfg.num_hidden_layers:
            raise InputError(f"--layers must be 1..{cfg.num_hidden_layers}, got {args.layers}")
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    # fp32: what onnxruntime's CPU kernels cover
    model = load_model(args.model, random=args.random_weights, seed=args.seed, config=cfg, dtype=torch.float32)
    path = export(model, args.out)
    print(f"wrote {path} and {os.path.join(args.out, WEIGHTS)} ({cfg.num_hidden_layers} layers, fp32)")
    return 0
