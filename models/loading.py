"""Weights: from a local Hugging Face directory (config.json + *.safetensors, one file or shards with
model.safetensors.index.json), each rank reading only its tensor-parallel slice of every tensor
(safetensors' ``get_slice`` reads just those bytes; in the ``ep`` MoE layout, ``Shard.moe``, only its
own experts, whole, from either expert layout); or random, for benchmarks.
"""
from __future__ import annotations

import json
import os
import zlib
from contextlib import ExitStack
from typing import Optional

import torch

from tuneforge.errors import InputError
from tuneforge.models.qwen3 import Qwen3, Shard

INDEX_FILE = "model.safetensors.index.json"


def tensor_files(directory: str) -> dict[str, str]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    from safetensors import safe_open
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{index}: not a safetensors index ({e})") from None
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise InputError(f"{directory} has no *.safetensors weights (use random weights to run without)")
    names: dict[str, str] = {}
    for file in files:
        path = os.path.join(directory, file)
        with safe_open(path, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names


def load_weights(model: Qwen3, directory: str) -> None:
    """Copy this rank's slice of every checkpoint tensor into ``model`` (converted to its dtype). Expert
    weights: one tensor per expert (the Hub's layout), or transformers 5's fused ``mlp.experts.gate_up_proj``
    / ``down_proj`` where the checkpoint holds those."""
    from safetensors import safe_open
    files = tensor_files(directory)
    fused = any(name.endswith(".mlp.experts.gate_up_proj") for name in files)
    with ExitStack() as stack, torch.no_grad():
        opened: dict[str, object] = {}
        for t in model.checkpoint_tensors(fused_experts=fused):
            if t.name not in files:
                raise InputError(f"checkpoint {directory} has no tensor {t.name}")
            path = files[t.name]
            if path not in opened:
                if not os.path.isfile(path):
                    raise InputError(f"checkpoint file {path} (listed in {INDEX_FILE}) is missing")
                opened[path] = stack.enter_context(safe_open(path, framework="pt"))
            sl = opened[path].get_slice(t.name)
            shape = tuple(sl.get_shape())
            if shape != t.shape:
                raise InputError(f"checkpoint tensor {t.name} has shape {list(shape)}, the config expects "
                                 f"{list(t.shape)}")
            if t.split_dim is None:
                part = sl[:]
            else:
                end = t.start + t.dest.shape[t.split_dim]
                part = sl[(slice(None),) * t.split_dim + (slice(t.start, end),)]
            t.dest.copy_(part)


def random_weights(model: Qwen3, seed: int = 0) -> None:
    """Norm weights 1, biases 0, every matrix N(0, 0.02^2) (the Hugging Face initialiser's), generated on
    the model's device. Each checkpoint tensor is drawn whole from a generator seeded by ``seed`` and its
    name, and this rank keeps its slice, so every TP degree (and every rank holding a replicated KV
    head) runs the same model: ``--random-weights --tp 2`` gives the tokens of ``--tp 1``."""
    device = model.embed.device
    with torch.no_grad():
        for t in model.checkpoint_tensors():
            if t.name.endswith("bias"):
                t.dest.zero_()
            elif len(t.shape) == 1:
                t.dest.fill_(1.0)
            else:
                g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(t.name.encode()))
                whole = torch.empty(t.shape, dtype=t.dest.dtype, device=device).normal_(0.0, 0.02, generator=g)
                t.dest.copy_(whole if t.split_dim is None else
                             whole.narrow(t.split_dim, t.start, t.dest.shape[t.split_dim]))


def load_model(name_or_path: str, *, shard: Shard = Shard(), dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", random: bool = False, seed: int = 0,
               config: Optional[object] = None) -> Qwen3:
    """A Qwen3 for this rank: weights from the model directory ``name_or_path``, or random
    (``random=True``, any known model name). ``config`` overrides the one ``name_or_path`` names."""
    from tuneforge.models.configs import load_config
    cfg = config if config is not None else load_config(name_or_path)
    model = Qwen3(cfg, shard, dtype, device)
    if random:
        random_weights(model, seed)
    elif os.path.isdir(name_or_path):
        load_weights(model, name_or_path)
    else:
        raise InputError(f"{name_or_path!r} is a model name, not a directory with weights: pass the "
                         f"checkpoint directory, or use random weights")
    return model
