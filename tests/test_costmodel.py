"""The cost model's closed forms (tuneforge.dsl.roofline) must rank configs the way hardware does for the
effects they model; predict dispatches each op to its template's cost."""
import math
from dataclasses import replace

import pytest

from tuneforge.dsl import Problem, get
from tuneforge.dsl import roofline as cm
from tuneforge.dsl.devices import spec
from tuneforge.tune.costmodel import predict

H100, MI308X = spec("H100"), spec("MI308X")


def test_roofline_is_the_slower_of_compute_and_memory_plus_launch():
    launch = H100.launch_us * 1e-6 + cm.HBM_LATENCY_S      # a kernel's floor: launch gap + one round trip
    assert cm.kernel_floor(H100) == pytest.approx(launch)
    compute_bound = cm.roofline(1e12, 1e3, H100, "bf16")
    assert compute_bound == pytest.approx(1e12 / (989e12) + launch)
    memory_bound = cm.roofline(1e3, 1e9, H100, "bf16")
    assert memory_bound == pytest.approx(1e9 / (3350e9 * 0.90) + launch)
    assert cm.roofline(1e12, 1e3, H100, "bf16", efficiency=0.5) > compute_bound


def test_alpha_beta_matches_the_closed_forms():
    n, w = 8 * 2**20, 8
    alpha = H100.link_latency_us * 1e-6
    bw = 450e9 * cm.LINK_EFFICIENCY
    hbm = 3350e9 * 0.90
    assert cm.alpha_beta(n, w, H100, "one_shot") == pytest.approx(alpha + (w - 1) * n / bw + w * n / hbm)
    assert cm.alpha_beta(n, w, H100, "two_shot") == pytest.approx(2 * alpha + 2 * (w - 1) / w * n / bw + 2 * n / hbm)
    assert cm.alpha_beta(n, 1, H100, "one_shot") == 0.0
    # small messages: one-shot (one step) wins; large: two-shot (less traffic) wins
    assert cm.alpha_beta(32 * 1024, w, H100, "one_shot") < cm.alpha_beta(32 * 1024, w, H100, "two_shot")
    assert cm.alpha_beta(64 * 2**20, w, H100, "two_shot") < cm.alpha_beta(64 * 2**20, w, H100, "one_shot")
    with pytest.raises(ValueError, match="unknown collective"):
        cm.alpha_beta(n, w, H100, "butterfly")


def test_mesh_topology_gains_bandwidth_with_peers_nvswitch_does_not():
    n = 16 * 2**20
    mesh = replace(MI308X, link_latency_us=0.0)
    switch = replace(H100, link_latency_us=0.0, link_gbs=MI308X.link_gbs)
    # one-shot moves (w-1) n: on a mesh each peer has its own link, so the link term stays flat
    per_link_mesh = [cm.alpha_beta(n, w, mesh, "allgather") for w in (2, 4, 8)]
    per_link_switch = [cm.alpha_beta(n, w, switch, "allgather") for w in (2, 4, 8)]
    assert per_link_mesh[0] == pytest.approx(per_link_mesh[2])
    assert per_link_switch[2] == pytest.approx(7 * per_link_switch[0])


def test_overlap_hides_the_shorter_part_except_the_exposed_fraction():
    sync = H100.link_latency_us * 1e-6
    assert cm.overlap(10e-6, 4e-6, H100, 1.0) == pytest.approx(10e-6 + sync)
    assert cm.overlap(10e-6, 4e-6, H100, 0.0) == pytest.approx(14e-6 + sync)
    assert cm.overlap(10e-6, 4e-6, H100, 0.75) == pytest.approx(11e-6 + sync)
    assert cm.overlap(10e-6, 0.0, H100, 0.5) == pytest.approx(10e-6)


def test_gemm_wave_quantization_padding_and_small_m():
    cfg = dict(block_m=128, block_n=128, block_k=64, num_stages=3, num_warps=4)
    sms = H100.sms
    # compute-bound shape with exactly one wave vs one tile more: the extra tile costs a whole wave
    full = cm.gemm_config_time(128 * 12, 128 * sms // 12, 8192, cfg, H100)
    one_more = cm.gemm_config_time(128 * 12, 128 * sms // 12 + 1, 8192, cfg, H100)
    assert one_more > 1.5 * full
    # padding: n=4096+64 wastes half a column of 128-wide tiles, 64-wide tiles waste nothing
    n = 4096 + 64
    narrow = cm.gemm_config_time(8192, n, 4096, {**cfg, "block_n": 64}, H100)
    wide = cm.gemm_config_time(8192, n, 4096, cfg, H100)
    assert narrow != wide
    # decode (m=1, few output tiles): split-K adds programs in flight and wins
    slim = dict(block_m=16, block_n=128, block_k=128, num_stages=3, num_warps=4)
    assert cm.gemm_config_time(1, 1024, 5120, {**slim, "split_k": 4}, H100) < cm.gemm_config_time(1, 1024, 5120, slim, H100)
    # small M with 128-row tiles does 128x the padded math: never faster than 16-row tiles
    assert cm.gemm_config_time(16, 8192, 8192, slim, H100) <= cm.gemm_config_time(16, 8192, 8192, {**slim, "block_m": 128}, H100)


def test_predict_is_deterministic_distinguishes_configs_and_knows_the_baseline():
    p = Problem.make("gemm", m=64, n=10240, k=5120)
    configs = [dict(block_m=bm, block_n=bn, block_k=64, num_stages=3, num_warps=4) for bm in (16, 64, 128)
               for bn in (64, 128, 256)]
    times = [predict(None, p, c, H100) for c in configs]
    assert times == [predict(None, p, c, H100) for c in configs]
    assert len(set(times)) >= 6
    base = predict(None, p, None, H100)
    assert base == predict(None, p, {"baseline": True}, H100)
    flops, nbytes = 2 * 64 * 10240 * 5120, (64 * 5120 + 10240 * 5120 + 64 * 10240) * 2
    sol = max(flops / 989e12, nbytes / 3350e9)
    assert all(t > sol for t in times + [base])


@pytest.mark.parametrize("op,dims", [
    ("rmsnorm", dict(m=16, n=5120)), ("silu_mul", dict(m=16, n=3200)),
    ("rope_qk_norm", dict(m=16, heads=8, kv_heads=1, head_dim=128)),
    ("shared_expert_gate", dict(m=16, n=2048)),
    ("decode_attention", dict(m=16, heads=8, kv_heads=1, head_dim=128, ctx=4096)),
    ("allreduce", dict(m=16, n=5120)), ("allgather", dict(m=16, n=5120)),
    ("ag_gemm", dict(m=256, n=3200, k=5120)), ("gemm_rs", dict(m=256, n=5120, k=3200)),
    ("tp_mlp", dict(m=16, hidden=5120, inter=3200)), ("tp_attn", dict(m=16, hidden=5120, qkv=1280, o_in=1024)),
    ("moe_gemm", dict(m=16, n=1536, k=2048, experts=128, topk=8, act=1)),
])
def test_predict_without_a_template_dispatches_to_the_registered_ones_cost(op, dims):
    """One cost per op: the model has no copy of its own that could drift from the template's."""
    p = Problem.make(op, world=8, **dims)
    template = get(op)
    config = template.default_config(p, H100)
    assert predict(None, p, None, H100) == template.cost(p, None, H100)
    assert predict(None, p, config, H100) == template.cost(p, config, H100)
    assert math.isfinite(predict(None, p, config, H100)) and predict(None, p, config, H100) > 0


def test_predict_refuses_an_op_without_a_template():
    with pytest.raises(KeyError, match="no cost model for op 'conv2d'"):
        predict(None, Problem.make("conv2d", m=16, n=16), None, H100)


def test_tp_strategies_trade_places_with_message_size():
    """tp_mlp's cost: decode's one all-reduce beats gathering and scattering a single row; prefill's
    overlapped ag_rs beats two GEMMs followed by a two-shot all-reduce."""
    tp_mlp = get("tp_mlp")
    decode = Problem.make("tp_mlp", world=8, m=1, hidden=5120, inter=3200)
    prefill = Problem.make("tp_mlp", world=8, m=8192, hidden=5120, inter=3200)

    def time(p, strategy, **override):
        return predict(None, p, {**tp_mlp.default_config(p, H100, strategy=strategy), **override}, H100)
    assert time(decode, "gemm_ar") < time(decode, "ag_rs")
    assert time(prefill, "ag_rs") < time(prefill, "gemm_ar", ar_strategy="two_shot")


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def test_gemm_model_against_the_committed_h100_measurements():
    """Every config bench_gemm timed on an H100 (benchmarks/results, ~3000 points over 100 shapes):
    predicted vs measured times stay within a factor 1.25 on geometric average, the model's
    favourite config per shape is within 5 % of the measured best, and cuBLAS within 1.2x."""
    import glob
    import json
    import os
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    (path,) = sorted(glob.glob(os.path.join(root, "bench_gemm-NVIDIA_H100*.json")))[-1:]
    rows = json.load(open(path))["rows"]
    errors, pick_loss, baseline = [], [], []
    for r in rows:
        timed = [t for t in r["candidates"] if "us" in t]
        predicted = [(cm.gemm_config_time(r["m"], r["n"], r["k"], t["config"], H100) * 1e6, t["us"]) for t in timed]
        errors += [max(p / t, t / p) for p, t in predicted]
        pick_loss.append(min(predicted)[1] / min(t for _, t in predicted))
        p = cm.gemm_config_time(r["m"], r["n"], r["k"], None, H100) * 1e6
        baseline.append(max(p / r["cublas_us"], r["cublas_us"] / p))
    assert len(rows) >= 100 and len(errors) > 1000
    assert _geomean(errors) < 1.25
    assert _geomean(pick_loss) < 1.05
    assert _geomean(baseline) < 1.2
