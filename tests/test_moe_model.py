"""Qwen3-MoE in the engine against transformers (fp32, CPU, Triton's interpreter): the sparse block
against Qwen3MoeSparseMoeBlock through the torch baselines, the default kernels and stored configs
(the gate_up and down GEMMs at different block_m: two packs), and with a shared expert against
Qwen2MoeSparseMoeBlock; the whole model against
Qwen3MoeForCausalLM from a save_pretrained directory (prefill logits + 16 greedy tokens, sparse and
mlp_only dense layers mixed), at TP 1 and in a 2-rank gloo world; both checkpoint layouts (one tensor
per expert, as the Hub and save_pretrained write; transformers 5's fused expert tensors, as its
state_dict holds them) and each rank's slice of them."""
import dataclasses
import json
import logging

import pytest
import torch

from test_engine import INTERPRETER_ENV as ENV, PROMPTS, TOL, check_against_hf, fast_winners_table, hf_greedy, saved
from tuneforge.db.store import Winner
from tuneforge.dsl import get
from tuneforge.engine.dispatch import DispatchTable, Ops
from tuneforge.engine.generate import Generator
from tuneforge.engine.tp import TPStep
from tuneforge.kernels import moe_gemm as k_moe
from tuneforge.kernels._common import launch_spec
from tuneforge.models import problems as P
from tuneforge.models.configs import load_config
from tuneforge.models.loading import load_model, load_weights
from tuneforge.models.qwen3 import MLP, Qwen3, Shard, SparseMoE
from tuneforge.tune.plan import plan

TINY_MOE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])


def scaled(model):
    """Random weights keeping activations O(1) (so greedy tokens vary), as test_engine.tiny_hf."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model.eval()


def tiny_hf_moe(**changes):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return scaled(Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_MOE, **changes})))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved(tmp_path_factory, tiny_hf_moe(), "tiny-qwen3-moe")


def fused_checkpoint(hf, path) -> str:
    """transformers 5's fused expert tensors (its state_dict's names) in one safetensors file."""
    from safetensors.torch import save_file
    path.mkdir()
    hf.config.to_json_file(str(path / "config.json"))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    return str(path)


def layout_checkpoint(checkpoint, tmp_path, layout: str):
    """(path, config, state dict) of the ``checkpoint`` fixture's model in ``layout``: ``per_expert`` (as
    saved) or ``fused`` (``fused_checkpoint``'s, under ``tmp_path``)."""
    path, hf = checkpoint
    if layout == "fused":
        path = fused_checkpoint(hf, tmp_path / "fused")
    return path, load_config(path), hf.state_dict()


def stored_table(problems_configs) -> DispatchTable:
    """A DispatchTable holding ``config`` as the measured winner of each ``problem``."""
    winners = {p.key: Winner(p, ENV, c, 1e-5, 2e-5, 2.0, 50.0, "measured", get(p.op).source_hash, "test", 1)
               for p, c in problems_configs}
    return DispatchTable(winners, {}, where="test", model="tiny-moe", tp=1, buckets=None)


# --- the sparse block ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["baseline", "default", "tuned"])
@pytest.mark.parametrize("norm", [True, False])
def test_block_matches_transformers(mode, norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    hf_cfg = Qwen3MoeConfig(**{**TINY_MOE, "norm_topk_prob": norm})
    ref = scaled(Qwen3MoeSparseMoeBlock(hf_cfg))
    cfg = dataclasses.replace(load_config("Qwen3-30B-A3B"), **{**TINY_MOE, "mlp_only_layers": (),
                                                               "norm_topk_prob": norm})
    block = SparseMoE(cfg, Shard(), torch.float32, "cpu")
    with torch.no_grad():
        block.router.copy_(ref.gate.weight)
        block.gate_up.copy_(ref.experts.gate_up_proj)
        block.down.copy_(ref.experts.down_proj)
    tokens = 13
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    if mode == "tuned":    # stored configs; the down GEMM at another block_m than gate_up's: its own pack
        spec = launch_spec(torch.device("cpu"), persistent=False)
        e, k, h, i = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
        up = P.moe_gemm("fp32", tokens, (2 * i, h), e, k, act=True)
        down = P.moe_gemm("fp32", tokens, (h, i), e, k, act=False)
        ops = Ops("tuned", stored_table([
            (P.gemm("fp32", tokens, (e, h)), {"baseline": True}),
            (P.moe_router("fp32", tokens, e, k), {"rows": 4, "num_warps": 1}),
            (P.moe_pack("fp32", tokens, e, k), {"block": 16, "num_warps": 1}),
            (up, k_moe.default_config(up, spec, block_m=16)),
            (down, {**k_moe.default_config(down, spec, block_m=32), "combine": "reduce"})]))
    else:
        ops = Ops(mode)
    with torch.no_grad():
        out = block(x, ops, TPStep(Shard(), tokens))
        expect = ref(x[None])[0]
    torch.testing.assert_close(out, expect, **TOL)
    if mode == "tuned":
        assert ops.table.fallbacks == []


@pytest.mark.parametrize("mode", ["baseline", "default"])
def test_shared_expert_block_matches_transformers(mode):
    """The Qwen2-MoE block: routed experts + the sigmoid-gated shared expert (fused shared_expert_gate)."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    changes = dict(shared_expert_intermediate_size=48, norm_topk_prob=False)
    ref = scaled(Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(**{**TINY_MOE, **changes})))
    cfg = dataclasses.replace(load_config("Qwen3-30B-A3B"), **{**TINY_MOE, **changes, "mlp_only_layers": ()})
    block = SparseMoE(cfg, Shard(), torch.float32, "cpu")
    s = ref.shared_expert
    with torch.no_grad():
        block.router.copy_(ref.gate.weight)
        block.gate_up.copy_(ref.experts.gate_up_proj)
        block.down.copy_(ref.experts.down_proj)
        block.shared_gate_up.copy_(torch.cat((s.gate_proj.weight, s.up_proj.weight)))
        block.shared_down.copy_(s.down_proj.weight)
        block.shared_gate.copy_(ref.shared_expert_gate.weight)
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(block(x, Ops(mode), TPStep(Shard(), 9)), ref(x[None])[0], **TOL)


def test_sparse_layers_follow_transformers_rule():
    """mlp_only_layers and decoder_sparse_step pick the dense layers as transformers does."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeModel
    changes = dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    hf = Qwen3MoeModel(Qwen3MoeConfig(**{**TINY_MOE, **changes}))
    cfg = dataclasses.replace(load_config("Qwen3-30B-A3B"), **{**TINY_MOE, **changes,
                                                               "mlp_only_layers": (3,)})
    ours = Qwen3(cfg, dtype=torch.float32, device="meta")
    assert [isinstance(layer.mlp, Qwen3MoeMLP) for layer in hf.layers] == \
        [isinstance(layer.mlp, MLP) for layer in ours.layers] == [True, False, True, True, True, False]


# --- the model -------------------------------------------------------------------------------------

def test_baseline_matches_transformers_for_16_greedy_steps(checkpoint):
    path, hf = checkpoint
    model = load_model(path, dtype=torch.float32)
    assert [type(layer.mlp) for layer in model.layers] == [SparseMoE, MLP, SparseMoE]
    check_against_hf(hf, Generator(model, Ops("baseline"), max_batch=3, max_len=32), steps=16)


def test_tuned_kernels_match_transformers(checkpoint, tmp_path, caplog):
    """The tuning plan's problems (router select, pack, both expert GEMMs included) get winners in a real
    store; the engine runs every op through its Triton kernel (nothing falls back) and matches."""
    path, hf = checkpoint
    cfg = load_config(path)
    the_plan = plan(cfg, tp=1, decode_buckets=(4,), prefill_buckets=(32,), dtype="fp32")
    assert {i.problem.op for i in the_plan.tunable} >= {"moe_router", "moe_pack", "moe_gemm"}
    table = fast_winners_table(str(tmp_path / "tf.db"), cfg, the_plan)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    model = load_model(path, dtype=torch.float32)
    check_against_hf(hf, Generator(model, Ops("tuned", table), max_batch=3, max_len=32), steps=2)
    assert [r.getMessage() for r in caplog.records if r.name == "tuneforge.engine"] == []


def test_fused_expert_checkpoint_loads_the_same(checkpoint, tmp_path):
    path, hf = checkpoint
    with open(f"{path}/config.json") as f:
        assert "num_local_experts" in json.load(f)
    fused = fused_checkpoint(hf, tmp_path / "fused")
    a, b = load_model(path, dtype=torch.float32), load_model(fused, dtype=torch.float32)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_rank_shards_are_slices_of_the_experts(checkpoint, tmp_path, layout):
    path, cfg, sd = layout_checkpoint(checkpoint, tmp_path, layout)
    p, i = "model.layers.2.mlp.", cfg.moe_intermediate_size // 2
    for r in range(2):
        model = Qwen3(cfg, Shard(r, 2), torch.float32)
        load_weights(model, path)
        moe = model.layers[2].mlp
        gate_up, down = sd[p + "experts.gate_up_proj"], sd[p + "experts.down_proj"]
        assert torch.equal(moe.gate_up, torch.cat((gate_up[:, r * i:(r + 1) * i],
                                                   gate_up[:, 2 * i + r * i:2 * i + (r + 1) * i]), dim=1))
        assert torch.equal(moe.down, down[:, :, r * i:(r + 1) * i])
        assert torch.equal(moe.router, sd[p + "gate.weight"])


def test_a_decode_step_streams_only_the_hit_experts(checkpoint):
    path, _ = checkpoint
    model = load_model(path, dtype=torch.float32)
    moe = model.layers[0].mlp
    per_expert = (moe.gate_up[0].numel() + moe.down[0].numel()) * 4
    everything = sum(p.numel() for p in model.parameters()) * 4 - model.embed.numel() * 4
    # two sparse layers of 8 experts, top-2: one token reads 2 in each, two tokens 8 (1 - (6/8)^2) = 3.5,
    # 256 tokens all 8
    assert model.streamed_weight_bytes() == everything - 2 * 6 * per_expert
    assert model.streamed_weight_bytes(2) == everything - 2 * round(4.5 * per_expert)
    assert model.streamed_weight_bytes(256) == everything


def _tp_rank(world, path: str, mode: str, steps: int):
    from tuneforge.engine.dispatch import Ops as RankOps
    model = load_model(path, shard=Shard.of(world), dtype=torch.float32)
    ops = RankOps(mode)
    out = Generator(model, ops, max_batch=3, max_len=32).generate(PROMPTS, steps, return_logits=True)
    return out.tokens, torch.stack(out.logits), ops.describe()


def check_tp2(path, hf, mode, steps):
    from tuneforge.world import spawn
    results = spawn(_tp_rank, 2, path, mode, steps, device="cpu", timeout=300.0)
    for tokens, logits, _ in results:
        for i, p in enumerate(PROMPTS):
            ref_tokens, _, ref_logits = hf_greedy(hf, p, steps)
            assert tokens[i] == ref_tokens
            torch.testing.assert_close(logits[:, i], ref_logits, **TOL)
    return results[0][2]


def test_tp2_matches_transformers(checkpoint):
    path, hf = checkpoint
    check_tp2(path, hf, "baseline", steps=6)


def test_tp2_kernels_of_an_all_sparse_model_match_transformers(tmp_path):
    """Every layer sparse (no dense MLP: no tp_mlp block to look up or warm): attention runs the
    gemm_ar TP block on the heap, the experts their kernels on every token, then the all-reduce."""
    hf = tiny_hf_moe(mlp_only_layers=[], num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    assert check_tp2(str(tmp_path), hf, "default", steps=2).endswith("TP: m=27 gemm_ar+torch, m=4 gemm_ar+torch")


# --- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(checkpoint):
    """The grouped kernels (router, pack, GEMMs) read nothing back to the host: graphed decode == eager."""
    path, hf = checkpoint
    model = load_model(path, dtype=torch.float32, device="cuda")
    prompts = [[(7 * i + j) % 128 for j in range(40 - 10 * i)] for i in range(3)]
    runs = [Generator(model, Ops("default"), max_batch=3, max_len=64, graphs=g).generate(prompts, 16, return_logits=True)
            for g in (False, True)]
    assert runs[0].tokens == runs[1].tokens
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tokens, _, ref = hf_greedy(hf, prompts[0], 16)
    assert runs[1].tokens[0] == tokens
    torch.testing.assert_close(torch.stack([s[0] for s in runs[1].logits]).cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_graphed_decode_of_the_per_expert_loop_decodes_eagerly_said_once(checkpoint, caplog):
    """The per-expert loop reads the routing back to the host: once it has run in the warm-up, decode
    goes on without CUDA graphs (one log line) and gives the eager tokens."""
    path, _ = checkpoint
    model = load_model(path, dtype=torch.float32, device="cuda")
    eager = Generator(model, Ops("baseline"), max_batch=1, max_len=16, graphs=False).generate([[1, 2, 3]], 4)
    gen = Generator(model, Ops("baseline"), max_batch=1, max_len=16, graphs=True)
    with caplog.at_level("WARNING", logger="tuneforge.engine"):
        run = gen.generate([[1, 2, 3]], 4)
    assert run.tokens == eager.tokens and not gen.graphs
    lines = [r.getMessage() for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert lines == ["prefill and decode run without CUDA graphs: moe_gemm's torch baseline (transformers' per-expert "
                     "loop) reads the routing back to the host"]


def test_the_per_expert_baseline_marks_the_ops_uncapturable(checkpoint):
    """What the generator reads to decide: the kernels leave it empty, the per-expert loop sets it."""
    path, _ = checkpoint
    model = load_model(path, dtype=torch.float32)
    for mode, expect in (("default", ""), ("baseline", "per-expert loop")):
        ops = Ops(mode)
        Generator(model, ops, max_batch=1, max_len=16, graphs=False).generate([[1, 2, 3]], 2)
        assert (expect in ops.uncapturable) and (bool(ops.uncapturable) == bool(expect)), (mode, ops.uncapturable)
