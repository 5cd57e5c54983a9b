"""The tuning plan (exact per-rank shapes for Qwen3-32B at TP 1 and 8, MoE and shared-expert models,
dedupe, baseline-only ops) and the model configs it is built from."""
import json

import pytest

from tuneforge.errors import InputError, UnknownModel
from tuneforge.models.configs import known_models, load_config
from tuneforge.dsl.problem import DECODE_CONTEXTS
from tuneforge.tune.plan import DECODE_BUCKETS, GATHER_SEQ_KV_ROLE, PREFILL_BUCKETS, ROPE_SEQ_KV_ROLE, plan

ALL_M = DECODE_BUCKETS + PREFILL_BUCKETS


def _keys(p):
    return {i.key: i for i in p.items}


def _expect(p, op, world=1, **dims):
    keys = _keys(p)
    key = f"{op}|{','.join(f'{k}={v}' for k, v in dims.items())}|bf16|w{world}"
    assert key in keys, f"{key} not planned"
    return keys[key]


def test_qwen3_32b_tp1_plan_has_every_shape_exactly_once():
    p = plan("Qwen3-32B", 1)
    for m in ALL_M:
        assert _expect(p, "gemm", m=m, n=(64 + 2 * 8) * 128, k=5120).roles == ["layer.attn.qkv_proj"]
        assert _expect(p, "gemm", m=m, n=5120, k=64 * 128).roles == ["layer.attn.o_proj"]
        assert _expect(p, "gemm", m=m, n=2 * 25600, k=5120).roles == ["layer.mlp.gate_up_proj"]
        assert _expect(p, "gemm", m=m, n=5120, k=25600).roles == ["layer.mlp.down_proj"]
        assert _expect(p, "rmsnorm", m=m, n=5120).roles == ["layer.input_layernorm",
                                                           "layer.post_attention_layernorm", "final_norm"]
        _expect(p, "silu_mul", m=m, n=25600)
        # the KV cache's k and v stored in the same launch, as the engine's layers run it
        assert _expect(p, "rope_qk_norm", m=m, heads=64, kv_heads=8, head_dim=128, cache=1).roles == [
            "layer.attn.rope_qk_norm"]
        assert len(p.find("rope_qk_norm", m=m)) == 1
        # the fusions, beside the ops they replace
        assert _expect(p, "gemm_fused", m=m, n=10240, k=5120, norm=1, epi=0).roles == [
            "layer.attn.qkv_proj+input_layernorm"]
        _expect(p, "gemm_fused", m=m, n=5120, k=8192, norm=0, epi=1)
        _expect(p, "gemm_fused", m=m, n=51200, k=5120, norm=0, epi=2)
        _expect(p, "gemm_fused", m=m, n=51200, k=5120, norm=1, epi=2)
        _expect(p, "gemm_fused", m=m, n=5120, k=25600, norm=0, epi=1)
    for m in DECODE_BUCKETS:
        _expect(p, "gemm", m=m, n=151936, k=5120)
        for ctx in DECODE_CONTEXTS:
            _expect(p, "decode_attention", m=m, heads=64, kv_heads=8, head_dim=128, ctx=ctx)
    assert len(p) == 12 * len(ALL_M) + (1 + len(DECODE_CONTEXTS)) * len(DECODE_BUCKETS)
    assert not {i.problem.op for i in p} & {"allreduce", "tp_attn", "tp_mlp", "moe_gemm"}
    assert len({i.key for i in p}) == len(p)
    assert len(p.pairs()) == sum(len(i.roles) for i in p)


def test_qwen3_32b_tp8_plan_shards_heads_mlp_and_vocab_and_adds_the_tp_choices():
    p = plan("Qwen3-32B", 8)
    for m in ALL_M:
        _expect(p, "gemm", m=m, n=(8 + 2 * 1) * 128, k=5120)           # 8 q heads, 1 KV head per rank
        _expect(p, "gemm", m=m, n=5120, k=1024)
        _expect(p, "gemm", m=m, n=6400, k=5120)
        _expect(p, "gemm", m=m, n=5120, k=3200)
        _expect(p, "silu_mul", m=m, n=3200)
        _expect(p, "rope_qk_norm", m=m, heads=8, kv_heads=1, head_dim=128, cache=1)      # the cache split by heads
        assert _expect(p, "rope_qk_norm", m=m, heads=8, kv_heads=1, head_dim=128).roles == [
            ROPE_SEQ_KV_ROLE]                                                          # by sequence: written apart
        assert _expect(p, "allreduce", 8, m=m, n=5120).roles == ["layer.attn.allreduce", "layer.mlp.allreduce"]
        _expect(p, "tp_attn", 8, m=m, hidden=5120, qkv=1280, o_in=1024)
        _expect(p, "tp_mlp", 8, m=m, hidden=5120, inter=3200)
        _expect(p, "gemm_fused", m=m, n=6400, k=5120, norm=0, epi=2)   # the SiLU-mul only: the rest meet all-reduces
    for m in DECODE_BUCKETS:
        _expect(p, "gemm", m=m, n=151936 // 8, k=5120)
        for ctx in DECODE_CONTEXTS:
            _expect(p, "decode_attention", m=m, heads=8, kv_heads=1, head_dim=128, ctx=ctx)
            _expect(p, "decode_attention_sp", 8, m=m, heads=64, kv_heads=8, head_dim=128, ctx=ctx)  # by sequence
        assert _expect(p, "allgather", 8, m=8 * m, n=1280).roles == [GATHER_SEQ_KV_ROLE]   # its q|k|v gathered
    for m in PREFILL_BUCKETS:
        _expect(p, "allgather", 8, m=8 * m, n=256)                                     # k|v in a prefill
    assert len(p) == (12 * len(ALL_M) + (1 + 2 * len(DECODE_CONTEXTS)) * len(DECODE_BUCKETS)
                      + len(DECODE_BUCKETS) + len(PREFILL_BUCKETS))


def test_kv_heads_are_replicated_when_fewer_than_ranks_and_bad_tp_is_refused():
    p = plan("Qwen3-30B-A3B", 8, decode_buckets=[4], prefill_buckets=[])    # 4 KV heads, 8 ranks
    _expect(p, "gemm", m=4, n=(32 // 8 + 2) * 128, k=2048)
    with pytest.raises(InputError, match="tp=3 does not divide num_attention_heads=64 of Qwen3-32B"):
        plan("Qwen3-32B", 3)
    with pytest.raises(InputError, match="tp must be a positive integer"):
        plan("Qwen3-32B", 0)


def test_moe_plan_has_router_grouped_expert_gemms_and_no_dense_mlp():
    p = plan("Qwen3-235B-A22B", 4, decode_buckets=[16], prefill_buckets=[1024])
    for m in (16, 1024):
        _expect(p, "gemm", m=m, n=128, k=4096)                                    # router, replicated
        _expect(p, "moe_gemm", m=m, n=2 * 1536 // 4, k=4096, experts=128, topk=8, act=1)   # silu_mul fused
        _expect(p, "moe_gemm", m=m, n=4096, k=1536 // 4, experts=128, topk=8, act=0)
        assert not p.find("silu_mul", m=m * 8)
        assert _expect(p, "allreduce", 4, m=m, n=4096).roles == ["layer.attn.allreduce", "layer.moe.allreduce"]
    assert not p.find("tp_mlp") and not p.find("gemm", n=2 * 12288 // 4)
    assert p.find("moe_gemm") and not any(i.baseline_only for i in p.find("moe_gemm"))


def test_shared_expert_model_plans_gate_shared_expert_and_linear_attention():
    p = plan("Qwen3-Next-80B-A3B", 2, decode_buckets=[8], prefill_buckets=[])
    _expect(p, "gemm", m=8, n=(2 * 8 + 2 * 1) * 256, k=2048)      # gated q: q and gate per head
    _expect(p, "gemm", m=8, n=2 * 512 // 2, k=2048)                # shared expert gate_up
    _expect(p, "gemm", m=8, n=2048, k=512 // 2)                    # shared expert down
    _expect(p, "gemm", m=8, n=1, k=2048)                           # shared expert gate logits
    _expect(p, "shared_expert_gate", m=8, n=2048)
    _expect(p, "gemm", m=8, n=(2 * 8 * 128 + 2 * 16 * 128), k=2048)  # linear attention in_proj_qkvz
    _expect(p, "gemm", m=8, n=2048, k=16 * 128)                    # linear attention out_proj
    _expect(p, "rope_qk_norm", m=8, heads=8, kv_heads=1, head_dim=256, cache=1)
    _expect(p, "rope_qk_norm", m=8, heads=8, kv_heads=1, head_dim=256)


def test_ops_without_a_template_stay_in_the_plan_as_baseline_only():
    p = plan("Qwen3-8B", 2, decode_buckets=[1], prefill_buckets=[], registered={"gemm": "x", "rmsnorm": "y"})
    only = {i.problem.op for i in p.baseline_only}
    assert only == {"silu_mul", "rope_qk_norm", "decode_attention", "decode_attention_sp", "allreduce", "allgather",
                    "tp_attn", "tp_mlp", "gemm_fused"}
    assert all(i.why.startswith("no template registered for op") for i in p.baseline_only)
    assert {i.problem.op for i in p.tunable} == {"gemm", "rmsnorm"}
    assert "baseline-only" in p.summary()


def test_overlapping_buckets_dedupe():
    p = plan("Qwen3-0.6B", 1, decode_buckets=[1, 512], prefill_buckets=[512, 2048])
    assert sorted({i.problem["m"] for i in p}) == [1, 512, 2048]
    assert len({i.key for i in p}) == len(p)
    assert p.find("gemm", m=512, n=151936)                          # 512 is a decode bucket: lm_head too


def test_builtin_configs_carry_the_hf_numbers():
    assert known_models()[:6] == ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B"]
    c = load_config("Qwen3-32B")
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.num_hidden_layers, c.vocab_size, c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == \
        (5120, 25600, 64, 8, 128, 64, 151936, 1000000, 1e-6, False)
    assert load_config("qwen/qwen3-0.6b").tie_word_embeddings is True
    moe = load_config("Qwen3-30B-A3B")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.is_moe_layer(0)) == (128, 8, 768, True)
    nxt = load_config("Qwen3-Next-80B-A3B")
    assert nxt.shared_expert_intermediate_size == 512 and nxt.has_shared_expert
    assert [nxt.layer_type(i) for i in range(4)] == ["linear_attention"] * 3 + ["full_attention"]
    assert nxt.to_hf_dict()["num_experts"] == 512 and nxt.to_hf_dict()["mlp_only_layers"] == []


def test_load_config_from_a_file_or_folder_and_one_line_errors(tmp_path):
    raw = dict(load_config("Qwen3-0.6B").hf)
    raw["num_hidden_layers"] = 2
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    assert load_config(folder).num_hidden_layers == 2 and load_config(folder).name == "tiny"
    assert load_config(folder / "config.json").hidden_size == 1024
    with pytest.raises(UnknownModel) as e:
        load_config("Qwen3-33B")
    assert str(e.value).startswith("unknown model 'Qwen3-33B'; known: Qwen3-0.6B") and "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "llama.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(InputError, match="is not a Qwen3 model"):
        load_config(tmp_path / "llama.json")
    with pytest.raises(InputError, match="has no config.json"):
        load_config(tmp_path)


def test_moe_plan_at_tp2_chooses_each_sparse_layers_strategy_per_token_bucket():
    """Qwen3-30B-A3B at TP 2: one moe_block problem per bucket (full moe_intermediate_size: the problem is
    the same for both strategies), run by every sparse layer; none at TP 1."""
    from tuneforge.tune.plan import runs_per_forward
    p = plan("Qwen3-30B-A3B", 2)
    for m in ALL_M:
        item = _expect(p, "moe_block", 2, m=m, hidden=2048, inter=768, experts=128, topk=8)
        assert item.roles == ["layer.moe.block"]
    assert len(p.find("moe_block")) == len(ALL_M)
    assert runs_per_forward("Qwen3-30B-A3B", "layer.moe.block") == 48
    assert not plan("Qwen3-30B-A3B", 1, decode_buckets=[1], prefill_buckets=[]).find("moe_block")


@pytest.mark.parametrize("target", ["H800", "B300", "MI308X"])
def test_the_cost_model_predicts_the_moe_block_strategy_of_qwen3_30b_a3b_at_tp8_on_targets_not_at_hand(
        tmp_path, target):
    """`tuneforge tune --model Qwen3-30B-A3B --tp 8 --target T` on the planned moe_block problems (a decode,
    a mid and a prefill bucket): each gets a winner predicted by the cost model for T x8, a config of its
    template's space on T (a strategy, tp or ep, or the torch baseline)."""
    from tuneforge.db.store import Store
    from tuneforge.dsl import get
    from tuneforge.dsl.devices import spec
    from tuneforge.tune.plan import Plan
    from tuneforge.tune.tuner import TuneOptions, Tuner
    full = plan("Qwen3-30B-A3B", 8, decode_buckets=[1, 64], prefill_buckets=[4096])
    blocks = full.find("moe_block")
    assert len(blocks) == 3 and not any(i.baseline_only for i in blocks)
    with Store(f"sqlite:///{tmp_path / 'predicted.db'}") as store:
        report = Tuner(store, TuneOptions(target=target, trials=4, verify=False, progress=None)).tune(
            Plan(full.model, 8, full.dtype, full.decode_buckets, full.prefill_buckets, blocks))
        winners = store.winners(op="moe_block")
    assert [(r.status, r.source) for r in report.rows] == [("tuned", "predicted")] * 3
    assert sorted(w.problem.key for w in winners) == sorted(i.key for i in blocks)
    template = get("moe_block")
    for w in winners:
        assert (w.env.gpu_name, w.env.world_size, w.env.predicted, w.source) == (target, 8, True, "predicted")
        assert w.config.get("baseline") or template.reject_reason(w.config, w.problem, spec(target)) is None
        assert w.config.get("baseline") or w.config["strategy"] in ("tp", "ep")
