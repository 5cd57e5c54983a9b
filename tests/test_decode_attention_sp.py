"""Sequence-parallel decode attention (KV cache sharded by token over ranks) in real 2- and 4-rank CPU
worlds under Triton's interpreter: every form and the torch.distributed baseline against fp64 attention
over the whole (reassembled) cache, with ragged lengths, lengths not divisible by the placement block
or the split chunk, length 1 (ranks whose shard is empty), GQA ratios 1/4/8 and NaN-poisoned outputs;
a silent rank gives every waiting rank a SignalTimeout naming rank, peer and signal. On one GPU
(``-m gpu``): 2 and 4 processes sharing it at Qwen3-32B heads in bf16, and a CUDA-graph replay."""
import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.check import compare, split_out
from tuneforge.errors import InputError, SignalTimeout
from tuneforge.kernels import decode_attention_sp as SP
from tuneforge.kernels._common import launch_spec
from tuneforge.world import spawn

from conftest import assert_graph_replays, channel_epochs, graph_replays

OP = "decode_attention_sp"
FORMS = SP.FORMS


def _config(form, splits, block_n=16):
    return {"form": form, "splits": splits, "block_n": block_n, "num_warps": 4, "num_stages": 1}


def _check_cases(world, cases, heap_bytes=4 << 20):
    """On every rank: each case's problem, positions and configs (every form twice: the epochs' parities),
    then the baseline; failures as lines."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, heap_bytes)
    ctx = heap.context()
    template = get(OP)
    failures, checked = [], 0
    for dims, positions, splits in cases:
        dims = dict(dims)
        problem = Problem.make(OP, dims.pop("dtype", "fp32"), world.size, **dims)
        inputs = template.make_inputs(problem, ctx.device, 1, ctx)
        inputs["positions"] = torch.tensor(positions, device=ctx.device)
        for config in [template.default_config(problem, launch_spec(ctx.device))] + [_config(f, s) for f in FORMS for s in splits]:
            reason = template.reject_reason(config, problem, None)
            assert reason is None, f"{config}: {reason}"
            for _ in range(2):
                result = check(template, problem, config, ctx=ctx, inputs=inputs)
                checked += 1
                if not result:
                    failures.append(f"{problem.key} {positions} {config}: {result.reason}")
        base = template.baseline(**split_out(inputs))
        ok = compare(base, template.reference(**split_out(inputs)), base.dtype)
        if not ok:
            failures.append(f"baseline {problem.key} {positions}: {ok.reason}")
    epochs = channel_epochs(ctx, heap)
    return failures, checked, epochs


def _assert_world(results):
    for rank, (failures, checked, epochs) in enumerate(results):
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)
        assert checked > 0
        assert epochs == results[0][2]


def test_forms_and_baseline_match_sdpa_on_two_ranks():
    # ctx 150: 10 placement blocks of 16 (the last partial) over 2 ranks, shards of 80 slots, split in
    # 2 chunks of 48 or not split; lengths 1, 17, 101, 150 (not multiples of 16)
    cases = [
        (dict(m=4, heads=4, kv_heads=1, head_dim=16, ctx=150), [0, 16, 100, 149], (2, 1)),      # GQA 4
        (dict(m=2, heads=2, kv_heads=2, head_dim=16, ctx=40), [0, 39], (1,)),                   # GQA 1
        (dict(m=2, heads=8, kv_heads=1, head_dim=8, ctx=40), [5, 33], (1,)),                    # GQA 8
    ]
    _assert_world(spawn(_check_cases, 2, cases, timeout=300))


def test_forms_and_baseline_match_sdpa_on_four_ranks():
    # lengths 1 and 20: ranks 1-3 / 2-3 hold nothing of those sequences; shards of 32 slots
    cases = [(dict(m=3, heads=4, kv_heads=1, head_dim=16, ctx=100), [0, 19, 99], (1,))]
    _assert_world(spawn(_check_cases, 4, cases, timeout=300))


def _silent_rank(world, silent):
    """Per form: all ranks make one call together (compile, first-launch barrier), then every rank but
    ``silent`` makes a second one that ``silent`` never makes; then the channel is reset (collective).
    Returns each form's SignalTimeout text and the tile flags left after the reset."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 20)
    ctx = heap.context()
    problem = Problem.make(OP, "fp32", world.size, m=2, heads=4, kv_heads=1, head_dim=16, ctx=40)
    inputs = get(OP).make_inputs(problem, ctx.device, 0, ctx)
    messages, leftover = {}, {}
    for form in FORMS:
        config = _config(form, 1)
        get(OP).launch(**inputs, config=config)
        ctx.synchronize()
        channel = ctx.channel("allgather" if form == "two_step" else OP, 0)
        channel.set_timeout(1.0)             # short, now that no rank is starting up
        messages[form] = None
        if world.rank != silent:
            try:
                get(OP).launch(**inputs, config=config)
                ctx.check()
            except SignalTimeout as e:
                messages[form] = str(e)
        world.barrier()
        channel.reset()
        channel.set_timeout(30.0)
        if form == "fused_tiles":
            leftover[form] = int(channel.tile_flags(world.size * 2).abs().sum())
    # after the resets, the forms work again on every rank
    ok = [bool(check(get(OP), problem, _config(form, 1), ctx=ctx, inputs=inputs)) for form in FORMS]
    heap.close()
    return messages, leftover, ok


def test_a_silent_rank_gives_signal_timeout_naming_rank_peer_and_signal():
    results = spawn(_silent_rank, 2, 1, timeout=300)
    for rank, (messages, leftover, ok) in enumerate(results):
        assert ok == [True] * len(FORMS), f"rank {rank} after reset: {ok}"
        assert leftover == {"fused_tiles": 0}, f"rank {rank}: reset left tile flags set: {leftover}"
        for form, message in messages.items():
            if rank == 1:
                assert message is None
                continue
            channel = "allgather" if form == "two_step" else OP
            assert message is not None, f"{form}: rank 0 got no SignalTimeout"
            assert message.startswith(f"rank 0: '{channel}' timed out"), message
            assert "signal 'data' (slot 0) from peer 1 at epoch 2" in message, message


def test_bad_inputs_give_one_line_errors():
    """Checked before anything is launched or allocated on the heap."""
    results = spawn(_bad_inputs, 2, timeout=120)
    for errors in results:
        assert all(e.startswith(f"{OP}: ") and "\n" not in e for e in errors), errors


def _bad_inputs(world):
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 16)
    ctx = heap.context()
    problem = Problem.make(OP, "fp32", world.size, m=2, heads=4, kv_heads=2, head_dim=16, ctx=40)
    args = split_out(get(OP).make_inputs(problem, ctx.device, 0, ctx))
    errors = []
    for change in (lambda a: a.update(q=a["q"][:, :3]),
                   lambda a: a.update(v=a["v"][:, :, :8]),
                   lambda a: a.update(shard_block=0),
                   lambda a: a.update(shard_block=24),
                   lambda a: a.update(positions=a["positions"].float())):
        bad = dict(args)
        change(bad)
        try:
            SP.decode_attention_sp(**bad)
            errors.append("no error")
        except InputError as e:
            errors.append(str(e))
    heap.close()
    return errors


# --- one GPU shared by several processes --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_forms_on_processes_sharing_one_gpu(ranks):
    # Qwen3-32B's heads; lengths 1, 1000 and the whole 4096 (shards of 4096 / ranks slots, split or not)
    cases = [(dict(dtype="bf16", m=3, heads=64, kv_heads=8, head_dim=128, ctx=4096), [0, 999, 4095], (8, 1))]
    _assert_world(spawn(_check_cases, ranks, cases, 64 << 20, device="cuda", share_gpu=True, timeout=540))


def _graph_replay(world, replays):
    """Capture every form in one CUDA graph; replay with new queries and lengths, check every replay."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 64 << 20)
    ctx = heap.context()
    problem = Problem.make(OP, "bf16", world.size, m=4, heads=64, kv_heads=8, head_dim=128, ctx=2048)
    inputs = split_out(get(OP).make_inputs(problem, ctx.device, 0, ctx))
    configs = [_config(form, 2, 64) for form in FORMS]
    outs = [torch.empty_like(inputs["q"]) for _ in configs]

    def refill(r):
        g = torch.Generator().manual_seed(100 + r)      # the same on every rank: q is replicated
        inputs["q"].copy_(torch.randn(inputs["q"].shape, generator=g).to(inputs["q"].dtype))
        inputs["positions"].copy_(torch.randint(0, 2048, (4,), generator=g))
    return graph_replays(ctx, heap, OP, lambda out, config: SP.decode_attention_sp(**inputs, out=out, config=config),
                         outs, configs, replays, refill, lambda: SP.reference(**inputs), "form")


@pytest.mark.gpu
def test_cuda_graph_replay_on_one_gpu():
    assert_graph_replays(_graph_replay, 4, launches=2)   # fused and fused_tiles advance the device epoch
