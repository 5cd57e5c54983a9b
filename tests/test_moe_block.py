"""The MoE layer across ranks (``moe_block``) in real 2- and 4-rank CPU worlds under Triton's interpreter:
tp (channel-sharded experts + all-reduce) and ep (placed experts + all-to-all, both forms, overlapped in
chunks) against the fp64 reference, against each other, and against transformers' Qwen3MoeSparseMoeBlock;
uneven row shares, decode (a rank without tokens), skewed routing (ranks receiving nothing), dropped (-1)
ids, top-k 1/2/8; every layer called several times on the same channels (epochs). The torch baselines (all_reduce; all_to_all_single with the counts exchange); bad
inputs; the template's space and cost on targets not at hand. On one GPU (``-m gpu``, two processes
sharing it): the overlapped ep layer eagerly, and the layers captured in one CUDA graph and replayed."""

import pytest
import torch

from conftest import assert_graph_replays, channel_epochs, graph_replays, input_errors
from tuneforge.dsl import check, get
from tuneforge.dsl.check import compare, split_out
from tuneforge.dsl.comm import row_split
from tuneforge.dsl.devices import SPECS
from tuneforge.kernels import moe_block as MB
from tuneforge.kernels import moe_gemm as k_moe
from tuneforge.models import problems as P
from tuneforge.world import spawn

OP = "moe_block"
TILES = dict(block_m=16, block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=2, down_block_n=32)
TP_ATOMIC = {"strategy": "tp", **TILES, "comm_sms": 2, "combine": "atomic", "ar_strategy": "one_shot"}
TP_REDUCE = {**TP_ATOMIC, "combine": "reduce", "ar_strategy": "two_shot"}
EP_LL = {"strategy": "ep", **TILES, "comm_sms": 2, "form": "low_latency", "comm_block": 256, "chunks": 1}
EP_STAGED = {**EP_LL, "form": "staged", "signal_rows": 16, "chunks": 2, "down_block_n": 16}   # down narrower
CONFIGS = (TP_ATOMIC, TP_REDUCE, EP_LL, EP_STAGED)


def _name(config) -> str:
    return f"{config['strategy']}/{config.get('combine') or config['form']}"


def _layers(world, shapes, seeds, configs, drop: bool, hf: bool):
    """Each (m, experts, topk, skew) problem (hidden = inter = 16, fp32) through every config once per seed
    (other inputs each time), each output against the reference and against the first config's; the
    baselines; a dropped id through ep; transformers' block (``hf``)."""
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels import moe_alltoall as A2A
    heap = SymmetricHeap(world, 8 << 20)
    ctx = heap.context()
    template = get(OP)
    failures = []
    for m, experts, topk, skew in shapes:
        problem = P.moe_block("fp32", world.size, m, 16, 16, experts, topk)
        for seed in seeds:
            inputs = template.make_inputs(problem, ctx.device, seed, ctx)
            if skew:     # every token to the first experts: ep's rank 0 receives everything, the others nothing
                g = torch.Generator().manual_seed(seed)
                inputs["topk_ids"].copy_(A2A.routing(m, experts, topk, g, skew)[0])
            ref = template.reference(**split_out(inputs))
            first = None
            for config in configs:
                tag = f"m={m} E={experts} k={topk} skew={skew} seed={seed} {_name(config)} rank {world.rank}"
                result = check(template, problem, config, ctx=ctx, inputs=inputs, reference=ref)
                if not result:
                    failures.append(f"{tag}: {result.reason}")
                if first is None:
                    first = inputs["out"].clone()
                elif not (same := compare(inputs["out"], first.double())):
                    failures.append(f"{tag}: differs from {_name(configs[0])}: {same.reason}")
        for name, fn in (("tp", MB.baseline), ("ep", MB.baseline_ep)):
            ok = compare(fn(**split_out(inputs)), ref)
            if not ok:
                failures.append(f"m={m} baseline {name}: {ok.reason}")
    if drop:     # an entry for no expert adds nothing (ep: neither sent nor combined)
        problem = P.moe_block("fp32", world.size, 5, 16, 16, 4, 2)
        inputs = template.make_inputs(problem, ctx.device, 2, ctx)
        inputs["topk_ids"][1, 0] = -1
        ref = template.reference(**split_out(inputs))
        for config in (EP_LL, EP_STAGED):
            result = check(template, problem, config, ctx=ctx, inputs=inputs, reference=ref)
            if not result:
                failures.append(f"dropped id, {_name(config)}: {result.reason}")
    if hf:
        failures += _transformers(ctx)
    epochs = channel_epochs(ctx, heap)
    return failures, epochs


def _assert_world(results):
    for failures, epochs in results:
        assert not failures, "\n".join(failures)
        assert epochs == results[0][1]


def test_tp_and_ep_match_the_reference_each_other_and_transformers_on_two_ranks():
    # 5 tokens: row shares of 3 and 2 (ep's buffers sized by the larger); 1 token (decode): rank 1 has none.
    # Every config runs again on new inputs in each shape, the dropped id and transformers' block (epochs)
    _assert_world(spawn(_layers, 2, [(5, 4, 2, 0.0), (1, 4, 2, 0.0)], (0,), CONFIGS, True, True, timeout=300))


def test_tp_and_ep_on_four_ranks_top8_and_skewed_top1():
    # top-8 of 8 experts; top-1 skewed so that ep's ranks 1-3 receive nothing
    _assert_world(spawn(_layers, 4, [(4, 8, 8, 0.0), (6, 8, 1, 50.0)], (0,), (TP_ATOMIC, EP_LL, EP_STAGED), False,
                        False, timeout=540))


def _transformers(ctx):
    """Qwen3MoeSparseMoeBlock's output and ours (its router's logits through moe_router's baseline, then
    moe_block in each config on every rank's shards of its experts), with and without norm_topk_prob."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from tuneforge.kernels import moe_router
    failures = []
    for norm in (True, False):
        torch.manual_seed(0)        # the same block on every rank
        hf = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8,
                                                   num_experts_per_tok=2, norm_topk_prob=norm)).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5)
            x = torch.randn(7, 32)
            expect = hf(x[None])[0]
            weights, ids = moe_router.baseline(x @ hf.gate.weight.T, 2, norm)
        gate_up, down = hf.experts.gate_up_proj.detach(), hf.experts.down_proj.detach()
        for config in (TP_REDUCE, EP_LL, EP_STAGED):
            part = MB.shard(gate_up, down, config["strategy"], ctx.rank, ctx.size)
            out = MB.moe_block(x, ids.int().contiguous(), weights.float().contiguous(), *part, ctx=ctx, experts=8,
                               config=config)
            ctx.synchronize()
            ok = compare(out, expect.double())
            if not ok:
                failures.append(f"transformers' block, {_name(config)} norm={norm}: {ok.reason}")
    return failures


def _bad_inputs(world):
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 20)
    ctx = heap.context()
    problem = P.moe_block("fp32", 2, 3, 16, 16, 4, 2)
    inputs = get(OP).make_inputs(problem, ctx.device, 0, ctx)
    x, ids, w = inputs["x"], inputs["topk_ids"], inputs["topk_weights"]
    tp, ep = inputs["shards"]["tp"], inputs["shards"]["ep"]
    errors = input_errors((lambda: MB.moe_block(x, ids, w, *tp, ctx=ctx, experts=4, config=EP_LL),
                           lambda: MB.moe_block(x, ids.long(), w, *ep, ctx=ctx, experts=4, config=EP_LL),
                           lambda: MB.moe_block(x, ids, w[:2], *tp, ctx=ctx, experts=4, config=TP_ATOMIC),
                           lambda: MB.moe_block(x, ids, w, *ep, ctx=ctx, experts=4, config={"strategy": "dp"}),
                           lambda: MB.moe_block(x, ids, w, *ep, ctx=ctx, experts=3, config=EP_LL),
                           lambda: MB.shard(inputs["gate_up"][:3], inputs["down"][:3], "ep", 0, 2)))
    used = heap.used
    # the parts eta_overlap is measured from: comm (identity experts), compute, layer (this rank's rows)
    row0, rows = row_split(3, 2)[world.rank]
    parts = MB.ep_parts(x, ids, w, *ep, ctx=ctx, experts=4, config=EP_STAGED)
    ref = get(OP).reference(**split_out(inputs))[row0:row0 + rows]
    d = parts["dispatched"]
    n = int(d.count)
    local = d.expert[:n, None].contiguous()
    h = k_moe.reference(d.x[:n], ep[0], local, gather=True, activation="silu_mul")
    identity = (x.double() * w.sum(1, keepdim=True))[row0:row0 + rows]
    checks = [compare(parts["layer"](), ref), compare(parts["comm"](), identity),
              compare(parts["compute"]()[:n], k_moe.reference(h, ep[1], local, gather=False))]
    heap.close()
    return errors, used, [c.reason for c in checks if not c]


def test_bad_inputs_give_one_line_errors_and_the_parts_time_what_they_say():
    """Errors are checked before anything is launched or allocated on the heap."""
    for errors, used, parts in spawn(_bad_inputs, 2, timeout=120):
        assert len(errors) == 6 and all(e.startswith(f"{OP}: ") and "\n" not in e for e in errors), errors
        assert used == 0
        assert not parts, parts


def test_pack_reads_a_strided_column_of_ids():
    """ep packs the expert column of the received meta ([R, 4] int32, -1 past the count): a strided view."""
    from tuneforge.kernels import moe_pack
    meta = torch.randint(-1, 4, (37, 4), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    got = moe_pack.pack(meta[:, :1], 4, 16)
    want = moe_pack.reference(meta[:, :1].contiguous(), 4, 16)
    for name, a, b in zip(moe_pack.Packed._fields, got, want):
        assert name == "block_m" or torch.equal(a, b), name


# --- the template: space and cost -------------------------------------------------------------------

QWEN3_30B = dict(hidden=2048, inter=768, experts=128, topk=8)


def test_space_has_each_strategy_with_its_own_parameters():
    template = get(OP)
    problem = P.moe_block("bf16", 8, 256, **QWEN3_30B)
    space = template.space(problem)
    when = {p.name: p.when for p in space.params}
    assert when["strategy"] == {} and set(space.params[0].choices) == {"tp", "ep"}
    assert when["combine"] == when["ar_strategy"] == {"strategy": ("tp",)}
    assert when["form"] == when["chunks"] == {"strategy": ("ep",)}
    assert when["signal_rows"] == {"strategy": ("ep",), "form": ("staged",)}
    for config in CONFIGS:
        assert space.validate(config) == config
    with pytest.raises(ValueError, match="not active"):
        space.validate({**TP_ATOMIC, "form": "staged"})
    # a config stored before the down GEMM had its own width ran it at block_n
    before = {k: v for k, v in EP_STAGED.items() if k != "down_block_n"}
    assert template.served(problem, before) == {**before, "down_block_n": 32}
    assert MB.sub_configs(EP_STAGED, problem)["down"]["block_n"] == 16
    assert MB.sub_configs(before, problem)["down"]["block_n"] == 32
    spec = SPECS["H800"]
    # the default runs wherever its strategy fits, also where tp leaves the down GEMM a K (inter / world)
    # narrower than the gate_up GEMM's tiles: 64 / 4 = 16, 48 / 2 = 24, 128 / 2 = 64
    small = [P.moe_block("bf16", w, 4, 64, inter, 8, 2) for w, inter in ((4, 64), (2, 48), (2, 128))]
    for p in (problem, *small):
        for strategy in MB.STRATEGIES:
            assert template.reject_reason(template.default_config(p, spec, strategy), p, spec) is None, (p, strategy)
    # a world that splits neither the experts nor the channels refuses the strategy, with the reason
    odd = P.moe_block("bf16", 3, 16, 64, 64, 8, 2)
    why = template.reject_reason(template.default_config(odd, spec, "tp"), odd, spec)
    assert why and why.startswith("tp: world 3 does not divide")
    assert template.default_config(P.moe_block("bf16", 4, 16, 64, 66, 8, 2), spec)["strategy"] == "ep"


@pytest.mark.parametrize("target", ["H800", "B300", "MI308X"])
def test_cost_predicts_both_strategies_on_targets_not_at_hand(target):
    template, spec = get(OP), SPECS[target]
    times = {}
    for m in (1, 64, 4096):
        problem = P.moe_block("bf16", 8, m, **QWEN3_30B)
        baseline = template.cost(problem, None, spec)
        for strategy in MB.STRATEGIES:
            config = template.default_config(problem, spec, strategy)
            times[m, strategy] = t = template.cost(problem, config, spec)
            assert 0 < t < 1 and 0 < baseline < 1
        flops, nbytes = template.work(problem)
        assert flops > 0 and nbytes > 0
    for strategy in MB.STRATEGIES:     # more tokens never cost less
        assert times[1, strategy] <= times[64, strategy] <= times[4096, strategy]
    # at prefill, overlapping the all-to-all with the experts in chunks is predicted to pay
    problem = P.moe_block("bf16", 8, 4096, **QWEN3_30B)
    ep = template.default_config(problem, spec, "ep")
    assert template.cost(problem, {**ep, "chunks": 2}, spec) < template.cost(problem, {**ep, "chunks": 1}, spec)


def test_eta_overlap():
    assert MB.eta_overlap(2.0, 1.0, 2.0) == 1.0           # the shorter part entirely hidden
    assert MB.eta_overlap(2.0, 1.0, 3.0) == 0.0           # one after the other
    assert MB.eta_overlap(1.0, 1.0, 1.5) == 0.5


# --- one GPU: CUDA graphs ---------------------------------------------------------------------------

def _graph(world, replays):
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 64 << 20)
    ctx = heap.context()
    template = get(OP)
    problem = P.moe_block("bf16", world.size, 48, 128, 64, 8, 2)
    inputs = template.make_inputs(problem, ctx.device, 0, ctx)
    configs = [{**c, "block_n": 64, "block_k": 64} for c in (TP_ATOMIC, EP_LL, EP_STAGED)]
    outs = [torch.empty_like(inputs["out"]) for _ in configs]

    def run(out, config):
        template.launch(**{**inputs, "out": out}, config=config)

    def refill(r):
        fresh = template.make_inputs(problem, ctx.device, 10 + r, ctx)
        for name in ("x", "topk_ids", "topk_weights"):
            inputs[name].copy_(fresh[name])
    reference = lambda: template.reference(**split_out(inputs))  # noqa: E731
    return graph_replays(ctx, heap, "moe_alltoall.dispatch", run, outs, configs, replays, refill, reference,
                         "strategy")


def _overlapped(world):
    """ep in chunks, called three times eagerly on new inputs each time: the first unoverlapped, the
    others with the all-to-all on the side stream."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 64 << 20)
    ctx = heap.context()
    template = get(OP)
    problem = P.moe_block("bf16", world.size, 96, 128, 64, 8, 2)
    failures = []
    for config in ({**EP_LL, "chunks": 2}, {**EP_STAGED, "chunks": 4}):
        for call in range(3):
            inputs = template.make_inputs(problem, ctx.device, call, ctx)
            result = check(template, problem, {**config, "block_n": 64, "block_k": 64}, ctx=ctx, inputs=inputs)
            if not result:
                failures.append(f"{_name(config)} chunks {config['chunks']} call {call}: {result.reason}")
    heap.close()
    return failures


@pytest.mark.gpu
def test_the_overlapped_layer_matches_the_reference_on_processes_sharing_one_gpu():
    for failures in spawn(_overlapped, 2, device="cuda", share_gpu=True, timeout=300):
        assert not failures, failures


@pytest.mark.gpu
def test_the_layers_replay_in_a_cuda_graph_on_processes_sharing_one_gpu():
    # the dispatch channel: one epoch per ep layer call (EP_STAGED's first chunk shares it)
    assert_graph_replays(_graph, 3, launches=2)
