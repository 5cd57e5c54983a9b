"""Test set-up: CPU runs use Triton's interpreter (set before any kernel module imports triton);
`@pytest.mark.gpu` tests run only where a CUDA GPU is present (`pytest -m gpu`)."""
import json
import os

import tuneforge  # noqa: F401  sets TRITON_INTERPRET=1 on GPU-less machines

import pytest
import torch

HAS_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")


# A Qwen3 small enough for the interpreter: tuning and planning tests read it as a config.json.
TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "num_hidden_layers": 2, "vocab_size": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
              "tie_word_embeddings": False, "max_position_embeddings": 512}


@pytest.fixture
def tiny_config(tmp_path):
    """Path of tiny-qwen3/config.json (the model's name is its folder's)."""
    path = tmp_path / "tiny-qwen3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_QWEN3))
    return path


def graph_replays(ctx, heap, channel: str, run, outs: list, configs: list, replays: int, refill, reference,
                  label: str):
    """Warm ``run(out, config)`` for each config (compile, load, carve the heap), capture them all in one
    CUDA graph and replay it ``replays`` times, after ``refill(r)`` wrote replay r's inputs and the outputs
    were poisoned with NaN; each output is compared with ``reference()``. Returns the failures (named by
    ``config[label]``) and ``channel``'s device-side epoch; closes the heap."""
    from tuneforge.dsl.check import compare
    for out, config in zip(outs, configs):
        run(out, config)
    graph = ctx.capture(lambda: [run(out, config) for out, config in zip(outs, configs)])
    failures = []
    for r in range(replays):
        refill(r)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        ctx.synchronize()
        ref = reference()
        for out, config in zip(outs, configs):
            res = compare(out, ref, out.dtype)
            if not res:
                failures.append(f"replay {r} {config[label]}: {res.reason}")
    epoch = int(ctx.channel(channel, 0).state[0])
    heap.close()
    return failures, epoch


def assert_graph_replays(fn, replays: int, launches: int):
    """``fn(world, replays)`` (a ``graph_replays`` user) on two ranks sharing one GPU: every replay
    right, and the device-side epoch advanced by ``launches`` in the warm-up and in every replay."""
    from tuneforge.world import spawn
    for failures, epoch in spawn(fn, 2, replays, device="cuda", share_gpu=True, timeout=300):
        assert not failures, failures
        assert epoch == launches * (1 + replays)
