"""End-to-end Qwen3 generation: tuneforge (tuned and torch-baseline dispatch, CUDA-graph prefill and
decode) vs Hugging Face transformers in eager mode (SDPA attention, DynamicCache) and, with
``--hf-compile``, transformers' static cache + torch.compile (generate's auto-compile of the decode
forward; its prefill stays eager), measured in the same run on the same model's shapes.

Per context (``--ctx``, prompt tokens) and batch size (``--bsz``): prefill time (tuneforge: the median
of up to ``--prefill-reps`` prefills after the timed generation; where it runs in CUDA graphs, also
``prefill_eager_ms``, the same prefill unpadded outside graphs), decode ms per step and tokens/s over
``--gen`` new tokens (greedy, no EOS), and the decode step against two floors over the bandwidth a
large device copy reaches here: the weights one step reads (``Qwen3.streamed_weight_bytes``: all but
the embedding table; of a MoE layer only the experts the step's tokens touch) and those weights plus
the KV cache the step reads (at the run's mean context). Tuned rows carry baseline / tuned ratios
(> 1: tuned is faster). A (context, batch) whose KV cache or activations do not fit in the free
memory is skipped with a row saying why. tuneforge runs first; its model is freed before transformers
builds its own.

    python benchmarks/bench_e2e.py                                   # Qwen3-32B, bs 1 32 256, ctx 128
    python benchmarks/bench_e2e.py --ctx 128 8192 --bsz 1 32 --no-hf # decode at 8k beside 128
    python benchmarks/bench_e2e.py --bsz 1 32 --hf-compile           # + transformers static cache + compile
    python benchmarks/bench_e2e.py --model Qwen3-30B-A3B --bsz 1 32  # MoE: floor of the touched experts
    python benchmarks/bench_e2e.py --quick                           # Qwen3-0.6B on a GPU; a tiny model on the CPU
    python benchmarks/bench_e2e.py --bsz 1 --unchained --no-hf       # + tuned with every launch unchained

Where launches chain (``kernels/_common.chained``, Hopper and later), the generator captures each decode
graph chained and unchained and keeps the faster: ``decode_graphs_chained`` counts those kept chained.
``--unchained`` adds tuned dispatch with every kernel launched the ordinary way (``TUNEFORGE_PDL=0``)
beside it: the rows ``tuneforge tuned`` carry ``decode_vs_unchained`` / ``prefill_vs_unchained`` (> 1:
the served launches are faster).

torch.compile compiles once per (batch, cache length): ~4 minutes each for Qwen3-32B on an H200.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tuneforge  # noqa: E402,F401  (before transformers imports triton: picks the interpreter on CPU)
import torch  # noqa: E402

from benchmarks.common import print_table, write_results  # noqa: E402
from tuneforge.engine.dispatch import open_ops  # noqa: E402
from tuneforge.kernels import _common as kernel_common  # noqa: E402
from tuneforge.engine.generate import (BATCH_BUCKETS, PREFILL_GRAPH_TOKENS, SLOT_ALIGN, Generator,  # noqa: E402
                                       hbm_bandwidth, time_generation)
from tuneforge.dsl.problem import bucket  # noqa: E402
from tuneforge.models.configs import ModelConfig, load_config  # noqa: E402
from tuneforge.models.loading import load_model  # noqa: E402

TINY = ModelConfig(name="tiny-qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                   max_position_embeddings=512)
HF_EAGER, HF_COMPILE = "transformers eager", "transformers static cache + torch.compile"
UNCHAINED = ", unchained"       # tuned dispatch with no programmatic dependent launch (--unchained)


def free_memory() -> None:
    """Give the last run's device memory back before the next (a collection takes ~1 s: GPU only)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def kv_token_bytes(cfg, itemsize: int) -> int:
    """KV-cache bytes of one token over all layers (TP 1)."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize


def activation_bytes(cfg, tokens: int, itemsize: int) -> int:
    """A generous bound of one forward's live activations at ``tokens`` tokens: the residual stream,
    q|k|v, gate|up and its product, twice over for temporaries."""
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    inter = cfg.moe_intermediate_size * cfg.num_experts_per_tok if cfg.is_moe else cfg.intermediate_size
    return 2 * tokens * (2 * cfg.hidden_size + qkv + 3 * inter) * itemsize


def too_big(need: int, device) -> str:
    """Why ``need`` bytes do not fit in the device's free memory (with a 5 % margin), or ''."""
    if device.type != "cuda":
        return ""
    free = torch.cuda.mem_get_info(device)[0]
    return f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free" if need > 0.95 * free else ""


def skipped(impl: str, bsz: int, ctx: int, gen: int, why: str) -> dict:
    print(f"  {impl} bsz {bsz} ctx {ctx}: skipped ({why})", flush=True)
    return dict(impl=impl, bsz=bsz, ctx=ctx, gen=gen, skipped=why)


def prefill_median_ms(gen: Generator, bsz: int, ctx: int, reps: int, first_s: float) -> tuple[float, int]:
    """(median ms, prefills timed) of prefills of ``bsz`` random prompts of ``ctx`` tokens on a warm
    generator: ``reps`` of them, fewer where one took ``first_s`` (about 2 s of prefills at most)."""
    n = max(1, min(reps, int(2.0 / max(first_s, 1e-9))))
    tokens = torch.randint(0, gen.model.cfg.vocab_size, (bsz, ctx), generator=torch.Generator().manual_seed(1))
    tokens, lengths = tokens.to(gen.device), torch.full((bsz,), ctx, device=gen.device)
    times = []
    for _ in range(n):
        _sync(gen.device)
        start = time.perf_counter()
        gen.prefill(tokens, lengths)
        _sync(gen.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, n


def bench_tuneforge(cfg, args, device, dtype) -> tuple[list[dict], dict]:
    """Rows per dispatch mode, context and batch size; and the weight bytes a step reads per batch size."""
    rows = []
    model = load_model(cfg.name, config=cfg, random=True, dtype=dtype, device=device)
    weights = {bsz: model.streamed_weight_bytes(bsz) for bsz in args.bsz}
    served = kernel_common.CHAINED      # TUNEFORGE_PDL=0 serves unchained: --unchained adds nothing then
    runs = [(f"tuneforge {mode}", mode, served) for mode in args.dispatch]
    runs += [("tuneforge tuned" + UNCHAINED, "tuned", False)] if args.unchained and served else []
    try:
        for impl, mode, chained in runs:
            kernel_common.CHAINED = chained       # read at each launch: the generator's graphs capture it
            ops = open_ops(mode, db=args.db, model=cfg.name, tp=1, allow_predicted=args.allow_predicted)
            for ctx in args.ctx:
                for bsz in args.bsz:
                    slots = -(-(ctx + args.gen) // SLOT_ALIGN) * SLOT_ALIGN
                    chunk = min(bsz * ctx, max(PREFILL_GRAPH_TOKENS, ctx))
                    why = too_big(bucket(bsz, BATCH_BUCKETS) * slots * kv_token_bytes(cfg, dtype.itemsize)
                                  + activation_bytes(cfg, chunk, dtype.itemsize), device)
                    if why:
                        rows.append(skipped(impl, bsz, ctx, args.gen, why))
                        continue
                    gen = None
                    try:
                        gen = Generator(model, ops, max_batch=bsz, max_len=ctx + args.gen,
                                        graphs=device.type == "cuda")
                        r = time_generation(gen, bsz, ctx, args.gen)
                        r["prefill_ms"], r["prefill_reps"] = prefill_median_ms(gen, bsz, ctx, args.prefill_reps,
                                                                               r["prefill_ms"] / 1e3)
                        if gen.pad_prefill and bsz * ctx <= PREFILL_GRAPH_TOKENS:
                            # the same prefill unpadded and eager (as before prefill graphs), same generator
                            gen.pad_prefill = False
                            r["prefill_eager_ms"] = prefill_median_ms(gen, bsz, ctx, args.prefill_reps,
                                                                      r["prefill_ms"] / 1e3)[0]
                            gen.pad_prefill = True
                        kept = list(gen.chained_decode.values())     # empty where nothing was measured
                        rows.append(dict(impl=impl, **r, graphs=gen.graphs, dispatch=ops.describe(),
                                         decode_graphs_chained=f"{sum(kept)} of {len(kept)}" if kept else None))
                        print(f"  {impl} bsz {bsz} ctx {ctx}: prefill {r['prefill_ms']:.2f} ms, decode "
                              f"{r['decode_ms_per_token']:.2f} ms/token", flush=True)
                    except torch.cuda.OutOfMemoryError as e:
                        rows.append(skipped(impl, bsz, ctx, args.gen, f"out of memory: {str(e).splitlines()[0]}"))
                    del gen
                    free_memory()
    finally:
        kernel_common.CHAINED = served
    del model
    free_memory()
    return rows, weights


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
    """Greedy prefill + ``gen - 1`` decode steps through a DynamicCache, eager; (prefill s, decode s)."""
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


@torch.inference_mode()
def hf_static_generate(model, ids: torch.Tensor, gen: int) -> tuple[float, float]:
    """``generate`` with ``cache_implementation="static"`` (transformers compiles its decode forward on a
    GPU), greedy, ``gen`` new tokens; (prefill s, decode s), read off a stopping criterion that notes
    when each step's tokens are ready (after a device sync; generate syncs every step anyway)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            _sync(input_ids.device)
            ready.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ready: list[float] = []
    _sync(ids.device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                   do_sample=False, cache_implementation="static", pad_token_id=0,
                   stopping_criteria=StoppingCriteriaList([Clock()]))
    return ready[0] - start, ready[-1] - ready[0]


def bench_hf(cfg, args, device, dtype) -> list[dict]:
    try:
        model = build_hf(cfg, device, dtype)
    except ImportError as e:
        print(f"transformers: not measured ({e})")
        return []
    runs = [(HF_EAGER, hf_generate, "transformers (SDPA, DynamicCache)")]
    if args.hf_compile:
        runs.append((HF_COMPILE, hf_static_generate, "transformers generate (SDPA, StaticCache)"))
    rows = []
    for impl, run, dispatch in runs:
        for ctx in args.ctx:
            for bsz in args.bsz:
                # the whole batch in one prefill (no chunks), its cache grown to ctx + gen tokens
                why = too_big(bsz * (ctx + args.gen) * kv_token_bytes(cfg, dtype.itemsize)
                              + activation_bytes(cfg, bsz * ctx, dtype.itemsize), device)
                if why:
                    rows.append(skipped(impl, bsz, ctx, args.gen, why))
                    continue
                ids = torch.randint(0, cfg.vocab_size, (bsz, ctx), generator=torch.Generator().manual_seed(0))
                ids = ids.to(device)
                try:
                    run(model, ids, args.gen if run is hf_static_generate else min(args.gen, 4))   # warm-up
                    prefill_s, decode_s = run(model, ids, args.gen)
                except torch.cuda.OutOfMemoryError as e:
                    rows.append(skipped(impl, bsz, ctx, args.gen, f"out of memory: {str(e).splitlines()[0]}"))
                    del ids
                    free_memory()
                    continue
                steps = args.gen - 1
                # generate compiles only where transformers' auto-compile applies (a GPU)
                compiled = run is hf_static_generate and getattr(model, "_compiled_call", None) is not None
                rows.append(dict(impl=impl, bsz=bsz, ctx=ctx, gen=args.gen, prefill_ms=prefill_s * 1e3,
                                 decode_ms_per_token=decode_s / steps * 1e3, tokens_per_s=bsz * steps / decode_s,
                                 e2e_tokens_per_s=bsz * args.gen / (prefill_s + decode_s), graphs=compiled,
                                 dispatch=dispatch + (" + torch.compile" if compiled else "")))
                print(f"  {impl} bsz {bsz} ctx {ctx}: prefill {prefill_s * 1e3:.2f} ms, decode "
                      f"{decode_s / steps * 1e3:.2f} ms/token", flush=True)
                del ids
                free_memory()
    del model
    free_memory()
    return rows


def compare(rows: list[dict], weights: dict, cfg, args, itemsize: int, bandwidth) -> dict:
    """Floors, % of them and the ratios, in place on ``rows``; the summary's part of them."""
    kv_tok = kv_token_bytes(cfg, itemsize)
    done = [r for r in rows if "skipped" not in r]
    by = {(r["impl"], r["ctx"], r["bsz"]): r for r in done}
    slower = []
    for r in done:
        key = (r["ctx"], r["bsz"])
        r["weight_bytes"] = weights[r["bsz"]]
        r["kv_bytes"] = round(r["bsz"] * (r["ctx"] + r["gen"] / 2) * kv_tok)   # the mean context a step reads
        if bandwidth:
            r["floor_ms_per_token"] = r["weight_bytes"] / bandwidth * 1e3
            r["floor_kv_ms_per_token"] = (r["weight_bytes"] + r["kv_bytes"]) / bandwidth * 1e3
            r["pct_floor"] = 100.0 * r["floor_ms_per_token"] / r["decode_ms_per_token"]
            r["pct_floor_kv"] = 100.0 * r["floor_kv_ms_per_token"] / r["decode_ms_per_token"]
        base = by.get(("tuneforge baseline", *key))
        unchained = by.get(("tuneforge tuned" + UNCHAINED, *key))
        if r["impl"] == "tuneforge tuned" and unchained:
            r["prefill_vs_unchained"] = unchained["prefill_ms"] / r["prefill_ms"]
            r["decode_vs_unchained"] = unchained["decode_ms_per_token"] / r["decode_ms_per_token"]
        if r["impl"] == "tuneforge tuned" and base:
            r["prefill_vs_baseline"] = base["prefill_ms"] / r["prefill_ms"]
            r["decode_vs_baseline"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
            if r["prefill_vs_baseline"] < 1.0:
                slower.append(dict(ctx=r["ctx"], bsz=r["bsz"], tuned_ms=r["prefill_ms"],
                                   baseline_ms=base["prefill_ms"]))
        for hf, name in ((HF_EAGER, "decode_speedup_vs_hf"), (HF_COMPILE, "decode_speedup_vs_hf_compile")):
            ref = by.get((hf, *key))
            if ref and r["impl"] != hf:
                r[name] = ref["decode_ms_per_token"] / r["decode_ms_per_token"]
    return dict(tuned_prefill_slower_than_baseline=slower)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen3-32B")
    p.add_argument("--bsz", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--ctx", type=int, nargs="+", default=[128], help="prompt tokens, each a run (e.g. 128 8192)")
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--prefill-reps", type=int, default=5, help="prefills whose median is the prefill time")
    p.add_argument("--dispatch", nargs="+", choices=("tuned", "baseline", "default"), default=["tuned", "baseline"])
    p.add_argument("--db", help="tuning database (default: $TUNEFORGE_DB or the default SQLite file)")
    p.add_argument("--allow-predicted", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--hf-compile", action="store_true",
                   help="also transformers' static cache + torch.compile (compiles per batch and context: slow)")
    p.add_argument("--unchained", action="store_true",
                   help="also tuned dispatch with every kernel launched unchained (no programmatic dependent launch)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: Qwen3-0.6B, bsz 1 and 8, ctx 64, gen 32 (CPU: a tiny model, ctx 8, gen 4)")
    p.add_argument("--tag", help="results file e2e-TAG-<device>-<date>.json (several runs a day)")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    for name in ("bsz", "ctx"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be >= 1, got {getattr(args, name)}")
    if args.gen < 2 or args.prefill_reps < 1:
        p.error(f"--gen must be >= 2 and --prefill-reps >= 1, got {args.gen}, {args.prefill_reps}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        args.model, args.bsz = ("Qwen3-0.6B", [1, 8]) if cuda else (TINY.name, [1, 2])
        args.ctx, args.gen = ([64], 32) if cuda else ([8], 4)
    cfg = TINY if args.model == TINY.name else load_config(args.model)
    if max(args.bsz) > BATCH_BUCKETS[-1] or max(args.ctx) + args.gen > cfg.max_positions:
        p.error(f"--bsz at most {BATCH_BUCKETS[-1]} and --ctx + --gen at most {cfg.max_positions} for {cfg.name}")
    bandwidth = hbm_bandwidth(device)                 # before any model takes the memory
    rows, weights = bench_tuneforge(cfg, args, device, dtype)
    if not args.no_hf:
        rows += bench_hf(cfg, args, device, dtype)
    summary = compare(rows, weights, cfg, args, dtype.itemsize, bandwidth)

    print(f"{cfg.name}, {str(dtype).replace('torch.', '')}, random weights, gen {args.gen}; "
          + ("weight-streaming floor " + ", ".join(f"{weights[b] / bandwidth * 1e3:.2f} ms/step at bs {b} "
                                                   f"({weights[b] / 1e9:.1f} GB)" for b in sorted(weights))
             + f" at {bandwidth / 1e12:.2f} TB/s measured copy bandwidth" if bandwidth else "no GPU: no floor"))
    print_table(rows, ["impl", "ctx", "bsz", "prefill_ms", "prefill_eager_ms", "decode_ms_per_token", "tokens_per_s",
                       "pct_floor", "pct_floor_kv", "prefill_vs_baseline", "decode_vs_baseline", "decode_vs_unchained",
                       "decode_speedup_vs_hf", "decode_speedup_vs_hf_compile", "skipped"])
    slower = summary["tuned_prefill_slower_than_baseline"]
    print("tuned prefill slower than baseline at " + ", ".join(
        f"ctx {s['ctx']} bs {s['bsz']} ({s['baseline_ms'] / s['tuned_ms']:.3f}x)" for s in slower)
          if slower else "tuned prefill: never slower than baseline in this run")
    for r in rows:
        if r["impl"].startswith("tuneforge") and "dispatch" in r:
            print(f"{r['impl']} ctx {r['ctx']} bsz {r['bsz']}: {r['dispatch']}")
    summary.update(model=cfg.name, moe=cfg.is_moe, dtype=str(dtype), ctx=args.ctx, gen=args.gen,
                   hbm_bytes_per_s=bandwidth, weight_bytes=weights, quick=args.quick,
                   floor_ms_per_token={b: w / bandwidth * 1e3 for b, w in weights.items()} if bandwidth else {})
    write_results("e2e" + (f"-{args.tag}" if args.tag else ""), rows, summary, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
