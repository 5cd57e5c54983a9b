"""`tuneforge generate` and `tuneforge bench e2e`: run Qwen3 with tuned dispatch.

Both run TP ranks as processes (tuneforge.world.spawn) when ``--tp`` > 1; rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tuneforge.engine.bench_router import add_parser as add_bench_router
from tuneforge.engine.ep import LAYOUTS as MOE_LAYOUTS
from tuneforge.engine.lookup import MODES
from tuneforge.errors import InputError


def _subcommands(subparsers, name: str, help: str):
    """The sub-subparsers of ``tuneforge <name>``, shared with other areas that add actions to it."""
    parser = subparsers.choices.get(name) or subparsers.add_parser(name, help=help)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", metavar="WHAT", required=True)


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a built-in model name (e.g. Qwen3-32B) or a Hugging Face "
                                                  "checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one process each)")
    p.add_argument("--db", metavar="URL", help="tuning database URL or SQLite path (default: $TUNEFORGE_DB "
                                               "or ~/.local/share/tuneforge/tuneforge.db)")
    p.add_argument("--dispatch", choices=MODES, default="tuned",
                   help="tuned: winners from the database; without one the torch baseline (the row ops, decode "
                        "attention and MoE kernels: their default configs) (default); baseline: torch everywhere; "
                        "default: every Triton kernel with its default config, the GEMM fusions off")
    p.add_argument("--allow-predicted", action="store_true",
                   help="let cost-model predictions serve (on a CPU-only machine the table is the prediction "
                        "for --target)")
    p.add_argument("--target", default=None, help="the predicted device whose winners serve without a GPU "
                                                  "(default H100)")
    p.add_argument("--random-weights", action="store_true", help="random weights instead of a checkpoint")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="weights and activations (default: the dtype this model's winners were tuned in, "
                        "else bf16)")
    p.add_argument("--no-graphs", action="store_true", help="prefill and decode eagerly (no CUDA graphs)")
    p.add_argument("--kv-shard", choices=("heads", "sequence", "auto"), default="heads",
                   help="how the KV cache splits over TP ranks: heads (each rank its KV heads of every token; "
                        "default), sequence (each rank every KV head of 1/tp of the tokens, blocks of 16 "
                        "positions round-robin; decode combines the ranks' partial attention) or auto (the "
                        "layout the tuned records price lower for the run's batch and length; heads without them)")
    p.add_argument("--moe-parallel", choices=MOE_LAYOUTS, default="auto",
                   help="how MoE layers split over TP ranks, a load-time choice: tp (every expert's channels "
                        "split, outputs all-reduced), ep (experts placed whole, rank r owns experts "
                        "[r E/tp, (r+1) E/tp), tokens sent to them by all-to-all) or auto (default: the stored "
                        "moe_block winner's strategy at the batch's decode bucket, tp without one)")
    p.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text (or token ids) with Qwen3 and tuned kernels",
                              description="Generate from one or more prompts (a batch). Prompts are text when "
                                          "the model directory has a tokenizer, else token ids ('1 2 3').")
    _engine_options(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_generate)

    bench = _subcommands(subparsers, "bench", "benchmarks")
    e = bench.add_parser("e2e", help="end-to-end prefill + decode timing with %% of the weight-streaming floor")
    _engine_options(e)
    e.add_argument("--bsz", type=int, default=1, help="prompts in the batch")
    e.add_argument("--ctx", type=int, default=128, help="prompt tokens")
    e.add_argument("--gen", type=int, default=128, help="new tokens")
    e.set_defaults(func=cmd_bench_e2e)
    add_bench_router(bench)


# --- shared set-up -----------------------------------------------------------------------------------

def _settings(args) -> dict:
    """What every rank needs, picklable. The dtype defaults to the one the winners of this model were
    tuned in (so tuned dispatch finds them, on the CPU too), else the tuner's bf16."""
    import torch
    from tuneforge.engine.ep import layout as moe_layout
    from tuneforge.engine.lookup import tuned_dtype
    from tuneforge.models.configs import load_config
    cuda = torch.cuda.is_available()
    if args.tp < 1:
        raise InputError(f"--tp must be >= 1, got {args.tp}")
    if args.kv_shard == "sequence" and args.tp < 2:
        raise InputError("--kv-shard sequence shards the KV cache over TP ranks: it needs --tp 2 or more")
    moe_layout(args.moe_parallel, load_config(args.model), args.tp)        # an impossible ep, in one line
    dtype = args.dtype
    if dtype is None:
        tuned = args.dispatch == "tuned" and tuned_dtype(args.db, load_config(args.model).name, args.tp, args.target)
        dtype = tuned or "bf16"
    return dict(model=args.model, tp=args.tp, db=args.db, dispatch=args.dispatch, dtype=dtype,
                allow_predicted=args.allow_predicted, target=args.target, random=args.random_weights,
                graphs=cuda and not args.no_graphs, seed=args.seed, device="cuda" if cuda else "cpu",
                kv_shard=args.kv_shard, moe_parallel=args.moe_parallel)


def build(settings: dict, world=None, batch: int = 1):
    """(model, ops) for this rank; ``batch``: the decode rows, whose bucket ``--moe-parallel auto`` reads."""
    import torch
    from tuneforge.dsl.problem import DTYPES
    from tuneforge.engine.dispatch import open_ops
    from tuneforge.engine.ep import layout as moe_layout
    from tuneforge.models.configs import load_config
    from tuneforge.models.loading import load_model
    from tuneforge.models.qwen3 import Shard
    cfg, dtype = load_config(settings["model"]), DTYPES[settings["dtype"]]
    tp = world.size if world is not None else 1
    ops = open_ops(settings["dispatch"], db=settings["db"], model=cfg.name, tp=tp,
                   allow_predicted=settings["allow_predicted"], target=settings["target"],
                   quiet=world is not None and world.rank != 0)
    if ops.table is not None and len(ops.table) and (world is None or world.rank == 0):   # an empty table has warned
        print(ops.table.summary, file=sys.stderr)
    moe = moe_layout(settings["moe_parallel"], cfg, tp, ops.choice if ops.mode == "tuned" else None, batch, dtype)
    if settings["moe_parallel"] == "auto" and moe == "ep" and world.rank == 0:
        print("MoE layout: ep (the stored moe_block winner places the experts)", file=sys.stderr)
    shard = Shard.of(world, moe) if world is not None else Shard()
    device = world.device if world is not None else torch.device(settings["device"])
    model = load_model(settings["model"], shard=shard, dtype=dtype, device=device, random=settings["random"],
                       seed=settings["seed"], config=cfg)
    return model, ops


def _run(fn, settings: dict, *args):
    """``fn(world_or_None, settings, *args)`` on one rank, or on ``tp`` spawned ranks; rank 0's result."""
    if settings["tp"] == 1:
        return fn(None, settings, *args)
    from tuneforge.world import spawn
    return spawn(fn, settings["tp"], settings, *args, device=settings["device"], timeout=3600.0)[0]


# --- generate ----------------------------------------------------------------------------------------

def _tokenizer(model: str):
    """The checkpoint's tokenizer, or None when the directory has none (or the name is not a directory)."""
    if not os.path.isdir(model) or not any(os.path.isfile(os.path.join(model, f))
                                           for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model)


def _token_ids(prompt: str) -> list[int]:
    try:
        return [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"the model has no tokenizer, so a prompt must be token ids like '1 2 3'; got "
                         f"{prompt!r}") from None


def eos_ids(model_dir: str, cfg, tokenizer) -> list[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer (Qwen3 stops on several)."""
    found = []
    sources = [cfg.eos_token_id]
    gen_cfg = os.path.join(model_dir, "generation_config.json") if os.path.isdir(model_dir) else ""
    if gen_cfg and os.path.isfile(gen_cfg):
        with open(gen_cfg) as f:
            sources.append(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for s in sources:
        for t in (s if isinstance(s, (list, tuple)) else [s]):
            if isinstance(t, int) and t not in found:
                found.append(t)
    return found


def _generate_rank(world, settings: dict, prompts: list[list[int]], sampling: dict, eos: list[int]) -> dict:
    from tuneforge.engine.generate import Generator
    model, ops = build(settings, world, len(prompts))
    longest = max(len(p) for p in prompts)
    max_len = min(longest + sampling["max_new_tokens"], model.cfg.max_positions)
    gen = Generator(model, ops, max_batch=len(prompts), max_len=max_len, graphs=settings["graphs"],
                    kv_shard=settings["kv_shard"])
    out = gen.generate(prompts, sampling["max_new_tokens"], temperature=sampling["temperature"],
                       top_p=sampling["top_p"], eos_ids=eos, seed=settings["seed"])
    return dict(tokens=out.tokens, finish=out.finish, prefill_s=out.prefill_s, decode_s=out.decode_s,
                decode_steps=out.decode_steps, dispatch=ops.describe())


def cmd_generate(args) -> int:
    from tuneforge.models.configs import load_config
    settings = _settings(args)
    cfg = load_config(args.model)
    if not args.random_weights and not os.path.isdir(args.model):
        raise InputError(f"{args.model!r} names a model but no checkpoint: pass its Hugging Face directory, "
                         f"or --random-weights")
    tok = _tokenizer(args.model)
    prompts = [tok.encode(p) if tok is not None else _token_ids(p) for p in args.prompt]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    r = _run(_generate_rank, settings, prompts, sampling, eos_ids(args.model, cfg, tok))
    texts = [tok.decode(t) if tok is not None else " ".join(map(str, t)) for t in r["tokens"]]
    steps = r["decode_steps"]
    per_token = r["decode_s"] / steps * 1e3 if steps else float("nan")
    if args.json:
        print(json.dumps(dict(prompts=args.prompt, outputs=texts, tokens=r["tokens"], finish=r["finish"],
                              prefill_ms=r["prefill_s"] * 1e3, decode_ms_per_token=per_token,
                              dispatch=r["dispatch"])))
        return 0
    for prompt, text, why in zip(args.prompt, texts, r["finish"]):
        print(f"{prompt} -> {text}  [{why}]")
    print(f"prefill {r['prefill_s'] * 1e3:.1f} ms, decode {per_token:.2f} ms/token over {steps} steps; "
          f"dispatch: {r['dispatch']}", file=sys.stderr)
    return 0


# --- bench e2e ---------------------------------------------------------------------------------------

def _bench_rank(world, settings: dict, bsz: int, ctx: int, gen: int) -> dict:
    from tuneforge.engine.generate import Generator, hbm_bandwidth, time_generation
    bandwidth = hbm_bandwidth(world.device if world is not None else settings["device"])
    model, ops = build(settings, world, bsz)
    generator = Generator(model, ops, max_batch=bsz, max_len=ctx + gen, graphs=settings["graphs"],
                          kv_shard=settings["kv_shard"])
    result = time_generation(generator, bsz, ctx, gen, seed=settings["seed"])
    result.update(weight_bytes=model.streamed_weight_bytes(bsz), hbm_bytes_per_s=bandwidth,
                  dispatch=ops.describe(), graphs=generator.graphs, kv_shard=settings["kv_shard"])
    if bandwidth:
        floor_ms = result["weight_bytes"] / bandwidth * 1e3
        result.update(floor_ms_per_token=floor_ms, pct_floor=100.0 * floor_ms / result["decode_ms_per_token"])
    return result


def cmd_bench_e2e(args) -> int:
    settings = _settings(args)
    for name in ("bsz", "ctx", "gen"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    r = _run(_bench_rank, settings, args.bsz, args.ctx, args.gen)
    kv = ", KV sharded by sequence" if args.kv_shard == "sequence" else ""
    print(format_e2e(f"tuneforge ({settings['dispatch']} dispatch, TP={args.tp}{kv})", r))
    return 0


def format_e2e(label: str, r: dict) -> str:
    floor = (f"{r['floor_ms_per_token']:.2f} ms/token floor ({r['weight_bytes'] / 1e9:.1f} GB of weights at "
             f"{r['hbm_bytes_per_s'] / 1e12:.2f} TB/s measured), {r['pct_floor']:.0f}% of it"
             if r.get("floor_ms_per_token") else "floor: n/a (no GPU to measure HBM bandwidth)")
    return (f"{label}: bsz {r['bsz']} ctx {r['ctx']} gen {r['gen']}: prefill {r['prefill_ms']:.1f} ms, "
            f"decode {r['decode_ms_per_token']:.2f} ms/token, {r['tokens_per_s']:.1f} tokens/s; {floor}; "
            f"dispatch: {r['dispatch']}")
