"""All-reduce, all-gather and reduce-scatter against torch references in real multi-process worlds:
2 and 4 CPU ranks under Triton's interpreter (every op, strategy and variant; uneven row splits,
a rank with no rows), a rank that never signals (every waiting rank gets SignalTimeout, the world
ends), and on one GPU (``-m gpu``) 2 and 4 processes sharing it plus a CUDA-graph replay."""
import time

import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.check import compare, split_out
from tuneforge.errors import SignalTimeout
from tuneforge.world import spawn

from conftest import assert_graph_replays, channel_epochs, graph_replays, input_errors

OPS = ("allreduce", "allgather", "reducescatter")
DTYPES = ("fp32", "fp16", "bf16")


def _configs(op, problem, thorough):
    """Default config, then every strategy x variant with small tiles / two programs and (if
    thorough) with the largest tile / one program: each checked against the op's space."""
    template = get(op)
    space = template.space(problem)
    choices = {p.name: p.choices for p in space.params}
    strategies = choices.get("strategy", (None,))
    configs = [template.default_config(problem, None)]
    for strategy in strategies:
        for variant in choices["variant"]:
            base = {"variant": variant} if strategy is None else {"strategy": strategy, "variant": variant}
            programs = choices["comm_sms"][min(1, len(choices["comm_sms"]) - 1)]
            configs.append({**base, "block": choices["block"][0], "num_warps": 4, "comm_sms": programs})
            if thorough:
                configs.append({**base, "block": choices["block"][-1], "num_warps": 8, "comm_sms": 1})
    for c in configs:
        reason = template.reject_reason(c, problem, None)
        assert reason is None, f"{op} {c}: {reason}"
    return configs


def _check_all(world, shapes, dtypes, thorough):
    """On every rank: run each op/config on each shape and dtype, compare with the reference;
    also the baselines, the bit-identical all-reduce across ranks, and input validation."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 8 << 20)
    ctx = heap.context()
    failures, outputs, checked = [], [], 0
    for op in OPS:
        template = get(op)
        for i, (m, n) in enumerate(shapes):
            for j, dtype in enumerate(dtypes):
                problem = Problem.make(op, dtype, world.size, m=m, n=n)
                configs = _configs(op, problem, thorough)
                if not thorough:     # each config once, dtypes in rotation
                    configs = [c for k, c in enumerate(configs) if (k + i) % len(dtypes) == j]
                for config in configs:
                    inputs = template.make_inputs(problem, ctx.device, 1 + i, ctx)
                    result = check(template, problem, config, ctx=ctx, inputs=inputs)
                    checked += 1
                    if not result:
                        failures.append(f"{problem.key} {config}: {result.reason}")
                    if op == "allreduce":
                        outputs.append(inputs["out"].cpu())
                base = template.baseline(**split_out(inputs))
                ok = compare(base, template.reference(**split_out(inputs)), base.dtype)
                if not ok:
                    failures.append(f"baseline {problem.key}: {ok.reason}")
    x = torch.zeros(4, 8, device=ctx.device)
    errors = input_errors((lambda: get("allreduce").launch(x, ctx=ctx, out=torch.zeros(4, 9, device=ctx.device)),
                           lambda: get("allreduce").launch(x.t(), ctx=ctx),
                           lambda: get("allreduce").launch(x.to(torch.int32), ctx=ctx),
                           lambda: get("allreduce").launch(x, ctx=ctx, out=x),
                           lambda: get("allgather").launch(x, ctx=ctx, m=1)))
    epochs = channel_epochs(ctx, heap)
    return {"failures": failures, "checked": checked, "errors": errors, "epochs": epochs,
            "allreduce_bytes": [o.view(torch.uint8).numpy().tobytes() for o in outputs]}


def _assert_world_results(results):
    for rank, r in enumerate(results):
        assert not r["failures"], f"rank {rank}:\n" + "\n".join(r["failures"])
        assert r["checked"] > 0
        assert all(e != "no error" and "\n" not in e for e in r["errors"]), r["errors"]
        assert r["epochs"] == results[0]["epochs"]       # every call advanced every rank's epoch
    # tensor-parallel replicas must agree bit for bit
    assert all(r["allreduce_bytes"] == results[0]["allreduce_bytes"] for r in results)


# shapes: m not divisible by the world, m < world (a rank without rows), a multi-tile message
CPU_SHAPES = [(7, 40), (3, 24)]


def test_collectives_two_cpu_ranks():
    results = spawn(_check_all, 2, CPU_SHAPES[:1], DTYPES, True, timeout=600)
    _assert_world_results(results)


def test_collectives_four_cpu_ranks():
    results = spawn(_check_all, 4, CPU_SHAPES, DTYPES, False, timeout=600)
    _assert_world_results(results)


def _silent_rank(world, silent, catch):
    """All ranks run one all-reduce; then every rank but ``silent`` runs a second one, which
    ``silent`` never launches (never signals), as if it had died mid-run."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 20)
    ctx = heap.context()
    x = torch.ones(5, 8, device=ctx.device)
    config = {"strategy": "one_shot", "variant": "push", "block": 128, "num_warps": 4, "comm_sms": 2}
    get("allreduce").launch(x, ctx=ctx, config=config)     # together (first launch: compile + barrier)
    ctx.synchronize()
    ctx.channel("allreduce", 0).set_timeout(1.0)           # short, now that no rank is starting up
    message, start = None, time.monotonic()
    if world.rank != silent:
        try:
            get("allreduce").launch(x, ctx=ctx, config=config)
            ctx.check()          # the host check (on a GPU, after the kernel ends)
        except SignalTimeout as e:
            if not catch:
                raise
            message = str(e)
    elapsed = time.monotonic() - start
    world.barrier()              # the silent rank keeps its heap mapped until the others are done
    return message, elapsed


def _assert_timeouts(results, silent, bound):
    for rank, (message, elapsed) in enumerate(results):
        if rank == silent:
            assert message is None
            continue
        assert message is not None, f"rank {rank} got no SignalTimeout"
        assert message.startswith(f"rank {rank}: 'allreduce' timed out")
        assert f"from peer {silent}" in message and "signal 'data'" in message and "at epoch 2" in message
        assert elapsed < bound, f"rank {rank} took {elapsed:.1f}s to time out"


def test_every_rank_waiting_on_a_silent_rank_gets_signal_timeout():
    results = spawn(_silent_rank, 3, 2, True, timeout=300)
    _assert_timeouts(results, silent=2, bound=30)


def test_signal_timeout_ends_the_world_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(SignalTimeout, match=r"^rank 0: 'allreduce' timed out .* from peer 1 "):
        spawn(_silent_rank, 2, 1, False, timeout=300, grace=2.0)
    assert time.monotonic() - start < 120     # not the 300 s deadline: the failure ended the world


# --- one GPU shared by several processes --------------------------------------------------------------

GPU_SHAPES = [(37, 1536), (3, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_collectives_processes_sharing_one_gpu(ranks):
    # every config once (dtypes in rotation): each new config is a compile in every process
    results = spawn(_check_all, ranks, GPU_SHAPES, ("bf16", "fp32"), False, device="cuda",
                    share_gpu=True, timeout=540)
    _assert_world_results(results)


def _graph_replay(world, replays):
    """Capture two all-reduces in one CUDA graph; replay with new inputs, check every replay."""
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels.allreduce import allreduce, reference
    heap = SymmetricHeap(world, 32 << 20)
    ctx = heap.context()
    m, n = 33, 2048
    x = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
    outs = [torch.empty_like(x) for _ in range(2)]
    configs = [{"strategy": "one_shot", "variant": "push", "block": 1024, "num_warps": 4, "comm_sms": 8},
               {"strategy": "two_shot", "variant": "pull", "block": 2048, "num_warps": 8, "comm_sms": 4}]

    def refill(r):
        g = torch.Generator().manual_seed(100 * r + world.rank)
        x.copy_(torch.randn(m, n, generator=g).to(x.dtype))
    return graph_replays(ctx, heap, "allreduce", lambda out, config: allreduce(x, ctx=ctx, out=out, config=config),
                         outs, configs, replays, refill, lambda: reference(x, ctx), "strategy")


@pytest.mark.gpu
def test_allreduce_cuda_graph_replay_on_one_gpu():
    assert_graph_replays(_graph_replay, 5, launches=2)


@pytest.mark.gpu
def test_signal_timeout_on_one_gpu():
    results = spawn(_silent_rank, 2, 1, True, device="cuda", share_gpu=True, timeout=300)
    _assert_timeouts(results, silent=1, bound=60)
