"""Qwen3 model configurations: the built-in ones (HF config.json files in ``models/configs/``) or a
local HF config.json. ``ModelConfig`` keeps Hugging Face's field names so a config.json maps onto it
one to one; the planner and the engine both read it.

Built in (numbers from the Hugging Face releases): dense Qwen3-0.6B/1.7B/4B/8B/14B/32B, MoE
Qwen3-30B-A3B and Qwen3-235B-A22B, and Qwen3-Next-80B-A3B (MoE with a shared expert, gated
attention every ``full_attention_interval`` layers and Gated DeltaNet linear attention in between).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tuneforge.errors import InputError, UnknownModel

CONFIG_DIR = Path(__file__).parent / "configs"


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
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
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

    # --- derived -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def gated_attention(self) -> bool:
        """Qwen3-Next's full attention: q_proj also emits a per-head output gate (2x its width)."""
        return self.model_type == "qwen3_next"

    def is_moe_layer(self, i: int) -> bool:
        """Hugging Face's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % max(1, self.decoder_sparse_step) == 0

    def layer_type(self, i: int) -> str:
        """"full_attention" or "linear_attention" (Qwen3-Next's Gated DeltaNet layers)."""
        if self.layer_types:
            return self.layer_types[i]
        if self.model_type == "qwen3_next":
            return "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
        return "full_attention"

    def to_hf_dict(self) -> dict:
        """The config as HF field names (the original config.json's extra fields included)."""
        out = dict(self.hf)
        for f in dataclasses.fields(self):
            if f.name not in ("name", "hf"):
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _from_hf(name: str, raw: dict, source: str) -> ModelConfig:
    if "text_config" in raw and "hidden_size" not in raw:      # multimodal wrappers (Qwen3.5, VL)
        raw = {**raw["text_config"], "architectures": raw.get("architectures")}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    if missing:
        raise InputError(f"{source}: not a Qwen3 config.json (missing {', '.join(missing)})")
    model_type = raw.get("model_type", "qwen3")
    if not str(model_type).startswith("qwen3"):
        raise InputError(f"{source}: model_type {model_type!r} is not a Qwen3 model")
    known = {f.name: f for f in dataclasses.fields(ModelConfig)}
    values: dict[str, Any] = {}
    for k, v in raw.items():
        if k in known and k not in ("name", "hf") and v is not None:
            values[k] = tuple(v) if isinstance(v, list) else v
    rope = raw.get("rope_parameters") or {}                  # transformers 5 nests rope_theta here
    if "rope_theta" not in values and "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" not in values and "partial_rotary_factor" in rope:
        values["partial_rotary_factor"] = rope["partial_rotary_factor"]
    values.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    values.setdefault("num_key_value_heads", raw["num_attention_heads"])
    try:
        cfg = ModelConfig(name=name, hf=dict(raw), **values)
    except TypeError as e:
        raise InputError(f"{source}: {e}") from None
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size"):
        if not isinstance(getattr(cfg, k), int) or getattr(cfg, k) <= 0:
            raise InputError(f"{source}: {k} must be a positive integer, got {getattr(cfg, k)!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(f"{source}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {cfg.num_key_value_heads}")
    return cfg


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
