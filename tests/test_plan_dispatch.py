"""Zero misses between the tuning plan and the engine's dispatch, for every built-in model config.

Each built-in config gets a tiny random variant (its structure: attention/KV head ratio, tied embeddings,
RoPE scaling, experts, layer kinds; tiny dims). Its plan at TP 1 and 2, with the token buckets the
engine serves, fills a real DispatchTable (the torch baseline as every problem's winner, so the forward
is fast); a prefill of 3 prompts and two decode steps then run through the engine in tuned mode, the
table recording every lookup. Every looked-up problem must be one the plan produced, up to the token
bucket (lookup serves a token count from its family's tuned buckets), and every lookup must hit. MoE
configs run their grouped expert GEMMs at the launcher's default (so the pack is looked up too).
Linear-attention configs: the engine refuses them today, so their plan is checked to build and the model
to refuse; their forward joins this test when the engine runs them. At full size (meta device, TP 1-8)
the shapes the plan derives are checked against every rank's parameters.
"""
import dataclasses

import pytest
import torch

from tuneforge.db.environment import Environment
from tuneforge.db.store import Winner
from tuneforge.dsl import get
from tuneforge.dsl.problem import DEFAULT_BUCKETS
from tuneforge.engine.dispatch import Ops
from tuneforge.engine.lookup import ENGINE_OPS, DispatchTable, family
from tuneforge.errors import InputError
from tuneforge.models.configs import CONFIG_DIR, load_config
from tuneforge.tune.plan import DECODE_BUCKETS, PREFILL_BUCKETS, plan
from tuneforge.world import spawn

BUILT_IN = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]      # prefill of 3 x 5 tokens, decode at batch bucket 4
ENV = Environment("interpreter", 4, 0.0, 1, "single-gpu", torch.__version__, "3", "none", False)


def tiny(name: str):
    """``name``'s config with tiny dims and its structure kept."""
    cfg = load_config(name)
    kv = 2
    heads = kv * (cfg.num_attention_heads // cfg.num_key_value_heads)
    layers = max(2, cfg.full_attention_interval or 0) if any(
        cfg.layer_type(i) != "full_attention" for i in range(cfg.num_hidden_layers)) else 2
    dims = dict(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
                intermediate_size=128, num_hidden_layers=layers, vocab_size=256, max_position_embeddings=512)
    if cfg.is_moe:
        dims.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if cfg.has_shared_expert:
            dims.update(shared_expert_intermediate_size=32)
    if cfg.linear_num_value_heads:
        dims.update(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16)
    return dataclasses.replace(cfg, **dims)


def runs(cfg) -> bool:
    """Whether the engine builds ``cfg`` (it refuses linear attention for now)."""
    from tuneforge.models.qwen3 import Qwen3
    try:
        Qwen3(cfg, dtype=torch.float32, device="meta")
    except InputError:
        return False
    return True


def table_of(the_plan, tp: int, lookups: list) -> DispatchTable:
    """Every planned problem with the torch baseline as its winner (the grouped expert GEMM: its launcher's
    default, so the MoE block packs); lookups appended to ``lookups``."""
    env = dataclasses.replace(ENV, world_size=tp)
    hashes = {op: get(op).source_hash for op in {i.problem.op for i in the_plan.tunable}}   # hashing parses
    winners = {i.key: Winner(i.problem, env, {} if i.problem.op == "moe_gemm" else {"baseline": True}, 1e-5,
                             1e-5, 1.0, 50.0, "measured", hashes[i.problem.op], "test", 1)
               for i in the_plan.tunable}
    return DispatchTable(winners, {}, where="test", model=the_plan.model, tp=tp, buckets=DEFAULT_BUCKETS,
                         on_lookup=lambda problem, config: lookups.append(problem))


def forward_lookups(world, names: list[str]) -> dict:
    """On this rank: each model's plan, a prefill and decode steps through it; name -> (plan, lookups,
    the ops that ran the baseline for want of a record)."""
    from tuneforge.engine.generate import Generator
    from tuneforge.models.loading import random_weights
    from tuneforge.models.qwen3 import Qwen3, Shard
    tp = 1 if world is None else world.size
    shard = Shard() if world is None else Shard.of(world)
    out = {}
    for name in names:
        cfg = tiny(name)
        the_plan = plan(cfg, tp=tp, dtype="fp32")
        lookups: list = []
        ops = Ops("tuned", table_of(the_plan, tp, lookups))
        model = Qwen3(cfg, shard, dtype=torch.float32)
        random_weights(model)
        gen = Generator(model, ops, max_batch=len(PROMPTS), max_len=8, graphs=False)
        gen.generate(PROMPTS, 3)
        out[name] = (the_plan, lookups, ops.table.fallbacks)
    return out


def check(results: dict, tp: int) -> None:
    for name, (the_plan, lookups, fallbacks) in results.items():
        planned = {family(i.problem) for i in the_plan}
        missing = sorted({p.key for p in lookups if family(p) not in planned})
        assert missing == [], f"{name} TP{tp}: dispatch looked up problems the plan does not have: {missing}"
        assert fallbacks == [], f"{name} TP{tp}: {fallbacks} ran the baseline for want of a record"
        # every op of the plan the engine dispatches (dense models: all but the MoE ops) with the KV cache
        # split by heads (the sequence-sharded layout's lookups: tests/test_engine_kv_shard.py)
        expected = {i.problem.op for i in the_plan} & set(ENGINE_OPS) - {"decode_attention_sp", "allgather"}
        assert {p.op for p in lookups} == expected, name
        qk_norm = {"rope_qk_norm"} if load_config(name).has_qk_norm else set()   # Qwen2-MoE: torch RoPE, no lookup
        assert expected >= {"gemm", "rmsnorm", "decode_attention"} | qk_norm | ({"tp_attn"} if tp > 1 else set())
        if the_plan.find("moe_gemm"):
            assert expected >= {"moe_router", "moe_pack", "moe_gemm"}, name
        if load_config(name).has_shared_expert:
            assert "shared_expert_gate" in expected, name
        assert {p.shape["m"] for p in lookups if p.op == "rmsnorm"} == {15, 4}    # prefill, decode bucket


def test_engine_serves_the_plan_buckets():
    assert sorted(set(DECODE_BUCKETS + PREFILL_BUCKETS)) == sorted(DEFAULT_BUCKETS)


def test_engine_refuses_what_it_cannot_run_and_the_plan_still_covers_it():
    refused = [n for n in BUILT_IN if not runs(tiny(n))]
    assert refused == ["Qwen3-Next-80B-A3B"]
    for name in refused:
        for tp in (1, 2):
            assert plan(tiny(name), tp=tp).tunable


@pytest.mark.parametrize("tp", [1, 2])
def test_every_dispatch_lookup_is_planned(tp):
    served = [n for n in BUILT_IN if runs(tiny(n))]
    assert len(served) >= 9 and {"Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen1.5-MoE-A2.7B"} <= set(served), served
    if tp == 1:
        check(forward_lookups(None, served), tp)
    else:
        for results in spawn(forward_lookups, tp, served, timeout=300.0):
            check(results, tp)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rank_dims_are_the_models_shards(tp):
    """At full size (parameters on the meta device), the shapes the plan derives (problems.rank_dims)
    are the ones every rank's layers hold, for each built-in config the engine builds."""
    from tuneforge.models.problems import rank_dims
    from tuneforge.models.qwen3 import Qwen3, Shard, SparseMoE
    for name in BUILT_IN:
        cfg = load_config(name)
        if not runs(cfg):
            continue
        d = rank_dims(cfg, tp)
        for rank in range(tp):
            model = Qwen3(cfg, Shard(rank, tp), device="meta")
            layer = model.layers[0]
            assert (layer.attn.heads, layer.attn.kv_heads, layer.attn.head_dim) == (d.heads, d.kv_heads, d.head_dim)
            assert tuple(layer.attn.qkv.shape) == (d.qkv, d.hidden), name
            assert tuple(layer.attn.o.shape) == (d.hidden, d.o_in), name
            if cfg.qkv_bias:
                assert tuple(layer.attn.qkv_bias.shape) == (d.qkv,), name
            if isinstance(layer.mlp, SparseMoE):
                e = cfg.num_experts
                assert tuple(layer.mlp.router.shape) == (e, d.hidden), name
                assert tuple(layer.mlp.gate_up.shape) == (e, 2 * d.moe_inter, d.hidden), name
                assert tuple(layer.mlp.down.shape) == (e, d.hidden, d.moe_inter), name
                if cfg.has_shared_expert:
                    assert tuple(layer.mlp.shared_gate_up.shape) == (2 * d.shared_inter, d.hidden), name
                    assert tuple(layer.mlp.shared_down.shape) == (d.hidden, d.shared_inter), name
            else:
                assert tuple(layer.mlp.gate_up.shape) == (2 * d.inter, d.hidden), name
                assert tuple(layer.mlp.down.shape) == (d.hidden, d.inter), name
            assert tuple(model.head_weight.shape) == (d.vocab, d.hidden), name
