"""Padded, chunked prefill (tuneforge/engine/generate.py): prompts padded to their length bucket and
the batch to its bucket, run in chunks of at most PREFILL_GRAPH_TOKENS tokens, give the logits and
tokens of the unpadded eager prefill. On the CPU the padded chunks run eagerly (no graphs): the
padding, chunking and indexing a prefill graph replays; on a GPU (-m gpu) the chunks replay as CUDA
graphs against the eager unpadded prefill."""
import pytest
import torch

from tuneforge.engine import generate as G
from tuneforge.engine.dispatch import Ops
from tuneforge.engine.generate import Generator
from tuneforge.models.configs import ModelConfig
from tuneforge.models.loading import load_model

DENSE = ModelConfig(name="tiny-qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                    max_position_embeddings=512)
MOE = ModelConfig(name="tiny-qwen3-moe", model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                  max_position_embeddings=512, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  norm_topk_prob=True)
PROMPTS = [[5, 3, 9, 1, 7], [42, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19]]   # 3 rows: pad row 3, pad tokens


def runs(cfg, mode, device, prompts=PROMPTS, steps=4, max_len=40, **kw):
    """(unpadded eager, padded) generations of the same model, and the padded generator."""
    model = load_model(cfg.name, config=cfg, random=True, dtype=torch.float32, device=device)
    eager = Generator(model, Ops(mode), max_batch=len(prompts), max_len=max_len, graphs=False, pad_prefill=False)
    padded = Generator(model, Ops(mode), max_batch=len(prompts), max_len=max_len, pad_prefill=True, **kw)
    return (eager.generate(prompts, steps, return_logits=True), padded.generate(prompts, steps, return_logits=True),
            padded)


def assert_same(a, b, tol=1e-5):
    assert a.tokens == b.tokens
    for x, y in zip(a.logits, b.logits):
        assert not y.isnan().any()
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_prefill_shape_pads_prompts_and_chunks_the_batch():
    model = load_model(DENSE.name, config=DENSE, random=True, dtype=torch.float32)
    gen = Generator(model, Ops("baseline"), max_batch=256, max_len=512, pad_prefill=True)
    assert [gen.prefill_shape(1, t) for t in (1, 16, 17, 25, 100, 129, 500)] == \
        [(1, 16), (1, 16), (1, 24), (1, 32), (1, 128), (1, 192), (1, 512)]     # 500 -> 512: the cache's slots
    assert [gen.prefill_shape(b, 128) for b in (3, 32, 64, 256)] == [(4, 128), (32, 128), (64, 128), (64, 128)]
    assert gen.prefill_shape(256, 300) == (16, 384)          # 16 x 384 = 6144 <= 8192 tokens a chunk
    assert G.PREFILL_LENGTHS[-1] == G.PREFILL_GRAPH_TOKENS == 8192


def test_a_prompt_past_the_largest_bucket_runs_unpadded_one_per_chunk():
    cfg = ModelConfig(**{**DENSE.__dict__, "max_position_embeddings": 16384})
    model = load_model(cfg.name, config=cfg, random=True, dtype=torch.float32)
    gen = Generator(model, Ops("baseline"), max_batch=2, max_len=9000, pad_prefill=True)
    assert gen.prefill_shape(2, 8193) == (1, 8193)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_padded_chunked_prefill_gives_the_eager_logits(cfg, monkeypatch):
    """Chunks of 32 padded tokens: prompts padded to 16 tokens, two chunks of 2 rows (the second with
    the pad row 3); a MoE model routes the pad tokens too, which changes no real token's experts."""
    monkeypatch.setattr(G, "PREFILL_GRAPH_TOKENS", 32)
    eager, padded, gen = runs(cfg, "baseline", "cpu")     # the Triton kernels' padded shapes: the GPU test
    assert gen.prefill_shape(3, 9) == (2, 16) and list(gen._chunks) == [(2, 16)]
    assert_same(eager, padded)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg, mode", [(DENSE, "baseline"), (DENSE, "default"), (MOE, "default")],
                         ids=["dense-torch", "dense-triton", "moe-triton"])
def test_graphed_prefill_matches_eager(cfg, mode, monkeypatch):
    """CUDA-graph prefill chunks (two chunks of one captured graph) == the eager unpadded prefill, and
    a second generation replays the same graphs to the same tokens and logits."""
    monkeypatch.setattr(G, "PREFILL_GRAPH_TOKENS", 32)
    eager, padded, gen = runs(cfg, mode, "cuda", graphs=True)
    assert gen.graphs and isinstance(gen._chunks[(2, 16)].graph, tuple)
    # other token counts than the unpadded run's: other tiles, other summation orders
    assert_same(eager, padded, tol=1e-3)
    graph = gen._chunks[(2, 16)].graph
    again = gen.generate(PROMPTS, 4, return_logits=True)
    assert gen._chunks[(2, 16)].graph is graph
    assert_same(padded, again)          # not bit for bit: the MoE combine adds in fp32 atomics
    # a prefill's logits are its own tensor, not the graph's output buffer the next replay overwrites
    first = gen.prefill(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    kept = first.clone()
    gen.prefill(torch.tensor([[7, 8, 9]]), torch.tensor([3]))
    assert torch.equal(first, kept)
