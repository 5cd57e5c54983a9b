"""Chained launches (``kernels/_common.chained``: programmatic dependent launch on sm_90+): a kernel may
start while the one before it drains, so every chained kernel must wait for its producer's stores.
On a Hopper GPU a decode-like chain (each kernel reading the one before: a long GEMM, then short row
ops, attention, routing and experts) captured in a CUDA graph and replayed on fresh inputs equals the
same chain launched unchained; a kernel reading before it waits would read the last replay's values.
On the CPU: nothing is chained, and every chained kernel still compiles for sm_90 with PDL on."""
from types import SimpleNamespace

import pytest
import torch

from conftest import compile_for_sm90
from tuneforge.kernels import _common as C


def test_only_a_cuda_tensor_on_a_chaining_device_chains_and_not_when_switched_off(monkeypatch):
    import tuneforge
    on = {"PDL": True, "launch_pdl": True}
    off = {"PDL": False, "launch_pdl": False}
    cuda = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))    # a tensor's two fields chained reads
    monkeypatch.setattr(C, "_has_dependent_launch", lambda index: True)
    monkeypatch.setattr(tuneforge, "INTERPRETED", False)
    assert C.chained(cuda) == on
    assert C.chained(torch.zeros(1)) == off                    # a CPU tensor
    monkeypatch.setattr(C, "CHAINED", False)                  # TUNEFORGE_PDL=0
    assert C.chained(cuda) == off
    monkeypatch.setattr(C, "CHAINED", True)
    monkeypatch.setattr(tuneforge, "INTERPRETED", True)       # Triton's interpreter has no dependent launch
    assert C.chained(cuda) == off
    monkeypatch.setattr(tuneforge, "INTERPRETED", False)
    monkeypatch.setattr(C, "_has_dependent_launch", lambda index: False)    # before Hopper
    assert C.chained(cuda) == off


def test_chained_kernels_compile_for_sm90_with_pdl_on():
    ptr = {a: "*bf16" for a in ("x", "w", "y", "x_ptr", "y_ptr", "w_ptr", "res_ptr", "res_out_ptr")}
    compile_for_sm90("tuneforge.kernels._gemm_gemv",
                     [("_gemv_kernel", dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=256, EVEN_K=True, ONE_TILE=False, PDL=True))],
                     ptr)
    compile_for_sm90("tuneforge.kernels.moe_gemm",
                     [("_moe_gemv_kernel", dict(TOP_K=8, GATHER=False, SILU_MUL=False, WEIGHTED=True, COMBINE=True,
                                                BLOCK_N=4, BLOCK_K=1024, BLOCK_SLOTS=8, EVEN_K=False, ONE_TILE=True,
                                                PDL=True))],
                     {**ptr, "topk_ids": "*i32", "routed_weights": "*fp32"})
    compile_for_sm90("tuneforge.kernels.rmsnorm",
                     [("_rmsnorm_kernel", dict(HAS_RESIDUAL=True, SINGLE_PASS=True, BLOCK_N=1024, ROWS=1, PDL=True))],
                     ptr)


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="programmatic dependent launch needs a Hopper (sm_90+) GPU")


def _decode_chain(x, p):
    """One decode-like step's kernels, each reading the previous one's output."""
    from tuneforge.kernels import decode_attention as DA, gemm as G, moe_gemm as MG, moe_router as MR
    from tuneforge.kernels import rmsnorm as RN, rope as RP, silu_mul as SM
    h = RN.rmsnorm(x, p["norm"], residual=p["residual"])             # residual += x in place
    qkv = G.gemm(h, p["qkv"])                                          # default: gemv at 1-2 rows
    RP.rope_qk_norm(qkv, p["positions"], p["q_norm"], p["k_norm"], heads=8, kv_heads=2,
                    out=qkv[:, :10 * 128])
    q = qkv[:, :8 * 128].reshape(-1, 8, 128)
    attn = DA.decode_attention(q.contiguous(), p["k"], p["v"], p["lengths"], config=p["attn_config"])
    o = G.gemm(attn.reshape(x.shape[0], -1), p["o"], config=p["split_k"], residual=p["residual"])
    act = SM.silu_mul(G.gemm(o, p["gate_up"]))
    logits = G.gemm(act, p["router"])
    weights, ids = MR.route(logits, 4, norm_topk_prob=True)
    up = MG.moe_gemm(act, p["experts_up"], ids, top_k=4, gather=True, activation="silu_mul")
    return MG.moe_gemm(up, p["experts_down"], ids, top_k=4, gather=False, routed_weights=weights, combine=True)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("tokens", [1, 4])
def test_a_chained_decode_chain_in_a_cuda_graph_equals_it_unchained(tokens, monkeypatch):
    from tuneforge.kernels import decode_attention as DA
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=dev) * scale).to(dt)
    hidden, ctx, experts = 4096, 8192, 16
    p = dict(norm=randn(hidden), qkv=randn(12 * 128, hidden, scale=hidden ** -0.5), q_norm=randn(128),
             k_norm=randn(128), o=randn(hidden, 8 * 128, scale=(8 * 128) ** -0.5),
             gate_up=randn(2 * 1024, hidden, scale=hidden ** -0.5), router=randn(experts, 1024, scale=1 / 32),
             experts_up=randn(experts, 2 * 512, 1024, scale=1 / 32), experts_down=randn(experts, 1024, 512, scale=1 / 23),
             k=randn(tokens, 2, ctx, 128), v=randn(tokens, 2, ctx, 128),
             positions=torch.full((tokens,), ctx - 1, device=dev, dtype=torch.int64),
             lengths=torch.arange(ctx - tokens, ctx, device=dev))
    problem = DA.Problem.make(DA.OP, "bf16", m=tokens, heads=8, kv_heads=2, head_dim=128, ctx=ctx)
    p["attn_config"] = dict(DA.default_config(problem, C.launch_spec(dev)), splits=16)
    assert DA.split_count(ctx, p["attn_config"]) > 1           # the split kernel and the combine
    p["split_k"] = dict(block_m=16, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3,
                        schedule="tiles", split_k=4, programs_per_sm=1, tma=False, flatten=False)
    xs = [randn(tokens, hidden) for _ in range(6)]
    residuals = [randn(tokens, hidden) for _ in range(6)]

    def unchained(i):
        monkeypatch.setattr(C, "CHAINED", False)
        p["residual"] = residuals[i].clone()
        out = _decode_chain(xs[i], p).clone()
        monkeypatch.setattr(C, "CHAINED", True)
        return out, p["residual"].clone()
    expected = [unchained(i) for i in range(len(xs))]

    x, p["residual"] = xs[0].clone(), residuals[0].clone()
    for _ in range(2):
        _decode_chain(x, p)                                            # compile and warm the chained kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _decode_chain(x, p)
    for _ in range(3):
        for i in range(len(xs)):
            x.copy_(xs[i])
            p["residual"].copy_(residuals[i])
            graph.replay()
            torch.cuda.synchronize()
            # the same kernels' arithmetic: a read before its producer finished would see another input's
            torch.testing.assert_close(out, expected[i][0], rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(p["residual"], expected[i][1], rtol=0, atol=0)
