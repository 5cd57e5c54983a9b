"""AllGather-GEMM and GEMM-ReduceScatter against torch references in real multi-process worlds:
2 and 4 CPU ranks under Triton's interpreter (default config, every variant / signal granularity /
chunk order / gather and reduction placement, configs sampled from the space; fp32, fp16, bf16; m not
divisible by world x tile, a rank without rows), input errors, a silent rank (SignalTimeout), the
cost model at the tuning plan's shapes; on one GPU (``-m gpu``) 2 and 4 processes sharing it at
Qwen3-32B TP shapes, TMA on and off, and a CUDA-graph capture + replay of an AG-GEMM."""
import math
import random
import time

import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.check import compare, split_out
from tuneforge.errors import ConfigRejected, InputError, SignalTimeout
from tuneforge.world import spawn

from conftest import assert_graph_replays, channel_epochs, graph_replays

OPS = ("ag_gemm", "gemm_rs")
DTYPES = ("fp32", "fp16", "bf16")
TILES = dict(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=2, tma=False)
# (variant, signal, order, comm_sms, reduce): every choice of the communication sub-space
COMM = [("push", "tile", "prev", 1, "fused"), ("pull", "tile", "next", 2, "consumer"),
        ("push", "chunk", "next", 2, "consumer"), ("pull", "chunk", "prev", 1, "fused"),
        ("pull", "rank", "next", 2, "fused"), ("push", "rank", "prev", 1, "consumer")]


def sample_config(space, rng: random.Random) -> dict:
    """A random config of ``space`` (conditional parameters drawn only where active)."""
    config = {}
    for p in space.params:
        if p.active(config):
            config[p.name] = rng.choice(p.choices)
    return config


def op_configs(op: str, problem: Problem, spec=None, samples: int = 2, seed: int = 0, tiles: dict = TILES):
    """Default config, the COMM list on ``tiles``, and ``samples`` configs drawn from the space,
    each accepted by the template's constraints (those the shape rejects are left out)."""
    template = get(op)
    configs = [template.default_config(problem, spec)]
    for variant, signal, order, comm_sms, reduce in COMM:
        c = dict(tiles, variant=variant, signal=signal, order=order, comm_sms=comm_sms)
        if signal == "chunk":
            c["chunk_tiles"] = 2
        if op == "gemm_rs":
            c["reduce"] = reduce
        else:      # the gather by a copy kernel on a side stream where the GEMM-RS reduces in a consumer
            c["gather"] = "side_stream" if reduce == "consumer" else "fused"
        configs.append(c)
    rng, space, drawn = random.Random(seed), template.space(problem), 0
    for _ in range(200):
        if drawn == samples:
            break
        c = sample_config(space, rng)
        if spec is None:
            c["tma"] = False
        if template.reject_reason(c, problem, spec) is None:
            configs.append(c)
            drawn += 1
    return [c for c in configs if template.reject_reason(c, problem, spec) is None]


def _check_world(world, shapes, dtypes, samples=2):
    """On every rank: each op's configs against the reference, each config once over the (shape,
    dtype) grid; the baselines, input errors; returns what every rank saw."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 8 << 20)
    ctx = heap.context()
    seen = {"failures": [], "checked": 0, "covered": set()}
    for op in OPS:
        template = get(op)
        for i, (m, n, k) in enumerate(shapes):
            for j, dtype in enumerate(dtypes):
                problem = Problem.make(op, dtype, world.size, m=m, n=n, k=k)
                configs = op_configs(op, problem, samples=samples, seed=i)
                cell, cells = i * len(dtypes) + j, len(shapes) * len(dtypes)
                configs = [c for q, c in enumerate(configs) if q % cells == cell]
                _check_configs(ctx, template, problem, configs, 1 + i, seen, "order")
                inputs = split_out(template.make_inputs(problem, ctx.device, 1 + i, ctx))
                base = template.baseline(**inputs)
                # the baseline rounds after every addition of its reduction: a world's worth of roundings
                ok = compare(base, template.reference(**inputs), base.dtype, scale=world.size)
                if not ok:
                    seen["failures"].append(f"baseline {problem.key}: {ok.reason}")
    return _world_result(ctx, heap, seen)


def _check_configs(ctx, template, problem, configs, seed, seen, extra_key):
    """Check each config against the reference on inputs of ``seed``; count into ``seen``, and cover
    (op, variant, signal, ``config[extra_key]``, its reduce or gather)."""
    for config in configs:
        inputs = template.make_inputs(problem, ctx.device, seed, ctx)
        result = check(template, problem, config, ctx=ctx, inputs=inputs)
        seen["checked"] += 1
        seen["covered"].add((template.op, config["variant"], config["signal"], config[extra_key],
                             config.get("reduce", config.get("gather"))))
        if not result:
            seen["failures"].append(f"{problem.key} {config}: {result.reason}")


def _world_result(ctx, heap, seen: dict) -> dict:
    """What a rank saw (``seen``), its input errors and channel epochs; closes the heap."""
    seen["errors"] = _input_errors(ctx)
    seen["epochs"] = channel_epochs(ctx, heap)
    return seen


def _input_errors(ctx):
    """Each call must raise a one-line InputError / ConfigRejected."""
    from tuneforge.kernels.allgather_gemm import allgather_gemm
    from tuneforge.kernels.gemm_reducescatter import gemm_reducescatter
    dev, r = ctx.device, ctx.rank
    rows = 5 // ctx.size + (1 if r < 5 % ctx.size else 0)
    x, w = torch.zeros(rows, 8, device=dev), torch.zeros(16, 8, device=dev)
    full = torch.zeros(5, 8, device=dev)
    calls = [
        lambda: allgather_gemm(x, w, ctx=ctx),                                        # no m
        lambda: allgather_gemm(torch.zeros(rows + 1, 8, device=dev), w, ctx=ctx, m=5),  # wrong share
        lambda: allgather_gemm(x, torch.zeros(16, 9, device=dev), ctx=ctx, m=5),      # k differs
        lambda: allgather_gemm(x, w.half(), ctx=ctx, m=5),                            # dtype differs
        lambda: allgather_gemm(x, w, ctx=ctx, out=torch.zeros(5, 15, device=dev)),    # out shape
        lambda: allgather_gemm(x, w, ctx=ctx, m=5, config={"variant": "sideways"}),   # not a config
        lambda: gemm_reducescatter(full, w, ctx=ctx, out=torch.zeros(5, 16, device=dev)),
        lambda: gemm_reducescatter(full.to(torch.int32), w, ctx=ctx),
        lambda: gemm_reducescatter(full.t(), torch.zeros(16, 5, device=dev), ctx=ctx),
        lambda: gemm_reducescatter(full, w, ctx=ctx, config=dict(TILES, variant="push", signal="tile",
                                                                 order="next", comm_sms=1, reduce="nowhere")),
    ]
    out = []
    for call in calls:
        try:
            call()
            out.append("no error")
        except (InputError, ConfigRejected) as e:
            out.append(str(e))
    return out


def _assert_world(results, must_cover=True):
    for rank, r in enumerate(results):
        assert not r["failures"], f"rank {rank}:\n" + "\n".join(r["failures"])
        assert r["checked"] > 0
        assert all(e != "no error" and "\n" not in e for e in r["errors"]), r["errors"]
        assert r["epochs"] == results[0]["epochs"]        # every launch advanced every rank's epoch
    if must_cover:
        covered = results[0]["covered"]
        for op in OPS:
            for part, choices in ((1, ("push", "pull")), (2, ("rank", "chunk", "tile")), (3, ("next", "prev"))):
                for choice in choices:
                    assert any(c[0] == op and c[part] == choice for c in covered), (op, choice)
        assert {c[4] for c in covered if c[0] == "gemm_rs"} == {"fused", "consumer"}
        assert {c[4] for c in covered if c[0] == "ag_gemm"} == {"fused", "side_stream"}


def test_overlap_two_cpu_ranks():
    # m=70: shares of 35 rows = 3 blocks of 16 (chunk signals of 2 blocks); k=40: a partial K block
    results = spawn(_check_world, 2, [(70, 24, 40)], DTYPES, timeout=900)
    _assert_world(results)


def test_overlap_four_cpu_ranks():
    # m=37: uneven shares (10, 9, 9, 9); m=3: a rank without rows
    results = spawn(_check_world, 4, [(37, 16, 32), (3, 24, 16)], ("bf16", "fp32"), 0, timeout=900)
    _assert_world(results, must_cover=False)


def _silent_rank(world, silent):
    """All ranks run an AG-GEMM (which sets up its channels), then every rank but ``silent`` runs a
    second one; ``silent`` never launches it."""
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels.allgather_gemm import allgather_gemm
    heap = SymmetricHeap(world, 1 << 20)
    ctx = heap.context()
    x, w = torch.ones(4, 16, device=ctx.device), torch.ones(16, 16, device=ctx.device)
    allgather_gemm(x, w, ctx=ctx, m=4 * world.size)
    ctx.synchronize()
    ctx.channel("ag_gemm", 0).set_timeout(1.0)
    message = None
    if world.rank != silent:
        try:
            allgather_gemm(x, w, ctx=ctx, m=4 * world.size)
            ctx.check()
        except SignalTimeout as e:
            message = str(e)
    world.barrier()
    return message


def test_silent_rank_gives_signal_timeout():
    start = time.monotonic()
    messages = spawn(_silent_rank, 2, 1, timeout=300)
    assert messages[1] is None
    assert messages[0].startswith("rank 0: 'ag_gemm' timed out") and "from peer 1" in messages[0]
    assert time.monotonic() - start < 120


def test_costs_at_the_tuning_plan_shapes():
    """Qwen3-32B's TP linears as AG-GEMM / GEMM-RS problems: on an H100 the default config passes
    every constraint, the space has every communication choice, the cost model gives finite positive
    times, and at prefill size finer signals are predicted to hide more of the transfer."""
    from tuneforge.dsl.devices import DEFAULT_TARGET, SPECS
    spec = SPECS[DEFAULT_TARGET]
    for tp in (2, 8):
        for m in (1, 128, 8192):
            for op, n, k in (("ag_gemm", 2 * 25600 // tp, 5120), ("ag_gemm", 10240 // tp, 5120),
                             ("gemm_rs", 5120, 25600 // tp), ("gemm_rs", 5120, 8192 // tp)):
                template, problem = get(op), Problem.make(op, "bf16", tp, m=m, n=n, k=k)
                config = template.default_config(problem, spec)
                assert template.reject_reason(config, problem, spec) is None, (problem.key, config)
                assert {"variant", "signal", "chunk_tiles", "order", "comm_sms"} <= set(template.space(problem).names)
                for c in (config, None):
                    t = template.cost(problem, c, spec)
                    assert 0 < t < 1 and math.isfinite(t), (problem.key, c, t)
                if m == 8192:
                    coarse = template.cost(problem, dict(config, signal="rank"), spec)
                    assert template.cost(problem, dict(config, signal="tile"), spec) < coarse


# --- one GPU shared by several processes --------------------------------------------------------------

# Qwen3-32B at TP 8: qkv (n=1280, k=5120) for the AG-GEMM, o_proj (n=5120, k=1024) for the GEMM-RS;
# m=333 is not a multiple of 4 x 64-row tiles
GPU_SHAPES = {"ag_gemm": [(333, 1280, 5120), (5, 1280, 5120)], "gemm_rs": [(333, 5120, 1024), (5, 5120, 1024)]}


def _gpu_world(world, dtypes):
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels.gemm import launch_spec
    heap = SymmetricHeap(world, 256 << 20)
    ctx = heap.context()
    spec = launch_spec(ctx.device)
    seen = {"failures": [], "checked": 0, "covered": set()}
    for op in OPS:
        template = get(op)
        for i, (m, n, k) in enumerate(GPU_SHAPES[op]):
            for dtype in dtypes:
                problem = Problem.make(op, dtype, world.size, m=m, n=n, k=k)
                configs = []
                for tma in (False, True):
                    tiles = dict(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3, tma=tma)
                    configs += op_configs(op, problem, spec, samples=1, seed=i + 10 * tma, tiles=tiles)[tma:]
                _check_configs(ctx, template, problem, configs, 1 + i, seen, "tma")
    return _world_result(ctx, heap, seen)


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_overlap_processes_sharing_one_gpu(ranks):
    results = spawn(_gpu_world, ranks, ("bf16", "fp32"), device="cuda", share_gpu=True, timeout=600)
    _assert_world(results, must_cover=False)
    covered = results[0]["covered"]
    from tuneforge.kernels.gemm import launch_spec
    if "tma" in launch_spec(torch.device("cuda", 0)).features:
        assert {c[3] for c in covered} == {False, True}             # pointer loads and TMA both ran
    assert {c[4] for c in covered if c[0] == "gemm_rs"} == {"fused", "consumer"}
    assert {c[4] for c in covered if c[0] == "ag_gemm"} == {"fused", "side_stream"}


def _graph_replay(world, replays):
    """Capture two AG-GEMMs (push with the kernel's own comm programs + TMA; pull by a copy kernel on
    a side stream) in one CUDA graph; replay with new inputs, check each."""
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.dsl.comm import row_split
    from tuneforge.kernels.allgather_gemm import allgather_gemm, reference
    heap = SymmetricHeap(world, 64 << 20)
    ctx = heap.context()
    m, n, k = 301, 1280, 5120
    rows = row_split(m, world.size)[world.rank][1]
    x = torch.empty(rows, k, dtype=torch.bfloat16, device=ctx.device)
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(world.rank)) / k ** 0.5).to(x.dtype).to(x.device)
    outs = [torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in range(2)]
    base = dict(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3, comm_sms=8)
    configs = [dict(base, tma=True, variant="push", signal="tile", order="prev", gather="fused"),
               dict(base, tma=False, variant="pull", signal="chunk", chunk_tiles=2, order="next", gather="side_stream")]
    x.zero_()

    def refill(r):
        g = torch.Generator().manual_seed(100 * r + world.rank)
        x.copy_(torch.randn(rows, k, generator=g).to(x.dtype))
    return graph_replays(ctx, heap, "ag_gemm", lambda out, config: allgather_gemm(x, w, ctx=ctx, m=m, out=out, config=config),
                         outs, configs, replays, refill, lambda: reference(x, w, ctx, m), "variant")


@pytest.mark.gpu
def test_allgather_gemm_cuda_graph_replay_on_one_gpu():
    assert_graph_replays(_graph_replay, 4, launches=2)
