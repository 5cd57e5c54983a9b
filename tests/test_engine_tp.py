"""The Qwen3 engine at TP=2 through the TP blocks (kernels/tp_attn, kernels/tp_mlp) against Hugging Face
transformers on a tiny random checkpoint (fp32): tuned records in a real SQLite store choosing gemm_ar
or ag_rs (row-sharded residual stream, uneven rows, a rank without rows), a missing tp record falling
back to the torch path with exactly one warning line; one prefill of several prompts and a few decode
steps, in a 2-process world under Triton's interpreter. GPU (``-m gpu``): 2 processes sharing one GPU
through the tuned blocks, CUDA-graph decode equal to eager decode and to transformers."""
import logging

import pytest
import torch

from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl import get
from tuneforge.models.configs import load_config
from tuneforge.tune.plan import plan
from tuneforge.world import spawn

from test_engine import PROMPTS, TOL, checkpoint, hf_greedy  # noqa: F401  (checkpoint: the fixture)

TP = 2
ENV = Environment("interpreter", 4, 0.0, TP, "single-gpu", torch.__version__, "3", "none", False)
# sub-strategy choices beside each block's default, so the engine runs more than one kernel variant
VARIANTS = {("tp_attn", "gemm_ar"): dict(ar_strategy="two_shot", ar_variant="pull"),
            ("tp_attn", "ag_rs"): dict(variant="pull", signal="tile", order="next", gather="side_stream",
                                       reduce="consumer"),
            ("tp_mlp", "gemm_ar"): dict(ar_strategy="one_shot", ar_variant="push"),
            ("tp_mlp", "ag_rs"): dict(variant="push", signal="rank", order="prev", gather="fused", reduce="fused")}


def block_config(problem, strategy: str, spec) -> dict:
    """The block's default config for ``strategy`` with its VARIANTS choices, tiles raised as far as
    the constraints allow (fewer programs: the interpreter runs them one by one)."""
    template = get(problem.op)
    config = {**template.default_config(problem, spec, strategy), **VARIANTS[(problem.op, strategy)]}
    assert template.reject_reason(config, problem, spec) is None, (problem.key, config)
    for name in ("block_m", "block_n", "block_k"):
        for value in (64, 32):
            if value > config[name] and template.reject_reason({**config, name: value}, problem, spec) is None:
                config[name] = value
                break
    return config


def write_store(path: str, model_dir: str, strategies: dict, spec=None, env: Environment = ENV,
                buckets=((4,), (32,))) -> str:
    """A store with the tuning plan's problems at TP 2: the TP blocks get configs of the strategy named
    in ``strategies`` (op -> strategy; an op left out gets no record), every other op the torch
    baseline as its winner (so the blocks are all that runs Triton)."""
    cfg = load_config(model_dir)
    the_plan = plan(cfg, tp=TP, decode_buckets=buckets[0], prefill_buckets=buckets[1],
                    dtype="fp32")
    with Store(path) as store:
        store.add_plan(cfg.name, TP, the_plan.pairs())
        for item in the_plan.tunable:
            op = item.problem.op
            if op in ("tp_attn", "tp_mlp") and op not in strategies:
                continue
            config = (block_config(item.problem, strategies[op], spec) if op in strategies
                      else {"baseline": True})
            store.record_winner(Winner(item.problem, env, config, 1e-5, 2e-5, 2.0, 50.0, "measured",
                                       get(op).source_hash, "test", 1))
    return cfg.name


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _rank(world, model_dir: str, db: str, name: str, env: Environment, steps: int, graphs: bool,
          prompt_sets: list):
    """Generate for each prompt set; return tokens, logits, the dispatch warnings and the TP layouts."""
    from tuneforge.engine.dispatch import DispatchTable, Ops
    from tuneforge.engine.generate import Generator
    from tuneforge.models.loading import load_model
    from tuneforge.models.qwen3 import Shard
    lines = Lines()
    logging.getLogger("tuneforge.engine").addHandler(lines)
    with Store(db, create=False) as store:
        ops = Ops("tuned", DispatchTable.load(store, env, name, TP))
    model = load_model(model_dir, shard=Shard.of(world), dtype=torch.float32, device=world.device)
    runs = []
    for prompts in prompt_sets:
        for g in ((False, True) if graphs else (False,)):
            longest = max(map(len, prompts))
            gen = Generator(model, ops, max_batch=len(prompts), max_len=longest + steps, graphs=g)
            out = gen.generate(prompts, steps, return_logits=True)
            runs.append((out.tokens, torch.stack(out.logits).cpu()))
    layouts = {s.m: (s.sharded, s.rows, layout(s.attn), layout(s.mlp)) for s in ops.tp_steps}
    return runs, lines.lines, layouts


def layout(config):
    """How a block ran: "torch", or its strategy ("gemm_ar" for the defaults, {})."""
    return "torch" if config is None else config.get("strategy", "gemm_ar")


def check_runs(hf, runs, prompt_sets, steps, tol=TOL):
    for (tokens, logits), prompts in zip(runs, prompt_sets):
        for i, p in enumerate(prompts):
            ref_tokens, _, ref_logits = hf_greedy(hf, p, steps)
            assert tokens[i] == ref_tokens, (i, tokens[i], ref_tokens)
            torch.testing.assert_close(logits[:, i], ref_logits, **tol)


@pytest.mark.parametrize("strategy", ["gemm_ar", "ag_rs"])
def test_tp2_tuned_blocks_match_transformers(checkpoint, tmp_path, strategy):
    """Prefill of 27 tokens (3 prompts; ag_rs: 14 + 13 rows), decode at batch bucket 4 (2 + 2 rows);
    ag_rs also a single prompt, whose decode step leaves rank 1 without rows."""
    path, hf = checkpoint
    db = str(tmp_path / "tf.db")
    name = write_store(db, path, {"tp_attn": strategy, "tp_mlp": strategy})
    steps = 3
    prompt_sets = [PROMPTS] + ([PROMPTS[:1]] if strategy == "ag_rs" else [])
    results = spawn(_rank, TP, path, db, name, ENV, steps, False, prompt_sets, timeout=600.0)
    sharded = strategy == "ag_rs"
    for rank, (runs, lines, layouts) in enumerate(results):
        assert lines == []                                  # every op has a record: nothing falls back
        assert layouts[27] == (sharded, (14, 13)[rank] if sharded else 0, strategy, strategy)
        assert layouts[4] == (sharded, 2 if sharded else 0, strategy, strategy)
        if sharded:
            assert layouts[1] == (True, (1, 0)[rank], "ag_rs", "ag_rs")
        check_runs(hf, runs, prompt_sets, steps)


def test_tp2_missing_tp_record_falls_back_with_one_warning(checkpoint, tmp_path):
    """tp_mlp has no record: one warning line, the MLP runs gemm + torch all-reduce; tp_attn's ag_rs
    winner then runs gemm_ar at its default config (one layout per forward)."""
    path, hf = checkpoint
    db = str(tmp_path / "tf.db")
    name = write_store(db, path, {"tp_attn": "ag_rs"})
    steps = 3
    results = spawn(_rank, TP, path, db, name, ENV, steps, False, [PROMPTS], timeout=600.0)
    for runs, lines, layouts in results:
        (line,) = lines
        assert line.startswith("dispatch: tp_mlp runs the torch baseline: no record for tp_mlp|m=27,hidden=64,"
                               "inter=64|fp32|w2") and "tuneforge tune --model" in line and "\n" not in line
        assert layouts == {27: (False, 0, "gemm_ar", "torch"), 4: (False, 0, "gemm_ar", "torch")}
        check_runs(hf, runs, [PROMPTS], steps)


def test_cli_generate_tp2_default_dispatch_runs_the_blocks(checkpoint, capsys):
    """`tuneforge generate --tp 2 --dispatch default`: every Triton kernel and the TP blocks at their
    default configs (gemm_ar), without a database; the greedy tokens are transformers'."""
    import json
    from tuneforge.cli import main
    path, hf = checkpoint
    assert main(["generate", "--model", path, "--tp", "2", "--dispatch", "default", "--prompt", "5 3 9 1 7",
                 "--prompt", "42 8", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == [hf_greedy(hf, p, 3)[0] for p in PROMPTS[:2]]
    assert out["dispatch"] == "Triton kernels, default configs; TP: m=10 gemm_ar, m=2 gemm_ar"


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["gemm_ar", "ag_rs"])
def test_tp2_tuned_blocks_cuda_graphs_on_one_gpu(checkpoint, tmp_path, strategy):
    """2 processes sharing one GPU through the tuned blocks (configs: the blocks' defaults for this GPU):
    prompts long enough that decode crosses the 256-slot KV bucket; CUDA-graph decode equals eager
    decode, and both are the transformers model."""
    from tuneforge.kernels.gemm import launch_spec
    path, hf = checkpoint
    db = str(tmp_path / "tf.db")
    env = Environment("gpu-test", 1, 0.0, TP, "single-gpu", torch.__version__, "3", "none", False)
    name = write_store(db, path, {"tp_attn": strategy, "tp_mlp": strategy}, launch_spec(torch.device("cuda")),
                       env, buckets=((4,), (1024,)))
    prompts = [[(7 * i + j) % 128 for j in range(250 - 40 * i)] for i in range(3)]
    steps = 20
    results = spawn(_rank, TP, path, db, name, env, steps, True, [prompts], device="cuda",
                    share_gpu=True, timeout=600.0)
    for runs, lines, layouts in results:
        assert lines == []
        assert {v[2:] for v in layouts.values()} == {(strategy, strategy)}
        (eager_tokens, eager), (graph_tokens, graphed) = runs
        assert eager_tokens == graph_tokens
        torch.testing.assert_close(eager, graphed, rtol=1e-5, atol=1e-5)
        check_runs(hf, runs[1:], [prompts], steps, tol=dict(rtol=1e-3, atol=1e-3))
