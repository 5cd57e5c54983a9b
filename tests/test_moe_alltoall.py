"""Expert-parallel dispatch / combine (``moe_alltoall``) in real 2- and 4-rank CPU worlds under Triton's
interpreter, against a host computation from every rank's gathered inputs: the received rows, their
meta and counts exactly; the combine of the stand-in experts and of identity experts (y = x gives
sum of the valid weights times x); uniform and skewed routing (ranks receiving nothing), experts with
no tokens, dropped (-1) ids, top-k 1/2/8; both forms, each case called twice (low-latency, then staged
on the same channels: epochs, no clearing). The torch.distributed baseline and the template's check; a
silent rank gives SignalTimeout naming rank, peer and signal (a low-latency dispatch, a staged
combine); the kernels compile for sm_90 (what the interpreter forgives). On one GPU (``-m gpu``): the
same cases with 2 and 4 processes sharing it."""

import pytest
import torch

from conftest import channel_epochs, compile_for_sm90, input_errors
from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.check import compare, split_out
from tuneforge.errors import SignalTimeout
from tuneforge.kernels import moe_alltoall as A2A
from tuneforge.world import spawn

OP = "moe_alltoall"
CONFIG = {"form": "low_latency", "block": 16, "num_warps": 4, "comm_sms": 2}   # 16 < hidden 20: two masked chunks
STAGED = {"form": "staged", "block": 16, "num_warps": 4, "comm_sms": 2, "signal_rows": 16}
# each case: low_latency, then staged on the same channels (the next case reuses the parity areas)
CALLS = (CONFIG, STAGED)


def _expected(world, me, xs, idss, experts):
    """What rank ``me`` receives: rows grouped by source rank, then in (token, slot) order."""
    local = experts // world
    rows, meta = [], []
    for s in range(world):
        for e, expert in enumerate(idss[s].reshape(-1).tolist()):
            if 0 <= expert < experts and expert // local == me:
                t, j = divmod(e, idss[s].shape[1])
                rows.append(xs[s][t])
                meta.append([expert - me * local, s, t, j])
    counts = [[int(sum(1 for e in idss[s].reshape(-1).tolist() if 0 <= e < experts and e // local == d))
               for d in range(world)] for s in range(world)]
    return rows, torch.tensor(meta, dtype=torch.int32).view(-1, 4), torch.tensor(counts, dtype=torch.int32)


def _cases(world, cases):
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 4 << 20)
    ctx = heap.context()
    failures, received = [], []
    for i, (tokens, experts, top_k, skew, drop) in enumerate(cases):
        g = torch.Generator().manual_seed(1000 * i + world.rank)
        ids, weights = A2A.routing(tokens, experts, top_k, g, skew)
        x = torch.randn(tokens, 20, generator=g)
        for call, config in enumerate(CALLS):
            if drop and call == 1:
                # an entry for no expert: neither sent nor summed (its combine slot still holds call 0's row)
                ids[0, -1] = -1
            xs, idss = world.all_gather(x), world.all_gather(ids)
            rows, meta, counts = _expected(world.size, world.rank, xs, idss, experts)
            valid = (ids >= 0) & (ids < experts)
            dx, dids, dweights = (t.to(ctx.device) for t in (x, ids, weights))
            d = A2A.dispatch(dx, dids, ctx=ctx, experts=experts, config=config)
            n = int(d.count)
            tag = f"case {i} call {call} ({config['form']}) rank {world.rank}"
            if n != len(rows) or not torch.equal(d.counts.cpu(), counts):
                failures.append(f"{tag}: received {n} rows, expected {len(rows)}; counts {d.counts.tolist()}")
                continue
            if n and not torch.equal(d.x[:n].cpu(), torch.stack(rows)):
                failures.append(f"{tag}: received rows differ")
            if not torch.equal(d.meta[:n].cpu(), meta) or not bool((d.expert[n:] == -1).all()):
                failures.append(f"{tag}: meta {d.meta[:n].tolist()} != {meta.tolist()} or rows past count not -1")
            out = A2A.combine(A2A.expert_stand_in(d, world.rank), dweights, d, ctx=ctx, config=config)
            ok = compare(out, A2A.reference(x, ids, weights, ctx, experts))
            if not ok:
                failures.append(f"{tag}: combine of the stand-in experts: {ok.reason}")
            same = A2A.combine(d.x, dweights, d, ctx=ctx, config=config)       # identity experts
            ok = compare(same, x.double() * (weights.double() * valid).sum(1, keepdim=True))
            if not ok:
                failures.append(f"{tag}: combine of identity experts: {ok.reason}")
        received.append(n)
    # the template: the round trip checked, and the baseline, on the problem's own inputs
    problem = Problem.make(OP, "fp32", world.size, m=3, hidden=20, experts=2 * world.size, topk=2)
    template = get(OP)
    for config in (template.default_config(problem), CONFIG, STAGED):
        result = check(template, problem, config, device=ctx.device, ctx=ctx)
        if not result:
            failures.append(f"template {config}: {result.reason}")
    inputs = split_out(template.make_inputs(problem, ctx.device, 3, ctx))
    ok = compare(template.baseline(**inputs), template.reference(**inputs))
    if not ok:
        failures.append(f"baseline: {ok.reason}")
    epochs = channel_epochs(ctx, heap)
    return failures, received, epochs


def _assert_world(results):
    for failures, _, epochs in results:
        assert not failures, "\n".join(failures)
        assert epochs == results[0][2]


def test_dispatch_and_combine_match_the_host_on_two_ranks():
    # (tokens, experts, top_k, skew, drop an entry): uniform k=2; k=1 with 8 experts for 3 tokens (experts
    # with no tokens); k=8 over all 8 experts; skewed so hard that every entry goes to rank 0
    cases = [(5, 4, 2, 0.0, True), (3, 8, 1, 0.0, False), (2, 8, 8, 0.0, False), (4, 4, 1, 50.0, False)]
    results = spawn(_cases, 2, cases, timeout=300)
    _assert_world(results)
    assert [r[1][3] for r in results] == [8, 0]        # the skewed case: rank 1 receives nothing


def test_dispatch_and_combine_match_the_host_on_four_ranks():
    cases = [(3, 8, 2, 0.0, True), (2, 8, 8, 0.0, False), (3, 8, 2, 50.0, False)]
    results = spawn(_cases, 4, cases, timeout=300)
    _assert_world(results)
    assert [r[1][2] for r in results] == [24, 0, 0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_dispatch_and_combine_on_processes_sharing_one_gpu(ranks):
    cases = [(5, 8, 2, 0.0, True), (3, 8, 1, 0.0, False), (2, 8, 8, 0.0, False), (4, 8, 2, 50.0, False)]
    results = spawn(_cases, ranks, cases, device="cuda", share_gpu=True, timeout=540)
    _assert_world(results)
    assert [r[1][3] for r in results] == [8 * ranks] + [0] * (ranks - 1)    # all to experts 0 and 1


def _silent_rank(world, silent):
    """All ranks dispatch once together; then every rank but ``silent`` dispatches again (low-latency),
    which ``silent`` never does. After a collective reset all dispatch again (staged), and every rank
    but ``silent`` combines (staged), which ``silent`` never does; after a reset the op works again."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 20)
    ctx = heap.context()
    g = torch.Generator().manual_seed(world.rank)
    ids, weights = A2A.routing(3, 4, 2, g)
    x = torch.randn(3, 20, generator=g)
    A2A.dispatch(x, ids, ctx=ctx, experts=4, config=CONFIG)
    ctx.synchronize()
    messages = []
    for direction, config in (("dispatch", CONFIG), ("combine", STAGED)):
        d = A2A.dispatch(x, ids, ctx=ctx, experts=4, config=config) if direction == "combine" else None
        channel = ctx.channel(f"{OP}.{direction}", 0)
        channel.set_timeout(1.0)
        if world.rank != silent:
            try:
                if d is None:
                    A2A.dispatch(x, ids, ctx=ctx, experts=4, config=config)
                else:
                    A2A.combine(d.x, weights, d, ctx=ctx, config=config)
            except SignalTimeout as e:
                messages.append(str(e))
        world.barrier()
        channel.reset()
        channel.set_timeout(30.0)
    d = A2A.dispatch(x, ids, ctx=ctx, experts=4, config=STAGED)
    same = A2A.combine(d.x, weights, d, ctx=ctx, config=STAGED)
    ok = compare(same, x.double() * weights.double().sum(1, keepdim=True))
    heap.close()
    return messages, int(d.count), ok.reason


def test_a_silent_rank_gives_signal_timeout_naming_rank_peer_and_signal():
    (messages, count0, ok0), (silent, count1, ok1) = spawn(_silent_rank, 2, 1, timeout=120)
    assert silent == []
    dispatch, combine = messages
    assert dispatch.startswith(f"rank 0: '{OP}.dispatch' timed out"), dispatch
    assert "signal 'counts' (slot 0) from peer 1 at epoch 2" in dispatch, dispatch
    assert combine.startswith(f"rank 0: '{OP}.combine' timed out"), combine
    assert "signal 'rows' (slot 0) from peer 1 at epoch 1" in combine, combine
    assert count0 + count1 == 2 * 3 * 2 and ok0 == ok1 == ""


def _bad_inputs(world):
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 20)
    ctx = heap.context()
    ids, weights = A2A.routing(3, 4, 2, torch.Generator().manual_seed(0))
    x = torch.randn(3, 20)
    errors = input_errors((lambda: A2A.dispatch(x, ids, ctx=ctx, experts=3),
                           lambda: A2A.dispatch(x, ids.long(), ctx=ctx, experts=4),
                           lambda: A2A.dispatch(x[0], ids, ctx=ctx, experts=4),
                           lambda: A2A.dispatch(x, ids[:2], ctx=ctx, experts=4)))
    used = heap.used
    d = A2A.dispatch(x, ids, ctx=ctx, experts=4, config=CONFIG)
    errors += input_errors((lambda: A2A.combine(d.x[:5], weights, d, ctx=ctx),
                            lambda: A2A.combine(d.x, weights[:, :1], d, ctx=ctx)))
    heap.close()
    return errors, used


def test_bad_inputs_give_one_line_errors():
    """Checked before anything is launched or allocated on the heap."""
    for errors, used in spawn(_bad_inputs, 2, timeout=120):
        assert len(errors) == 6
        assert all(e.startswith(f"{OP}: ") and "\n" not in e for e in errors), errors
        assert used == 0


def test_the_kernels_compile_for_sm90():
    types = dict(x="*bf16", y="*bf16", out="*bf16", stage="*bf16", rows="*bf16", send_rows="*bf16", weights="*fp32",
                 ids="*i32", pos="*i32", order="*i32", matrix="*i32", meta="*i32", send_meta="*i32", count="*i32",
                 counts="*i32", chunk_flags="*i64", bases="*i64", flags="*i64", state="*i64", slot_elems="i64")
    compile_for_sm90("tuneforge.kernels.moe_alltoall",
                     [("_route_kernel", dict(BLOCK_E=1024)), ("_dispatch_kernel", dict(BLOCK=1024)),
                      ("_stage_kernel", dict(SIGNAL_ROWS=64, BLOCK=1024)),
                      ("_pull_kernel", dict(SIGNAL_ROWS=64, BLOCK=1024)),
                      ("_combine_push_kernel", dict(BLOCK=1024)), ("_combine_reduce_kernel", dict(BLOCK=1024)),
                      ("_combine_stage_kernel", dict(SIGNAL_ROWS=64, BLOCK=1024)),
                      ("_combine_pull_kernel", dict(SIGNAL_ROWS=64, BLOCK=1024))],
                     types)
