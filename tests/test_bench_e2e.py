"""benchmarks/bench_e2e.py on the CPU at a tiny config: tuneforge (tuned, baseline) vs transformers eager
and transformers' static-cache generate (compiled on a GPU only) at several contexts and batch sizes,
the floors' byte counts and the tuned / baseline ratios in the JSON; a tiny Qwen3-MoE runs too, its
floor the experts a step touches. Times here are host-clock figures of the interpreter, not GPU ones."""
import glob
import json

import pytest
import torch

from benchmarks import bench_e2e
from tuneforge.models.configs import load_config
from tuneforge.models.loading import load_model

MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
           max_position_embeddings=512, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           norm_topk_prob=True)


def run(tmp_path, monkeypatch, *argv) -> dict:
    monkeypatch.setenv("TUNEFORGE_DB", str(tmp_path / "none.db"))      # tuned: no database, every op baseline
    assert bench_e2e.main([*argv, "--gen", "2", "--prefill-reps", "1", "--out", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "e2e*.json"))
    return json.load(open(path))


def test_rows_per_context_and_batch_with_transformers_eager_and_static(tmp_path, monkeypatch):
    out = run(tmp_path, monkeypatch, "--model", "tiny-qwen3", "--ctx", "8", "16", "--bsz", "1", "2", "--hf-compile")
    rows = {(r["impl"], r["ctx"], r["bsz"]): r for r in out["rows"]}
    impls = ["tuneforge tuned", "tuneforge baseline", bench_e2e.HF_EAGER, bench_e2e.HF_COMPILE]
    assert sorted(rows) == sorted((i, c, b) for i in impls for c in (8, 16) for b in (1, 2))
    cfg = bench_e2e.TINY
    weights = {b: load_model(cfg.name, config=cfg, random=True, dtype=torch.float32).streamed_weight_bytes(b)
               for b in (1, 2)}
    for (impl, ctx, bsz), r in rows.items():
        assert "skipped" not in r and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0, r
        assert r["weight_bytes"] == weights[bsz]
        assert r["kv_bytes"] == round(bsz * (ctx + 1) * 2 * 2 * 2 * 16 * 4)     # layers x k|v x heads x dim x fp32
        assert "pct_floor" not in r                          # no GPU: no measured bandwidth, no floor
        if impl.startswith("tuneforge"):
            assert r["prefill_reps"] >= 1 and r["graphs"] is False
            assert "prefill_eager_ms" not in r                # no graphs here: nothing to compare them with
            assert r["decode_speedup_vs_hf"] == pytest.approx(
                rows[(bench_e2e.HF_EAGER, ctx, bsz)]["decode_ms_per_token"] / r["decode_ms_per_token"])
        if impl == "tuneforge tuned":
            base = rows[("tuneforge baseline", ctx, bsz)]
            assert r["prefill_vs_baseline"] == pytest.approx(base["prefill_ms"] / r["prefill_ms"])
    # on the CPU transformers' generate does not compile: the row says it ran uncompiled
    assert all(not r["graphs"] and "torch.compile" not in r["dispatch"]
               for (impl, *_), r in rows.items() if impl == bench_e2e.HF_COMPILE)
    slower = out["summary"]["tuned_prefill_slower_than_baseline"]
    assert slower == [dict(ctx=r["ctx"], bsz=r["bsz"], tuned_ms=r["prefill_ms"], baseline_ms=rows[(
        "tuneforge baseline", r["ctx"], r["bsz"])]["prefill_ms"]) for r in out["rows"]
        if r["impl"] == "tuneforge tuned" and r["prefill_vs_baseline"] < 1]


def test_a_moe_model_streams_the_experts_a_step_touches(tmp_path, monkeypatch):
    path = tmp_path / "moe" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(MOE))
    out = run(tmp_path, monkeypatch, "--model", str(path), "--ctx", "8", "--bsz", "1", "--dispatch", "baseline")
    model = load_model(str(path), config=load_config(str(path)), random=True, dtype=torch.float32)
    expert = sum(p[0].numel() for p in (model.layers[0].mlp.gate_up, model.layers[0].mlp.down)) * 4
    every = sum(p.numel() * 4 for p in model.parameters()) - model.embed.numel() * 4
    assert out["summary"]["moe"] is True
    for r in out["rows"]:          # one token: top-2 of 8 experts in each of the 2 layers
        assert r["weight_bytes"] == every - 2 * 6 * expert, r["impl"]
    assert {r["impl"] for r in out["rows"]} == {"tuneforge baseline", bench_e2e.HF_EAGER}


@pytest.mark.parametrize("argv", [["--ctx", "0"], ["--gen", "1"], ["--bsz", "300"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_e2e.main(["--model", "tiny-qwen3", *argv])
    assert e.value.code == 2 and capsys.readouterr().err.count("error:") == 1
