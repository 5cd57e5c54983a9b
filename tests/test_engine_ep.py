"""Expert parallelism in the engine (the ``ep`` MoE layout, ``Shard.moe``): each rank loads only its
experts [r E / N, (r + 1) E / N), whole, from both checkpoint layouts (one tensor per expert; transformers
5's fused tensors) and from random weights; bad layouts refused in one line; a 2-rank EP engine run on a
tiny Qwen3-MoE checkpoint from save_pretrained equal to TP 1 (prefill logits + 16 greedy tokens)."""
import dataclasses
import logging

import pytest
import torch

from test_moe_model import TINY_MOE, checkpoint, layout_checkpoint  # noqa: F401  (checkpoint: the fixture)
from tuneforge.errors import InputError
from tuneforge.models.configs import load_config
from tuneforge.models.loading import load_model, load_weights, random_weights
from tuneforge.models.qwen3 import Qwen3, Shard, SparseMoE

EP = 2


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_each_rank_loads_only_its_experts_whole(checkpoint, tmp_path, layout):
    path, cfg, sd = layout_checkpoint(checkpoint, tmp_path, layout)
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


# --- the engine ---------------------------------------------------------------------------------------

def _run(model, ops, steps: int):
    """Prefill logits of every prompt token and ``steps`` greedy tokens with their logits."""
    from test_engine import PROMPTS, prefill_and_generate
    from tuneforge.engine.generate import Generator
    prefill, out = prefill_and_generate(Generator(model, ops, max_batch=len(PROMPTS), max_len=32), PROMPTS, steps)
    return out.tokens, prefill.cpu(), torch.stack(out.logits).cpu(), ops.describe()


def settings(path: str, moe_parallel: str, dispatch: str, db=None) -> dict:
    """The engine settings `tuneforge generate --tp 2 --moe-parallel ...` gives every rank (fp32)."""
    from tuneforge.cli import build_parser
    from tuneforge.engine.cli import _settings
    argv = ["generate", "--model", path, "--tp", str(EP), "--moe-parallel", moe_parallel, "--dispatch", dispatch,
            "--dtype", "fp32", "--allow-predicted", "--prompt", "1"] + (["--db", db] if db else [])
    return _settings(build_parser().parse_args(argv))


def _ep_rank(world, settings: dict, steps: int):
    """The engine as `tuneforge generate` builds it on this rank (engine/cli.build: the MoE layout chosen
    before the weights load); its runs and the dispatch warnings."""
    from test_engine import PROMPTS
    from test_engine_tp import Lines
    from tuneforge.engine.cli import build
    lines = Lines()
    logging.getLogger("tuneforge.engine").addHandler(lines)
    model, ops = build(settings, world, len(PROMPTS))
    return (*_run(model, ops, steps), lines.lines)


def check_equals_tp1(path: str, settings: dict, steps: int) -> list:
    """The engine on 2 ranks against the TP 1 engine (torch baseline): the same greedy tokens, the
    prefill and decode logits within TOL; returns each rank's dispatch description and warnings."""
    from test_engine import PROMPTS, TOL
    from tuneforge.engine.dispatch import Ops
    from tuneforge.world import spawn
    tokens, prefill, logits, _ = _run(load_model(path, dtype=torch.float32), Ops("baseline"), steps)
    results = []
    for ep_tokens, ep_prefill, ep_logits, described, lines in spawn(_ep_rank, EP, settings, steps, timeout=300.0):
        assert ep_tokens == tokens
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(ep_prefill[i, :len(p)], prefill[i, :len(p)], **TOL)
        torch.testing.assert_close(ep_logits, logits, **TOL)
        results.append((described, lines))
    return results


def test_ep2_engine_equals_tp1_for_16_greedy_steps(checkpoint):
    """2 ranks, experts placed (4 of 8 each; layer 1 dense), the torch path (all_to_all_single around
    the per-expert loop, all_gather): TP 1's prefill logits and 16 greedy tokens."""
    path, _ = checkpoint
    for described, lines in check_equals_tp1(path, settings(path, "ep", "baseline"), steps=16):
        assert described == "torch baseline; TP: m=27 torch, m=4 torch; MoE: experts placed (ep)"


def moe_store(db: str, path: str, strategy: str, extra: dict) -> None:
    """The TP 2 plan's problems in a real store, as this machine's engine reads them (the cost model's
    environment for the default target): moe_block's default config of ``strategy`` with ``extra[m]``
    at each bucket m, every other op the torch baseline."""
    from tuneforge.db.store import Store, Winner
    from tuneforge.dsl import get
    from tuneforge.engine.lookup import environment
    from tuneforge.kernels import moe_block as K
    from tuneforge.kernels._common import launch_spec
    from tuneforge.tune.plan import plan
    cfg, env = load_config(path), environment(EP)
    the_plan = plan(cfg, tp=EP, decode_buckets=(4,), prefill_buckets=(32,), dtype="fp32")
    spec = launch_spec(torch.device("cpu"), persistent=False)
    with Store(db) as store:
        store.add_plan(cfg.name, EP, the_plan.pairs())
        for item in the_plan.tunable:
            p = item.problem
            config = {"baseline": True}
            if p.op == "moe_block":   # tiles the interpreter runs, fit for both GEMMs (down: k = 32)
                config = {**K.default_config(p, spec, strategy), "num_stages": 2, "block_k": 32, **extra[p["m"]]}
                assert K.TEMPLATE.reject_reason(config, p, spec) is None, config
            store.record_winner(Winner(p, env, config, 1e-5, 2e-5, 2.0, 50.0, "predicted", get(p.op).source_hash,
                                       "test", 1))


def test_ep2_tuned_moe_block_kernels_equal_tp1(checkpoint, tmp_path):
    """--moe-parallel auto with moe_block ep winners: the experts are placed and the stored configs run
    (dispatch -> local grouped GEMMs -> combine -> all-gather over the heap; the prefill's in 2
    overlapped chunks), everything else the torch baseline: TP 1's prefill logits and greedy tokens,
    nothing falling back."""
    path, _ = checkpoint
    db = str(tmp_path / "tf.db")
    moe_store(db, path, "ep", {4: {"chunks": 1}, 32: {"chunks": 2}})
    for described, lines in check_equals_tp1(path, settings(path, "auto", "tuned", db), steps=2):
        assert lines == [] and described.endswith("; TP: m=27 torch, m=4 torch; MoE: experts placed (ep)")


def test_tp2_tuned_moe_block_tp_winners_run_the_block_and_equal_tp1(tmp_path_factory, tmp_path):
    """moe_block tp winners (one-shot / two-shot all-reduce): --moe-parallel auto keeps the tp layout and
    each sparse layer runs the block (pack, grouped GEMMs, the heap's all-reduce) with the stored config:
    TP 1's logits and tokens, nothing falling back, no experts placed. (moe_intermediate_size 64: each
    rank's 32 channels fit the GEMMs' smallest block_k.)"""
    from test_engine import saved
    from test_moe_model import tiny_hf_moe
    path, _ = saved(tmp_path_factory, tiny_hf_moe(moe_intermediate_size=64), "tiny-qwen3-moe-i64")
    db = str(tmp_path / "tf.db")
    moe_store(db, path, "tp", {4: {"ar_strategy": "one_shot"}, 32: {"ar_strategy": "two_shot"}})
    for described, lines in check_equals_tp1(path, settings(path, "auto", "tuned", db), steps=2):
        assert lines == [] and described.endswith("; TP: m=27 torch, m=4 torch; MoE: moe_block tp")


def test_moe_parallel_auto_reads_the_moe_block_winner_at_the_decode_bucket_and_bad_requests_are_refused():
    from test_moe_model import stored_table
    from tuneforge.engine.dispatch import Ops
    from tuneforge.engine.ep import block_problem, layout
    cfg = dataclasses.replace(load_config("Qwen3-30B-A3B"), **{**TINY_MOE, "mlp_only_layers": ()})
    ops = Ops("tuned", stored_table([(block_problem(cfg, 2, 1, torch.bfloat16), {"strategy": "ep", "chunks": 1}),
                                     (block_problem(cfg, 2, 8, torch.bfloat16), {"strategy": "tp"}),
                                     (block_problem(cfg, 4, 8, torch.bfloat16), {"baseline": True})]))
    assert [layout("auto", cfg, 2, ops.choice, batch) for batch in (1, 5, 64)] == ["ep", "tp", "tp"]
    assert layout("auto", cfg, 4, ops.choice, 8) == "tp"             # the baseline won: tp
    assert layout("tp", cfg, 2, ops.choice, 1) == layout("auto", cfg, 2, None, 1) == "tp"
    assert layout("ep", cfg, 2) == "ep"
    errors = []
    for request, model, tp in (("ep", cfg, 3), ("ep", cfg, 1), ("ep", load_config("Qwen3-0.6B"), 2),
                               ("dp", cfg, 2)):
        with pytest.raises(InputError) as e:
            layout(request, model, tp)
        errors.append(str(e.value))
    assert errors == [
        "--moe-parallel ep: num_experts=8 of Qwen3-30B-A3B does not split over 3 ranks (use --moe-parallel tp)",
        "--moe-parallel ep places the experts over the ranks: it needs --tp 2 or more",
        "--moe-parallel ep: Qwen3-0.6B has no MoE layers",
        "unknown MoE layout 'dp'; expected one of tp, ep, auto"]


def _graph_rank(world, path: str, steps: int):
    """The EP engine (moe_block's ep kernels at their defaults) with and without CUDA graphs on this rank."""
    from tuneforge.engine.dispatch import Ops
    from tuneforge.engine.generate import Generator
    model = load_model(path, shard=Shard.of(world, moe="ep"), dtype=torch.float32, device=world.device)
    prompts = [[(7 * i + j) % 128 for j in range(40 - 10 * i)] for i in range(3)]
    runs = []
    for graphs in (False, True):
        gen = Generator(model, Ops("default"), max_batch=3, max_len=64, graphs=graphs)
        out = gen.generate(prompts, steps, return_logits=True)
        runs.append((out.tokens, torch.stack(out.logits).cpu(), gen.graphs))
    return prompts, runs


@pytest.mark.gpu
def test_ep2_cuda_graph_decode_on_one_gpu_equals_eager_and_tp1(checkpoint):
    """2 processes sharing one GPU, experts placed: decode replayed in CUDA graphs (the all-to-all's
    epochs, no clearing between replays) equals eager decode, and both give TP 1's greedy tokens."""
    from tuneforge.engine.dispatch import Ops
    from tuneforge.engine.generate import Generator
    from tuneforge.world import spawn
    path, _ = checkpoint
    steps = 16
    results = spawn(_graph_rank, EP, path, steps, device="cuda", share_gpu=True, timeout=600.0)
    prompts = results[0][0]
    ref = Generator(load_model(path, dtype=torch.float32, device="cuda"), Ops("baseline"), max_batch=3, max_len=64,
                    graphs=False).generate(prompts, steps, return_logits=True)
    for _, ((eager_tokens, eager, _), (graph_tokens, graphed, graphs)) in results:
        assert graphs and eager_tokens == graph_tokens == ref.tokens
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed, torch.stack(ref.logits).cpu(), rtol=1e-3, atol=1e-3)


def test_cli_refuses_an_impossible_ep_before_any_rank_starts(capsys):
    from tuneforge.cli import main
    for model, tp, why in (("Qwen3-0.6B", 2, "--moe-parallel ep: Qwen3-0.6B has no MoE layers"),
                           ("Qwen3-30B-A3B", 3, "--moe-parallel ep: num_experts=128 of Qwen3-30B-A3B does not split "
                                                "over 3 ranks (use --moe-parallel tp)")):
        assert main(["generate", "--model", model, "--random-weights", "--tp", str(tp), "--moe-parallel", "ep",
                     "--dispatch", "baseline", "--prompt", "1 2"]) == 2
        assert capsys.readouterr().err == f"tuneforge: error: {why}\n"
