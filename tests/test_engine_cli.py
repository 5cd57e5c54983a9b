"""`tuneforge generate` against real SQLite tuning databases on a tiny random-weights Qwen3: a stored
config that cannot run falls back to the torch baseline (same tokens, one line), the dispatch summary
is said once per run (by rank 0 of a TP world), and the default dtype is the one the winners were
tuned in."""
import json
import logging
import sqlite3

import pytest
import torch

from tuneforge.cli import build_parser, main
from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl import Problem, get
from tuneforge.dsl.devices import spec

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the table is the H100 prediction")

PREDICTED = Environment.predicted(spec("H100"), 1)
QKV = Problem.make("gemm", "bf16", m=1, n=128, k=64)     # the tiny model's fused q|k|v projection, one token
GEMM = dict(block_m=16, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=2, schedule="tiles", split_k=1,
            programs_per_sm=1, tma=False, flatten=False)


def store_winner(url: str, model: str, problem: Problem, config: dict) -> None:
    """A predicted winner of ``problem`` for ``model``'s plan, its config then written by SQL as given
    (so no validation the store may do on writing can refuse it)."""
    t = get(problem.op)
    with Store(url) as store:
        store.add_plan(model, 1, [(problem, "test")])
        store.record_winner(Winner(problem, PREDICTED, GEMM, 1e-5, 2e-5, 2.0, 50.0, "predicted", t.source_hash,
                                   Store.study_name(problem, PREDICTED), 1))
    with sqlite3.connect(url[len("sqlite:///"):]) as db:
        assert db.execute("UPDATE tf_winner SET config = ? WHERE problem_key = ?",
                          (json.dumps(config), problem.key)).rowcount == 1


def generate(model: str, url: str, *extra: str) -> dict:
    return ["generate", "--model", model, "--random-weights", "--prompt", "1 2 3", "--max-new-tokens", "4",
            "--db", url, "--json", *extra]


def test_generate_serves_through_a_stored_config_that_cannot_run(tiny_config, tmp_path, capsys, caplog):
    url = f"sqlite:///{tmp_path / 'tf.db'}"
    store_winner(url, "tiny-qwen3", QKV, {**GEMM, "block_m": 3})
    assert main(generate(str(tiny_config), url, "--dispatch", "baseline")) == 0
    baseline = json.loads(capsys.readouterr().out)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    assert main(generate(str(tiny_config), url, "--allow-predicted")) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == baseline["tokens"]
    lines = [r.getMessage() for r in caplog.records if r.name == "tuneforge.engine" and "block_m=3" in r.getMessage()]
    assert lines == [f"dispatch: gemm runs the torch baseline for {QKV.key}: the stored config cannot run on "
                     f"interpreter: block_m=3 is not one of [16, 32, 64, 128, 256]"]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _build_rank(world, settings):
    from tuneforge.engine.cli import build
    lines = _Lines()
    logging.getLogger("tuneforge.engine").addHandler(lines)
    model, ops = build(settings, world)
    for m in (1, 3):
        ops.config("gemm", model.dtype, m=m, n=128, k=64)
        ops.config("rmsnorm", model.dtype, m=m, n=64)
        ops.tp_step(m, model.dtype, model.shard, hidden=64, qkv=64, o_in=32, inter=64)
    return lines.lines


def test_tp2_says_the_dispatch_summary_once(tiny_config, tmp_path):
    from tuneforge.engine.cli import _settings
    from tuneforge.world import spawn
    url = f"sqlite:///{tmp_path / 'tf.db'}"
    Store(url).close()
    settings = _settings(build_parser().parse_args(generate(str(tiny_config), url, "--tp", "2")))
    said = spawn(_build_rank, 2, settings, device="cpu", timeout=300.0)
    fingerprint = Environment.predicted(spec("H100"), 2).fingerprint
    assert said == [[f"dispatch: no winners for H100 x2 (predicted) (fingerprint {fingerprint}) in {url}, model "
                     f"tiny-qwen3, TP 2: every op runs the torch baseline (run `tuneforge tune --model tiny-qwen3 "
                     f"--tp 2`)"], []]


def test_the_default_dtype_is_the_one_the_winners_were_tuned_in(tiny_config, tmp_path):
    from tuneforge.engine.cli import _settings
    url = f"sqlite:///{tmp_path / 'tf.db'}"
    Store(url).close()
    dtype = lambda *extra: _settings(build_parser().parse_args(generate(str(tiny_config), url, *extra)))["dtype"]
    assert dtype() == "bf16"                      # nothing tuned: the tuner's default, on the CPU too
    fp16 = Problem.make("gemm", "fp16", m=1, n=128, k=64)
    store_winner(url, "tiny-qwen3", fp16, GEMM)
    assert dtype() == "fp16"
    assert dtype("--dtype", "fp32") == "fp32"


def test_bf16_runs_the_triton_kernels_correctly_on_the_cpu(tiny_config):
    """What makes bf16 the CPU default sound: under the interpreter the kernels upcast bf16 (its dot is
    wrong there), so every kernel at its default config gives the baseline's tokens and logits."""
    from tuneforge.engine.dispatch import Ops
    from tuneforge.engine.generate import Generator
    from tuneforge.models.loading import load_model
    model = load_model(str(tiny_config), dtype=torch.bfloat16, random=True, seed=0)
    base, kernels = (Generator(model, Ops(mode), max_batch=1, max_len=16).generate([[1, 2, 3]], 3, return_logits=True)
                     for mode in ("baseline", "default"))
    assert kernels.tokens == base.tokens
    for a, b in zip(kernels.logits, base.logits):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
