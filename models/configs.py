"""Qwen3 and Qwen2-MoE model configurations: the built-in ones (HF config.json files in ``models/configs/``) or a
local HF config.json. ``ModelConfig`` keeps Hugging Face's field names so a config.json maps onto it
one to one; the planner and the engine both read it. ``_from_hf`` is the one place a config.json is
read: every field it uses is type- and range-checked there (one line naming the field), absent fields
take transformers' defaults. What the engine cannot run (linear attention, sliding window,
unknown fields, ...) is still parsed, for the planner, and refused by ``check_engine_support`` when
the engine builds a model.

Built in (numbers from the Hugging Face releases): dense Qwen3-0.6B/1.7B/4B/8B/14B/32B, MoE
Qwen3-30B-A3B and Qwen3-235B-A22B, Qwen1.5-MoE-A2.7B (model_type qwen2_moe: q/k/v bias, no q/k
norm, a sigmoid-gated shared expert), and Qwen3-Next-80B-A3B (MoE with a shared expert, gated
attention every ``full_attention_interval`` layers and Gated DeltaNet linear attention in between).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tuneforge.errors import InputError, UnknownModel

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class RopeScaling:
    """A config's ``rope_scaling`` / ``rope_parameters`` beyond rope_theta, with transformers' names and
    defaults (kernels/rope.py turns it into frequencies). Only the fields of ``rope_type`` are read:
    linear and dynamic use ``factor``; yarn all of them. Other types are kept by name (the engine
    refuses them; the planner does not care)."""
    rope_type: str
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True


ENGINE_ROPE_TYPES = ("linear", "dynamic", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    name: str                                   # not an HF field: the built-in name or the path's folder
    model_type: str = "qwen3"
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: Optional[RopeScaling] = None  # None: default RoPE
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    qkv_bias: bool = False                      # Qwen2-MoE: bias on q, k, v (not o); default True there
    use_sliding_window: bool = False
    sliding_window: Optional[int] = None
    torch_dtype: str = "bfloat16"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None
    # MoE (Qwen3-MoE, Qwen3-Next): 0 experts means dense
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    shared_expert_intermediate_size: int = 0
    # Qwen3-Next: partial rotary, gated full attention every full_attention_interval layers,
    # Gated DeltaNet linear attention in the others
    partial_rotary_factor: float = 1.0
    full_attention_interval: int = 1
    layer_types: tuple = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    hf: dict = field(default_factory=dict, compare=False, repr=False)   # the whole config.json
    source: str = field(default="", compare=False, repr=False)          # where it was read (for messages)

    # --- derived -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def has_qk_norm(self) -> bool:
        """Qwen3's per-head RMSNorm of q and k before RoPE; Qwen2-MoE has none."""
        return self.model_type != "qwen2_moe"

    @property
    def gated_attention(self) -> bool:
        """Qwen3-Next's full attention: q_proj also emits a per-head output gate (2x its width)."""
        return self.model_type == "qwen3_next"

    @property
    def max_positions(self) -> int:
        """The longest context the model serves: linear and YaRN RoPE scaling stretch the trained
        positions to ``factor`` x ``original_max_position_embeddings``, which ``max_position_embeddings``
        may understate (Qwen3's YaRN recipe keeps 40960); dynamic NTK is exact only up to
        ``max_position_embeddings``, so it stretches nothing here."""
        r = self.rope_scaling
        if r is not None and r.rope_type in ("linear", "yarn") and r.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(r.factor * r.original_max_position_embeddings))
        return self.max_position_embeddings

    def is_moe_layer(self, i: int) -> bool:
        """Hugging Face's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % max(1, self.decoder_sparse_step) == 0

    def layer_type(self, i: int) -> str:
        """"full_attention", "linear_attention" (Qwen3-Next's Gated DeltaNet layers) or "sliding_attention"."""
        if self.layer_types:
            return self.layer_types[i]
        if self.model_type == "qwen3_next":
            return "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
        return "full_attention"

    def to_hf_dict(self) -> dict:
        """The config as HF field names (the original config.json's extra fields included)."""
        out = dict(self.hf)
        for f in dataclasses.fields(self):
            if f.name not in ("name", "hf", "source"):
                v = getattr(self, f.name)
                if isinstance(v, RopeScaling):
                    v = dataclasses.asdict(v)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# --- reading a config.json -----------------------------------------------------------------------------

POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "decoder_sparse_step",
                 "full_attention_interval")
NON_NEGATIVE_INTS = ("sliding_window", "max_window_layers", "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim")
POSITIVE_FLOATS = ("rms_norm_eps",)          # rope_theta and partial_rotary_factor: _rope
BOOLS = ("tie_word_embeddings", "attention_bias", "qkv_bias", "use_sliding_window", "norm_topk_prob")
STRINGS = ("hidden_act", "torch_dtype", "dtype")
# transformers' defaults for the fields a Qwen3 config.json may leave out (Qwen3Config, Qwen3MoeConfig,
# Qwen3NextConfig agree); the dataclass defaults above are Qwen3-0.6B's numbers
HF_DEFAULTS = {"rope_theta": 10000.0, "max_position_embeddings": 32768}
# where a model type's transformers defaults differ from the dataclass's: the Hub's Qwen1.5-MoE / Qwen2-MoE
# config.json files predate the qkv_bias key (their attention has the bias); Qwen3MoeConfig and
# Qwen2MoeConfig leave norm_topk_prob off (Qwen3NextConfig's is on, as the dataclass's)
MODEL_TYPE_DEFAULTS = {"qwen2_moe": {"qkv_bias": True, "norm_topk_prob": False}, "qwen3_moe": {"norm_topk_prob": False}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_types(raw: dict, source: str) -> None:
    """Every field _from_hf uses has the type and range a Qwen3 model needs (None: absent)."""
    def bad(key, what):
        raise InputError(f"{source}: {key} must be {what}, got {raw[key]!r}")

    present = lambda key: raw.get(key) is not None
    for key in POSITIVE_INTS:
        if present(key) and not (_is_int(raw[key]) and raw[key] > 0):
            bad(key, "a positive integer")
    for key in NON_NEGATIVE_INTS:
        if present(key) and not (_is_int(raw[key]) and raw[key] >= 0):
            bad(key, "a non-negative integer")
    for key in POSITIVE_FLOATS:
        if present(key) and not (_is_number(raw[key]) and raw[key] > 0):
            bad(key, "a positive finite number")
    for key in BOOLS:
        if present(key) and not isinstance(raw[key], bool):
            bad(key, "true or false")
    for key in STRINGS:
        if present(key) and not isinstance(raw[key], str):
            bad(key, "a string")
    if present("bos_token_id") and not (_is_int(raw["bos_token_id"]) and raw["bos_token_id"] >= 0):
        bad("bos_token_id", "a non-negative integer")
    eos = raw.get("eos_token_id")
    if eos is not None and not all(_is_int(t) and t >= 0 for t in (eos if isinstance(eos, list) else [eos])):
        bad("eos_token_id", "a token id or a list of them")
    layers = raw["num_hidden_layers"]
    if present("mlp_only_layers") and not (isinstance(raw["mlp_only_layers"], list) and all(
            _is_int(i) and 0 <= i < layers for i in raw["mlp_only_layers"])):
        bad("mlp_only_layers", f"a list of layer indices in [0, {layers})")
    if present("layer_types") and not (isinstance(raw["layer_types"], list) and len(raw["layer_types"]) == layers
                                       and all(isinstance(t, str) for t in raw["layer_types"])):
        bad("layer_types", f"a list of {layers} layer type names (one per layer)")


def _rope(raw: dict, source: str) -> dict:
    """rope_theta, rope_scaling and partial_rotary_factor as transformers 5 reads them: a truthy
    ``rope_scaling`` (the older key) wins over ``rope_parameters``; the dict's values over top-level ones."""
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    rope = raw.get(key) or {}
    if not isinstance(rope, dict):
        raise InputError(f"{source}: {key} must be an object, got {rope!r}")
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    theta = HF_DEFAULTS["rope_theta"] if theta is None else theta
    if not (_is_number(theta) and theta > 0):
        raise InputError(f"{source}: rope_theta must be a positive finite number, got {theta!r}")
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else partial
    if not (_is_number(partial) and 0 < partial <= 1):
        raise InputError(f"{source}: partial_rotary_factor must be a number in (0, 1], got {partial!r}")
    out = dict(rope_theta=theta, partial_rotary_factor=partial, rope_scaling=None)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(kind, str):
        raise InputError(f"{source}: {key}.rope_type must be a string, got {kind!r}")
    if kind == "default":
        return out
    if kind not in ENGINE_ROPE_TYPES:
        return {**out, "rope_scaling": RopeScaling(kind)}

    def number(name, default, positive=True):
        v = rope.get(name)
        if v is None:
            return default
        if not (_is_number(v) and (v > 0 or not positive)):
            raise InputError(f"{source}: {key}.{name} must be a {'positive ' if positive else ''}finite number, "
                             f"got {v!r}")
        return v

    max_positions = raw.get("max_position_embeddings") or HF_DEFAULTS["max_position_embeddings"]
    if kind != "yarn":
        if rope.get("factor") is None:
            raise InputError(f"{source}: {key} of rope_type {kind!r} needs a factor")
        return {**out, "rope_scaling": RopeScaling(kind, factor=number("factor", None))}
    # a top-level original_max_position_embeddings takes priority (transformers' standardize_rope_params)
    original = raw.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
    original = max_positions if original is None else original
    if not (_is_int(original) and original > 0):
        raise InputError(f"{source}: {key}.original_max_position_embeddings must be a positive integer, "
                         f"got {original!r}")
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        raise InputError(f"{source}: {key}.truncate must be true or false, got {truncate!r}")
    return {**out, "rope_scaling": RopeScaling(
        kind, factor=number("factor", max_positions / original), original_max_position_embeddings=original,
        # transformers reads these as `get(...) or default`: 0 means the default too
        beta_fast=number("beta_fast", None, positive=False) or 32.0,
        beta_slow=number("beta_slow", None, positive=False) or 1.0,
        attention_factor=number("attention_factor", None), mscale=number("mscale", None, positive=False),
        mscale_all_dim=number("mscale_all_dim", None, positive=False), truncate=truncate)}


def _from_hf(name: str, raw: dict, source: str) -> ModelConfig:
    if "text_config" in raw and "hidden_size" not in raw:      # multimodal wrappers (Qwen3.5, VL)
        if not isinstance(raw["text_config"], dict):
            raise InputError(f"{source}: text_config must be an object, got {raw['text_config']!r}")
        raw = {**raw["text_config"], "architectures": raw.get("architectures")}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if raw.get(k) is None]
    if missing:
        raise InputError(f"{source}: not a Qwen3 config.json (missing {', '.join(missing)})")
    model_type = raw.get("model_type", "qwen3")
    if not (str(model_type).startswith("qwen3") or model_type == "qwen2_moe"):
        raise InputError(f"{source}: model_type {model_type!r} is not a Qwen3 model (qwen3*, or qwen2_moe)")
    _check_types(raw, source)
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "hf", "source"}
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in raw.items() if k in known and v is not None}
    for k, v in MODEL_TYPE_DEFAULTS.get(model_type, {}).items():
        values.setdefault(k, v)
    values.update(_rope(raw, source))
    values.setdefault("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"])
    experts = {k: raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
    if len(set(experts.values())) > 1:
        raise InputError(f"{source}: num_experts={experts['num_experts']} and num_local_experts="
                         f"{experts['num_local_experts']} disagree")
    if experts:                                              # transformers 5 writes num_local_experts
        values["num_experts"] = next(iter(experts.values()))
    heads = raw["num_attention_heads"]
    if "head_dim" not in values:
        if raw["hidden_size"] % heads:
            raise InputError(f"{source}: hidden_size {raw['hidden_size']} is not a multiple of num_attention_heads "
                             f"{heads} (and no head_dim is given)")
        values["head_dim"] = raw["hidden_size"] // heads
    values.setdefault("num_key_value_heads", heads)
    cfg = ModelConfig(name=name, hf=dict(raw), source=source, **values)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(f"{source}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.head_dim % 2:
        raise InputError(f"{source}: head_dim must be even (the rotary embedding rotates its halves), got "
                         f"{cfg.head_dim}")
    if cfg.is_moe and not (0 < cfg.num_experts_per_tok <= cfg.num_experts and cfg.moe_intermediate_size > 0):
        raise InputError(f"{source}: a mixture of {cfg.num_experts} experts needs num_experts_per_tok in "
                         f"[1, {cfg.num_experts}] and a positive moe_intermediate_size, got "
                         f"{cfg.num_experts_per_tok} and {cfg.moe_intermediate_size}")
    return cfg


# --- what the engine runs ----------------------------------------------------------------------------
# Every field of transformers 5's Qwen3Config, Qwen3MoeConfig, Qwen2MoeConfig and Qwen3NextConfig (and of
# PreTrainedConfig), by what the engine (models/qwen3.py) does with it. A field in no list
# is unknown to the engine and refused: it might change the forward pass (quantization_config, ...).

# read and implemented (the ones with restricted values are checked in check_engine_support)
IMPLEMENTED = frozenset({
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias", "qkv_bias",
    "use_sliding_window", "layer_types", "partial_rotary_factor", "num_experts", "num_local_experts",
    "original_max_position_embeddings", "bos_token_id", "eos_token_id"})
# no effect on an inference forward pass: ids and labels, dtype (the engine picks its own), training-only
# terms, transformers' bookkeeping
HARMLESS = frozenset({
    "architectures", "pad_token_id", "torch_dtype", "dtype", "initializer_range", "use_cache", "attention_dropout",
    "transformers_version", "id2label", "label2id", "return_dict", "output_attentions", "output_hidden_states",
    "output_router_logits", "router_aux_loss_coef", "chunk_size_feed_forward", "problem_type", "is_encoder_decoder",
    "tokenizer_class"})
# meaningful only with a feature refused above: the window (use_sliding_window), the experts (num_experts),
# Qwen3-Next's linear-attention layers (layer_types / full_attention_interval with model_type qwen3_next)
DEPENDENT = frozenset({
    "sliding_window", "max_window_layers", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size", "full_attention_interval",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim"})


def check_engine_support(cfg: ModelConfig) -> None:
    """Raise InputError (one line naming the field and its value) if ``cfg`` sets anything the engine does
    not implement; the planner keeps planning such models, only model construction calls this."""
    raw = cfg.hf
    src = cfg.source or cfg.name

    def refuse(key, value, why=""):
        raise InputError(f"{src}: {key}={json.dumps(value)} is not implemented by the tuneforge engine"
                         + (f" ({why})" if why else ""))

    if cfg.use_sliding_window:
        refuse("use_sliding_window", True)
    for i in range(cfg.num_hidden_layers):
        kind = cfg.layer_type(i)
        if kind != "full_attention":
            if cfg.layer_types:
                refuse(f"layer_types[{i}]", kind)
            refuse("full_attention_interval", cfg.full_attention_interval,
                   f"layer {i} of model_type {cfg.model_type} is {kind}")
    if raw.get("attention_bias"):      # Qwen3's: on o_proj too
        refuse("attention_bias", True)
    if raw.get("qkv_bias") and cfg.model_type != "qwen2_moe":    # a Qwen2-MoE field; transformers' Qwen3 ignores it
        refuse("qkv_bias", True, f"q/k/v bias runs for model_type qwen2_moe, this is {cfg.model_type}")
    if cfg.partial_rotary_factor != 1:
        refuse("partial_rotary_factor", cfg.partial_rotary_factor)
    if cfg.hidden_act != "silu":
        refuse("hidden_act", cfg.hidden_act, "silu only")
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type not in ENGINE_ROPE_TYPES:
        key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
        refuse(f"{key}.rope_type", cfg.rope_scaling.rope_type, f"RoPE types: default, {', '.join(ENGINE_ROPE_TYPES)}")
    if cfg.model_type not in ("qwen3", "qwen3_moe", "qwen2_moe"):
        refuse("model_type", cfg.model_type, "Qwen3, Qwen3-MoE and Qwen2-MoE only")
    if cfg.is_moe and cfg.model_type not in ("qwen3_moe", "qwen2_moe"):
        key = "num_local_experts" if raw.get("num_local_experts") is not None else "num_experts"
        refuse(key, cfg.num_experts, f"experts run for model_type qwen3_moe and qwen2_moe, this is {cfg.model_type}")
    if cfg.has_shared_expert and cfg.model_type != "qwen2_moe":   # Qwen3MoeConfig has no shared expert
        refuse("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size,
               f"the shared expert runs for model_type qwen2_moe, this is {cfg.model_type}")
    for key, value in raw.items():
        # private keys (_name_or_path, ...) and tools' version stamps never change the model
        if key not in IMPLEMENTED | HARMLESS | DEPENDENT and not key.startswith("_") and not key.endswith("_version"):
            raise InputError(f"{src}: {key} is not a config field the tuneforge engine implements")


def known_models() -> list[str]:
    return sorted((p.stem for p in CONFIG_DIR.glob("*.json")), key=_model_order)


def _model_order(name: str):
    # dense by size, then MoE by size: Qwen3-0.6B < Qwen3-1.7B < ... < Qwen3-30B-A3B < ...
    import re
    sizes = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)B", name)]
    return ("A" in name.split("-")[-1], "Next" in name, sizes[0] if sizes else 0.0, name)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config.json holds a JSON object, got {type(raw).__name__}")
    return raw


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A built-in model by name (case-insensitive; an ``Qwen/`` prefix is allowed), a local HF
    config.json, or a folder holding one. Unknown names raise UnknownModel listing the known ones."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json")
        return _from_hf(path.resolve().name, _read_json(path / "config.json"), str(path / "config.json"))
    if path.is_file():
        name = path.parent.resolve().name if path.name == "config.json" else path.stem
        return _from_hf(name, _read_json(path), str(path))
    wanted = text.split("/")[-1].lower()
    for name in known_models():
        if name.lower() == wanted:
            return _from_hf(name, _read_json(CONFIG_DIR / f"{name}.json"), name)
    raise UnknownModel(f"unknown model {text!r}; known: {', '.join(known_models())} "
                       f"(or a path to a Hugging Face config.json or its folder)")
