"""Expert parallelism in the engine (the ``ep`` MoE layout, ``Shard.moe``): each rank loads only its
experts [r E / N, (r + 1) E / N), whole, from both checkpoint layouts (one tensor per expert; transformers
5's fused tensors) and from random weights; bad layouts refused in one line; a 2-rank EP engine run on a
tiny Qwen3-MoE checkpoint from save_pretrained equal to TP 1 (prefill logits + 16 greedy tokens)."""
import dataclasses

import pytest
import torch

from test_moe_model import TINY_MOE, checkpoint, fused_checkpoint  # noqa: F401  (checkpoint: the fixture)
from tuneforge.errors import InputError
from tuneforge.models.configs import load_config
from tuneforge.models.loading import load_model, load_weights, random_weights
from tuneforge.models.qwen3 import Qwen3, Shard, SparseMoE

EP = 2


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_each_rank_loads_only_its_experts_whole(checkpoint, tmp_path, layout):
    path, hf = checkpoint
    if layout == "fused":
        path = fused_checkpoint(hf, tmp_path / "fused")
    cfg, sd = load_config(path), hf.state_dict()
    local = TINY_MOE["num_experts"] // EP
    for r in range(EP):
        model = Qwen3(cfg, Shard(r, EP, moe="ep"), torch.float32)
        names = {t.name for t in model.checkpoint_tensors(fused_experts=layout == "fused")}
        if layout == "per_expert":     # the other rank's experts are never read
            other = range((1 - r) * local, (2 - r) * local)
            assert not {n for n in names for x in other if f".experts.{x}." in n}
        load_weights(model, path)
        for i in (0, 2):        # the sparse layers (layer 1 is dense: mlp_only_layers)
            moe, p = model.layers[i].mlp, f"model.layers.{i}.mlp."
            assert (moe.placed, moe.first, moe.local, moe.inter) == (True, r * local, local, cfg.moe_intermediate_size)
            assert torch.equal(moe.gate_up, sd[p + "experts.gate_up_proj"][r * local:(r + 1) * local])
            assert torch.equal(moe.down, sd[p + "experts.down_proj"][r * local:(r + 1) * local])
            assert torch.equal(moe.router, sd[p + "gate.weight"])


def test_random_weights_place_the_experts_of_the_tp1_model():
    cfg = dataclasses.replace(load_config("Qwen3-30B-A3B"), **{**TINY_MOE, "mlp_only_layers": ()})
    whole = Qwen3(cfg, Shard(), torch.float32)
    random_weights(whole, seed=3)
    for r in range(EP):
        placed = Qwen3(cfg, Shard(r, EP, moe="ep"), torch.float32)
        random_weights(placed, seed=3)
        a, b = whole.layers[0].mlp, placed.layers[0].mlp
        rows = slice(b.first, b.first + b.local)
        assert torch.equal(a.gate_up[rows], b.gate_up) and torch.equal(a.down[rows], b.down)


def test_bad_ep_layouts_are_refused_in_one_line():
    cfg = load_config("Qwen3-30B-A3B")          # 128 experts
    with pytest.raises(InputError, match=r"^num_experts=128 does not split over EP=3 ranks \(use the tp MoE "
                                         r"layout\)$"):
        SparseMoE(cfg, Shard(0, 3, moe="ep"), torch.float32, "meta")
    with pytest.raises(InputError, match=r"^unknown MoE layout 'dp'; expected one of tp, ep$"):
        Shard(0, 2, moe="dp")
    # at TP 1 the ep layout is the only one there is: every expert whole
    moe = SparseMoE(cfg, Shard(0, 1, moe="ep"), torch.float32, "meta")
    assert (moe.placed, moe.local, moe.first) == (False, 128, 0)
