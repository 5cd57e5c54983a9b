"""`tuneforge export-onnx`: the exported prefill graph run by onnxruntime on the CPU equals the engine's
torch baseline prefill (the per-expert MoE loop, the real KV cache) at two prompt lengths (T dynamic),
dense and MoE; bad input and a missing onnx extra are one line."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from test_collection import BLOCKER, ROOT
from test_engine import saved, tiny_hf
from test_moe_model import scaled, tiny_hf_moe
from test_qwen2_moe import TINY_QWEN2_MOE
from tuneforge.cli import main
from tuneforge.engine.dispatch import Ops
from tuneforge.engine.export_onnx import GRAPH, WEIGHTS
from tuneforge.engine.generate import Generator
from tuneforge.models.configs import load_config
from tuneforge.models.loading import load_model


def round_trip(tmp_path, model_dir: str, *flags: str, layers: int | None = None):
    """Export through the CLI, check the graph, and compare onnxruntime's logits with the torch baseline's."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "onnx"
    argv = ["export-onnx", "--model", model_dir, "--out", str(out), *flags]
    assert main(argv + (["--layers", str(layers)] if layers else [])) == 0
    assert sorted(os.listdir(out)) == [GRAPH, WEIGHTS]
    onnx.checker.check_model(str(out / GRAPH))      # by path: the checker reads the external weights too
    cfg = load_config(model_dir)
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    model = load_model(model_dir, random="--random-weights" in flags, config=cfg, dtype=torch.float32)
    engine = Generator(model, Ops("baseline"), max_batch=1, max_len=32, graphs=False)
    session = ort.InferenceSession(str(out / GRAPH), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for t in (3, 11):
        tokens = torch.randint(0, cfg.vocab_size, (1, t), generator=g)
        want = engine.prefill(tokens, torch.tensor([t]), all_logits=True)
        got = torch.from_numpy(session.run(["logits"], {"tokens": tokens.numpy()})[0])
        assert got.shape == (1, t, cfg.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return want


def test_dense_random_weights_round_trip(tmp_path, tmp_path_factory):
    path, _ = saved(tmp_path_factory, tiny_hf(), "tiny-qwen3-config")
    round_trip(tmp_path, path, "--random-weights")


def test_dense_checkpoint_round_trip(tmp_path, tmp_path_factory):
    path, _ = saved(tmp_path_factory, tiny_hf(), "tiny-qwen3")
    logits = round_trip(tmp_path, path)
    assert logits.std() > 0.1          # O(1) logits: a wrong graph cannot pass on tolerance alone


def test_moe_checkpoint_first_layers_round_trip(tmp_path, tmp_path_factory):
    # layers 0 (sparse) and 1 (dense, mlp_only_layers) of three: the dense-masked experts against the
    # engine's per-expert loop
    path, _ = saved(tmp_path_factory, tiny_hf_moe(), "tiny-qwen3-moe")
    assert load_config(path).num_hidden_layers == 3
    logits = round_trip(tmp_path, path, layers=2)
    assert logits.std() > 0.1


def test_qwen2_moe_checkpoint_round_trip(tmp_path, tmp_path_factory):
    # the shared expert's sigmoid gate, the q/k/v bias and RoPE without q/k norm
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    path, _ = saved(tmp_path_factory, scaled(Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY_QWEN2_MOE))), "tiny-qwen2-moe")
    assert round_trip(tmp_path, path).std() > 0.1


@pytest.mark.parametrize("flags, error", [
    (["--model", "Qwen9-1B", "--random-weights"], "unknown model 'Qwen9-1B'"),
    (["--model", "Qwen3-0.6B", "--random-weights", "--layers", "0"], "--layers must be 1..28, got 0"),
    (["--model", "Qwen3-0.6B", "--random-weights", "--out", "FILE"], "is a file, not a directory"),
])
def test_bad_input_is_one_line(tmp_path, capsys, flags, error):
    pytest.importorskip("onnxscript")
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file") if "FILE" in flags else str(tmp_path / "out")
    flags = [str(tmp_path / "file") if f == "FILE" else f for f in flags]
    argv = ["export-onnx", *flags] + ([] if "--out" in flags else ["--out", out])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err, err
    assert not (tmp_path / "out").exists()            # nothing written


def test_missing_extra_is_one_line_naming_it(tmp_path):
    (tmp_path / "absent_packages.py").write_text(BLOCKER.format(absent=("onnx", "onnxscript")))
    argv = ["export-onnx", "--model", "Qwen3-0.6B", "--random-weights", "--out", str(tmp_path / "o")]
    code = f"import sys, absent_packages; from tuneforge.cli import main; sys.exit(main({argv!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "pip install 'tuneforge[onnx]'" in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()
