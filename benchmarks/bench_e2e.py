"""End-to-end Qwen3 generation: tuneforge (tuned and torch-baseline dispatch, CUDA-graph decode) vs
Hugging Face transformers in eager mode (no torch.compile, SDPA attention, DynamicCache), measured in
the same run on the same random weights' shapes.

Per batch size: prefill time for ``--ctx`` prompt tokens, decode ms per step and tokens/s over
``--gen`` new tokens (greedy, no EOS), and the decode step against the weight-streaming floor: the
bytes of weights one step must read (all but the embedding table) over the HBM bandwidth a large
device copy reaches here. tuneforge runs first; its model is freed before transformers builds its own
(each 65 GB for Qwen3-32B in bf16; an H100 has 80 GB).

    python benchmarks/bench_e2e.py                      # Qwen3-32B, bsz 1 and 32, ctx 128, gen 128
    python benchmarks/bench_e2e.py --quick              # Qwen3-0.6B on a GPU; a tiny model on the CPU
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tuneforge  # noqa: E402,F401  (before transformers imports triton: picks the interpreter on CPU)
import torch  # noqa: E402

from benchmarks.common import print_table, write_results  # noqa: E402
from tuneforge.engine.dispatch import open_ops  # noqa: E402
from tuneforge.engine.generate import Generator, hbm_bandwidth, time_generation  # noqa: E402
from tuneforge.models.configs import ModelConfig, load_config  # noqa: E402
from tuneforge.models.loading import load_model  # noqa: E402

TINY = ModelConfig(name="tiny-qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                   max_position_embeddings=512)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_tuneforge(cfg, args, device, dtype) -> list[dict]:
    rows = []
    model = load_model(cfg.name, config=cfg, random=True, dtype=dtype, device=device)
    for mode in args.dispatch:
        ops = open_ops(mode, db=args.db, model=cfg.name, tp=1, allow_predicted=args.allow_predicted)
        for bsz in args.bsz:
            gen = Generator(model, ops, max_batch=bsz, max_len=args.ctx + args.gen, graphs=device.type == "cuda")
            r = time_generation(gen, bsz, args.ctx, args.gen)
            free_memory()
            rows.append(dict(impl=f"tuneforge {mode}", **r, graphs=gen.graphs, dispatch=ops.describe(),
                             weight_bytes=model.streamed_weight_bytes(bsz)))
    del model
    free_memory()
    return rows


def hf_config(cfg):
    """A transformers Qwen3Config (Qwen3MoeConfig for a MoE model) with ``cfg``'s fields (works with
    transformers 4.51+ and 5)."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    Config = Qwen3MoeConfig if cfg.is_moe else Qwen3Config
    known = set(Config().to_dict())
    fields = {k: v for k, v in cfg.to_hf_dict().items() if k in known and v not in ((), [], None)}
    fields.pop("layer_types", None)
    if "rope_parameters" in known:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return Config(**fields)


def build_hf(cfg, device, dtype):
    """Qwen3ForCausalLM (Qwen3MoeForCausalLM) built directly on ``device`` in ``dtype`` with transformers'
    own random init."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return (Qwen3MoeForCausalLM if cfg.is_moe else Qwen3ForCausalLM)(hf_config(cfg)).eval()
    finally:
        torch.set_default_dtype(previous)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate(model, ids: torch.Tensor, gen: int) -> tuple[float, float]:
    """Greedy prefill + ``gen - 1`` decode steps through the KV cache; (prefill s, decode s)."""
    _sync(ids.device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(ids.device)
    prefill_s = time.perf_counter() - start
    past = out.past_key_values
    start = time.perf_counter()
    for _ in range(gen - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(ids.device)
    return prefill_s, time.perf_counter() - start


def bench_hf(cfg, args, device, dtype) -> list[dict]:
    try:
        model = build_hf(cfg, device, dtype)
    except ImportError as e:
        print(f"transformers: not measured ({e})")
        return []
    rows = []
    for bsz in args.bsz:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (bsz, args.ctx), generator=g).to(device)
        hf_generate(model, ids, min(args.gen, 4))       # warm-up: cuBLAS handles, allocator
        prefill_s, decode_s = hf_generate(model, ids, args.gen)
        steps = args.gen - 1
        rows.append(dict(impl="transformers eager", bsz=bsz, ctx=args.ctx, gen=args.gen, prefill_ms=prefill_s * 1e3,
                         decode_ms_per_token=decode_s / steps * 1e3, tokens_per_s=bsz * steps / decode_s,
                         e2e_tokens_per_s=bsz * args.gen / (prefill_s + decode_s), graphs=False,
                         dispatch="transformers (SDPA)"))
        del ids
        free_memory()
    del model
    free_memory()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen3-32B")
    p.add_argument("--bsz", type=int, nargs="+", default=[1, 32])
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--dispatch", nargs="+", choices=("tuned", "baseline", "default"), default=["tuned", "baseline"])
    p.add_argument("--db", help="tuning database (default: $TUNEFORGE_DB or the default SQLite file)")
    p.add_argument("--allow-predicted", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: Qwen3-0.6B, bsz 1 and 8, ctx 64, gen 32 (CPU: a tiny model, ctx 8, gen 4)")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        args.model, args.bsz = ("Qwen3-0.6B", [1, 8]) if cuda else (TINY.name, [1, 2])
        args.ctx, args.gen = (64, 32) if cuda else (8, 4)
    cfg = TINY if args.model == TINY.name else load_config(args.model)
    bandwidth = hbm_bandwidth(device)                 # before any model takes the memory
    rows = bench_tuneforge(cfg, args, device, dtype)
    if not args.no_hf:
        rows += bench_hf(cfg, args, device, dtype)

    # the weights a step of bsz tokens reads (a MoE model's experts hit grow with the batch)
    weight_bytes = {r["bsz"]: r["weight_bytes"] for r in rows if r["impl"].startswith("tuneforge")}
    floor_ms = {b: w / bandwidth * 1e3 for b, w in weight_bytes.items()} if bandwidth else {}
    hf = {r["bsz"]: r["decode_ms_per_token"] for r in rows if r["impl"] == "transformers eager"}
    for r in rows:
        r["weight_bytes"] = weight_bytes[r["bsz"]]
        if floor_ms:
            r.update(floor_ms_per_token=floor_ms[r["bsz"]], pct_floor=100.0 * floor_ms[r["bsz"]] / r["decode_ms_per_token"])
        if r["bsz"] in hf:
            r["decode_speedup_vs_hf"] = hf[r["bsz"]] / r["decode_ms_per_token"]
    print(f"{cfg.name}, {str(dtype).replace('torch.', '')}, random weights, ctx {args.ctx}, gen {args.gen}; "
          + ("weight-streaming floor " + ", ".join(f"{floor_ms[b]:.2f} ms/step at bs {b} ({weight_bytes[b] / 1e9:.1f} GB)"
                                                   for b in sorted(floor_ms)) + f" at {bandwidth / 1e12:.2f} TB/s "
             "measured copy bandwidth" if floor_ms else "no GPU: no floor"))
    print_table(rows, ["impl", "bsz", "prefill_ms", "decode_ms_per_token", "tokens_per_s", "pct_floor",
                       "decode_speedup_vs_hf"])
    for r in rows:
        if r["impl"].startswith("tuneforge"):
            print(f"{r['impl']} bsz {r['bsz']}: {r['dispatch']}")
    write_results("e2e", rows, dict(model=cfg.name, dtype=str(dtype), ctx=args.ctx, gen=args.gen,
                                    hbm_bytes_per_s=bandwidth, floor_ms_per_token=floor_ms,
                                    weight_bytes=weight_bytes, quick=args.quick), out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
