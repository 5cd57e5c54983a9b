"""Qwen2-MoE (Qwen2MoeForCausalLM: q/k/v bias, no q/k norm, a sigmoid-gated shared expert beside the
routed ones, norm_topk_prob off) in the engine against transformers, fp32 on the CPU (Triton's
interpreter): a tiny random model saved with save_pretrained and loaded back, prefill logits and 16
greedy tokens through the torch baselines and through the default Triton kernels at TP 1, the same
in a 2-rank gloo world (q/k/v bias and shared expert sliced per rank; the kernels for 2 tokens). A
sparse and an mlp_only dense layer. The plan/dispatch zero-miss check covers the built-in Qwen1.5-MoE-A2.7B in
test_plan_dispatch.py."""
import json

import pytest
import torch

from test_engine import check_against_hf
from test_moe_model import check_tp2, scaled
from tuneforge.engine.dispatch import Ops
from tuneforge.engine.generate import Generator
from tuneforge.models.configs import check_engine_support, load_config
from tuneforge.models.loading import load_model
from tuneforge.models.qwen3 import MLP, SparseMoE

TINY_QWEN2_MOE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      mlp_only_layers=[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    hf = scaled(Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY_QWEN2_MOE)))
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    hf.save_pretrained(path)
    return str(path), hf


def test_config_reads_as_transformers_reads_it(checkpoint, tmp_path):
    """The saved config.json, and one as the Hub's Qwen1.5-MoE files are (no qkv_bias, no norm_topk_prob:
    transformers' defaults, bias on and renormalisation off)."""
    from transformers import AutoConfig
    path, hf = checkpoint
    cfg = load_config(path)
    assert (cfg.qkv_bias, cfg.norm_topk_prob, cfg.has_qk_norm, cfg.shared_expert_intermediate_size) == \
        (True, False, False, 48)
    check_engine_support(cfg)
    raw = json.loads(open(f"{path}/config.json").read())
    del raw["qkv_bias"], raw["norm_topk_prob"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hub, ref = load_config(tmp_path), AutoConfig.from_pretrained(tmp_path)
    assert (hub.qkv_bias, hub.norm_topk_prob) == (ref.qkv_bias, ref.norm_topk_prob) == (True, False)
    assert load_config("Qwen1.5-MoE-A2.7B").has_shared_expert


def test_baseline_matches_transformers_for_16_greedy_steps(checkpoint):
    path, hf = checkpoint
    model = load_model(path, dtype=torch.float32)
    assert [type(layer.mlp) for layer in model.layers] == [SparseMoE, MLP]
    assert model.layers[0].attn.q_norm is None and model.layers[0].mlp.shared is not None
    check_against_hf(hf, Generator(model, Ops("baseline"), max_batch=3, max_len=32), steps=16)


def test_default_kernels_match_transformers_for_16_greedy_steps(checkpoint):
    path, hf = checkpoint
    model = load_model(path, dtype=torch.float32)
    check_against_hf(hf, Generator(model, Ops("default"), max_batch=3, max_len=32), steps=16)


def test_tp2_matches_transformers_for_16_greedy_steps(checkpoint):
    check_tp2(*checkpoint, "baseline", steps=16)


def test_tp2_default_kernels_match_transformers(checkpoint):
    """Attention runs the gemm_ar TP block (its qkv output then takes this rank's bias slice)."""
    assert "gemm_ar" in check_tp2(*checkpoint, "default", steps=2)
