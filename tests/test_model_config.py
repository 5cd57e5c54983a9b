"""Reading a Hugging Face config.json (models/configs.py) and what the engine refuses to build from it.

Malformed values are one line naming the field, through `tuneforge tune` and `tuneforge generate`;
fields the engine does not implement (experts outside Qwen3-MoE, shared experts, linear attention,
sliding window, unknown RoPE types, unknown keys) are refused by model construction while the planner keeps planning them; RoPE
scaling is parsed with transformers' rules, and the Triton kernel's YaRN / linear RoPE equals
transformers' rotary embedding."""
import json

import pytest
import torch

from tuneforge.errors import InputError
from tuneforge.models.configs import RopeScaling, check_engine_support, load_config
from tuneforge.models.loading import load_model
from tuneforge.tune.plan import plan

TINY = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)


def write_config(tmp_path, **changes) -> str:
    """A tiny config.json with ``changes`` (None deletes a field); returns its folder."""
    raw = {**TINY, **changes}
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return str(folder)


def one_line_error(capsys, argv) -> str:
    from tuneforge.cli import main
    capsys.readouterr()                               # earlier output (transformers' progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tuneforge: error: "), err
    return err[len("tuneforge: error: "):].strip()


# --- item 9: malformed values ------------------------------------------------------------------------

BAD_VALUES = [
    (dict(hidden_size="abc"), "hidden_size must be a positive integer, got 'abc'"),
    (dict(hidden_size=True), "hidden_size must be a positive integer, got True"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
    (dict(intermediate_size=12.5), "intermediate_size must be a positive integer, got 12.5"),
    (dict(rms_norm_eps="x"), "rms_norm_eps must be a positive finite number, got 'x'"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a positive finite number, got -1e-06"),
    (dict(rope_theta="1e6"), "rope_theta must be a positive finite number, got '1e6'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}),
     "rope_theta must be a positive finite number, got 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(attention_bias=0), "attention_bias must be true or false, got 0"),
    (dict(hidden_act=3), "hidden_act must be a string, got 3"),
    (dict(num_experts=-1), "num_experts must be a non-negative integer, got -1"),
    (dict(eos_token_id=[1, "x"]), "eos_token_id must be a token id or a list of them, got [1, 'x']"),
    (dict(layer_types=["full_attention"]), "layer_types must be a list of 2 layer type names (one per layer), "
                                             "got ['full_attention']"),
    (dict(mlp_only_layers=[5]), r"mlp_only_layers must be a list of layer indices in [0, 2), got [5]"),
    (dict(partial_rotary_factor=2), "partial_rotary_factor must be a number in (0, 1], got 2"),
    (dict(head_dim=None, hidden_size=66), "hidden_size 66 is not a multiple of num_attention_heads 4 "
                                          "(and no head_dim is given)"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(head_dim=15), "head_dim must be even (the rotary embedding rotates its halves), got 15"),
    (dict(num_experts=4, num_experts_per_tok=0, moe_intermediate_size=32),
     "a mixture of 4 experts needs num_experts_per_tok in [1, 4] and a positive moe_intermediate_size, got 0 and 32"),
    (dict(num_experts=4, num_local_experts=8), "num_experts=4 and num_local_experts=8 disagree"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": "4"}), "rope_scaling.factor must be a positive finite number, "
                                                              "got '4'"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling of rope_type 'linear' needs a factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 0.5}),
     "rope_scaling.original_max_position_embeddings must be a positive integer, got 0.5"),
    (dict(rope_scaling=[4]), "rope_scaling must be an object, got [4]"),
]


@pytest.mark.parametrize("changes, msg", BAD_VALUES, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD_VALUES)])
def test_malformed_values_are_one_line_naming_the_field(tmp_path, changes, msg):
    folder = write_config(tmp_path, **changes)
    with pytest.raises(InputError) as e:
        load_config(folder)
    assert str(e.value) == f"{folder}/config.json: {msg}"


@pytest.mark.parametrize("changes, msg", [BAD_VALUES[0], BAD_VALUES[4]])
def test_malformed_values_through_tune_and_generate(tmp_path, capsys, changes, msg):
    """The paths the issue hit: `tune` (a TypeError in _from_hf) and `generate` (rms_norm_eps "x" was
    accepted and failed inside rms_norm)."""
    folder = write_config(tmp_path, **changes)
    expect = f"{folder}/config.json: {msg}"
    assert one_line_error(capsys, ["tune", "--model", f"{folder}/config.json", "--db", str(tmp_path / "t.db"),
                                   "--backend", "costmodel"]) == expect
    assert one_line_error(capsys, ["generate", "--model", folder, "--prompt", "1 2", "--random-weights",
                                   "--dispatch", "baseline"]) == expect


def test_absent_fields_take_transformers_defaults(tmp_path):
    from transformers import AutoConfig
    folder = write_config(tmp_path, max_position_embeddings=None)
    cfg, hf = load_config(folder), AutoConfig.from_pretrained(folder)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling) == \
        (hf.rope_parameters["rope_theta"], hf.max_position_embeddings, None) == (10000.0, 32768, None)


# --- item 2: what the engine does not implement is refused at model construction ---------------------

def tiny_moe_checkpoint(path):
    """A transformers 5 Qwen3-MoE checkpoint: config.json says num_local_experts."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**{k: v for k, v in TINY.items() if k != "model_type"}, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32)
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_moe_checkpoint_is_served_by_the_engine_and_planned_by_the_tuner(tmp_path):
    path = tiny_moe_checkpoint(tmp_path / "moe")
    assert "num_local_experts" in json.loads((tmp_path / "moe" / "config.json").read_text())
    model = load_model(path, dtype=torch.float32)
    assert model.layers[0].mlp.gate_up.shape == (4, 64, 64)
    cfg = load_config(path)
    assert cfg.num_experts == 4 and cfg.is_moe_layer(0)
    assert plan(cfg, 1, decode_buckets=[1], prefill_buckets=[]).find("moe_gemm")


def test_moe_defaults_are_transformers_defaults_per_model_type(tmp_path):
    """A config.json leaving out norm_topk_prob / qkv_bias reads as transformers reads it for its model type."""
    from transformers import AutoConfig
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    for model_type in ("qwen3_moe", "qwen2_moe", "qwen3_next"):
        folder = write_config(tmp_path, model_type=model_type, **moe)
        cfg, ref = load_config(folder), AutoConfig.from_pretrained(folder)
        assert cfg.norm_topk_prob == ref.norm_topk_prob, model_type
        assert cfg.qkv_bias == getattr(ref, "qkv_bias", False), model_type


def test_builtin_moe_models_build_and_qwen3_next_is_refused():
    for name in ("Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen1.5-MoE-A2.7B"):
        check_engine_support(load_config(name))
    with pytest.raises(InputError, match=r"^Qwen3-Next-80B-A3B: full_attention_interval=4 is not implemented by the "
                                         r"tuneforge engine \(layer 0 of model_type qwen3_next is linear_attention\)$"):
        load_model("Qwen3-Next-80B-A3B", random=True)


REFUSED = [
    (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "num_experts=4"),      # model_type qwen3
    # Qwen3MoeConfig has no shared expert (transformers would drop it): only qwen2_moe runs one
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=32), "shared_expert_intermediate_size=32"),
    (dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=32, use_sliding_window=True, sliding_window=16), "use_sliding_window=true"),
    (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=true"),
    (dict(layer_types=["full_attention", "sliding_attention"]), 'layer_types[1]="sliding_attention"'),
    (dict(layer_types=["linear_attention", "full_attention"]), 'layer_types[0]="linear_attention"'),
    (dict(model_type="qwen3_next", full_attention_interval=2), "full_attention_interval=2"),
    (dict(model_type="qwen3_next", full_attention_interval=1), 'model_type="qwen3_next"'),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(qkv_bias=True), "qkv_bias=true"),      # a Qwen2-MoE field: transformers' Qwen3 ignores it
    (dict(partial_rotary_factor=0.25), "partial_rotary_factor=0.25"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
    (dict(hidden_act="gelu"), 'hidden_act="gelu"'),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), 'rope_scaling.rope_type="llama3"'),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), 'rope_parameters.rope_type="longrope"'),
]


@pytest.mark.parametrize("changes, what", REFUSED, ids=[w.split("=")[0] for _, w in REFUSED])
def test_unimplemented_fields_are_refused_naming_field_and_value(tmp_path, changes, what):
    folder = write_config(tmp_path, **changes)
    cfg = load_config(folder)                       # the planner still reads it
    with pytest.raises(InputError) as e:
        load_model(folder, random=True)
    assert str(e.value).startswith(f"{folder}/config.json: {what} is not implemented by the tuneforge engine")
    assert "\n" not in str(e.value)
    plan(cfg, 1, decode_buckets=[1], prefill_buckets=[])


def test_unknown_fields_are_refused_and_harmless_ones_accepted(tmp_path):
    folder = write_config(tmp_path, quantization_config={"quant_method": "gptq"})
    with pytest.raises(InputError, match=r"config\.json: quantization_config is not a config field the tuneforge "
                                         r"engine implements$"):
        load_model(folder, random=True)
    # what transformers 5 and the Hub releases write for a dense Qwen3, experts' fields at their dense values
    harmless = dict(architectures=["Qwen3ForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16", use_cache=True,
                    initializer_range=0.02, attention_dropout=0.0, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=None,
                    transformers_version="5.24.0", _name_or_path="x", unsloth_version="1", use_sliding_window=False,
                    sliding_window=4096, max_window_layers=28, layer_types=["full_attention"] * 2, num_experts=0,
                    tie_word_embeddings=True, rope_scaling=None, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 1e6})
    model = load_model(write_config(tmp_path, **harmless), random=True)
    assert model.lm_head is None and model.cfg.rope_theta == 1e6


# --- item 1: RoPE scaling --------------------------------------------------------------------------

def test_rope_scaling_is_read_as_transformers_reads_it(tmp_path):
    qwen_docs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = load_config(write_config(tmp_path, rope_theta=1e6, max_position_embeddings=131072, rope_scaling=qwen_docs))
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling("yarn", 4.0, 32768)
    check_engine_support(cfg)
    # transformers 5's nesting; the older "type" key; a top-level original_max_position_embeddings wins;
    # a missing factor is max_position_embeddings / original
    cfg = load_config(write_config(tmp_path, rope_theta=None, rope_scaling=None, original_max_position_embeddings=128,
                                   rope_parameters={"type": "yarn", "rope_theta": 5e5, "beta_fast": 0,
                                                    "original_max_position_embeddings": 64}))
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling("yarn", 4.0, 128, beta_fast=32.0)
    assert load_config(write_config(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2})).rope_scaling == \
        RopeScaling("linear", 2)


YARN = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("rope", [YARN, dict(YARN, truncate=False, beta_fast=16, beta_slow=2),
                                  dict(YARN, mscale=0.7, mscale_all_dim=0.5), dict(YARN, attention_factor=0.8),
                                  dict(rope_type="linear", factor=4.0), dict(rope_type="dynamic", factor=4.0)],
                         ids=["yarn", "yarn-untruncated", "yarn-mscale", "yarn-attention-factor", "linear", "dynamic"])
def test_rope_kernel_matches_transformers_rotary_embedding(tmp_path, rope):
    """The Triton kernel (interpreted), the torch baseline and the fp32 reference, with the config's
    scaling, against transformers' Qwen3RotaryEmbedding + apply_rotary_pos_emb, at positions past
    original_max_position_embeddings."""
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb
    from tuneforge.kernels import rope as k
    folder = write_config(tmp_path, rope_parameters={"rope_theta": 1e4, **rope})
    cfg, hf_cfg = load_config(folder), AutoConfig.from_pretrained(folder)
    heads, kv_heads, d = 4, 2, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(7, (heads + 2 * kv_heads) * d, generator=g)
    positions = torch.tensor([0, 3, 63, 64, 65, 200, 511])
    ones = torch.ones(d)
    out = k.rope_qk_norm(qkv, positions, ones, ones, heads=heads, kv_heads=kv_heads, theta=cfg.rope_theta,
                         scaling=cfg.rope_scaling)
    q, kk, _ = qkv.view(7, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
    norm = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    cos, sin = Qwen3RotaryEmbedding(hf_cfg)(qkv, positions[None])
    rq, rk = apply_rotary_pos_emb(norm(q).transpose(0, 1)[None], norm(kk).transpose(0, 1)[None], cos, sin)
    expected = torch.cat((rq[0].transpose(0, 1), rk[0].transpose(0, 1)), dim=1).reshape(7, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    args = (qkv, positions, ones, ones, heads, kv_heads, cfg.rope_theta, 1e-6, cfg.rope_scaling)
    torch.testing.assert_close(k.baseline(*args), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.reference(*args), expected, rtol=1e-5, atol=1e-5)


def test_yarn_serves_the_context_it_stretches_to(tmp_path):
    """Qwen3's YaRN recipe (factor 4 over 32768 trained positions) leaves max_position_embeddings at
    40960: the engine serves factor x original positions for yarn and linear, and no more for dynamic."""
    from tuneforge.engine.dispatch import Ops
    from tuneforge.engine.generate import Generator
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model = load_model(write_config(tmp_path, max_position_embeddings=80, rope_scaling=yarn), dtype=torch.float32,
                       random=True)
    assert model.cfg.max_positions == 256
    Generator(model, Ops("baseline"), max_batch=1, max_len=200, graphs=False)          # past 80 positions
    with pytest.raises(InputError, match="exceeds the model's 256 positions"):
        Generator(model, Ops("baseline"), max_batch=1, max_len=257, graphs=False)
    dynamic = load_config(write_config(tmp_path, max_position_embeddings=80,
                                       rope_scaling=dict(yarn, rope_type="dynamic")))
    assert dynamic.max_positions == 80
