"""Test set-up: CPU runs use Triton's interpreter (set before any kernel module imports triton);
`@pytest.mark.gpu` tests run only where a CUDA GPU is present (`pytest -m gpu`)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

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


def channel_epochs(ctx, heap) -> dict:
    """Every channel's device-side epoch by name (its launches: equal on all ranks where every launch ran on
    every rank); closes the heap."""
    epochs = {name: int(ch.state[0]) for name, ch in ctx.channels.items()}
    heap.close()
    return epochs


def input_errors(calls) -> list[str]:
    """Each call's InputError message, or "no error" where it raised none (bad-input checks in a rank)."""
    from tuneforge.errors import InputError
    errors = []
    for call in calls:
        try:
            call()
            errors.append("no error")
        except InputError as e:
            errors.append(str(e))
    return errors


SM90_SCRIPT = '''
import os, sys, json
os.environ["TRITON_INTERPRET"] = "0"
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernels, types = json.loads(sys.argv[1])
mod = importlib.import_module(module)
for name, consts in kernels:
    fn = getattr(mod, name)
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert compiled.asm["cubin"]
    print("compiled", name)
'''


def compile_for_sm90(module: str, kernels: list, types: dict) -> None:
    """Compile ``module``'s jitted ``kernels`` ([(name, constexprs)], arguments typed by ``types``, i32 by
    default) for sm_90 through triton.compile on a GPU target, in a subprocess (`import tuneforge` here
    runs kernels in the interpreter): PTX and cubin from Triton's ptxas, no GPU needed."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", SM90_SCRIPT, json.dumps([module, kernels, types])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[1::2] == [name for name, _ in kernels]


# The dashboard tests' database (test_dashboard, test_dashboard_browser): one session fixture here, so
# both modules share one pair of tuning runs.
DASHBOARD_MODEL = "Qwen3-0.6B"
DASHBOARD_TUNE_ARGS = ["--model", DASHBOARD_MODEL, "--buckets", "1,16", "--prefill-buckets", "512", "--trials", "4",
                       "--no-verify", "--quiet"]


@pytest.fixture(scope="session")
def tuned_db(tmp_path_factory):
    """A database filled by two real tuning runs (H100 x1 and H800 x8, both by the cost model)."""
    path = tmp_path_factory.mktemp("dashboard_db") / "tuned.db"
    url = f"sqlite:///{path}"
    for extra in (["--target", "H100"], ["--target", "H800", "--tp", "8"]):
        run = subprocess.run([sys.executable, "-m", "tuneforge.cli", "tune", *DASHBOARD_TUNE_ARGS, *extra,
                              "--db", url], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"tuneforge tune {' '.join(extra)} failed:\n{run.stdout}\n{run.stderr}"
    from tuneforge.db.store import Store
    store = Store(url, create=False)
    envs = {e.gpu_name: e for e in store.environments()}
    store.close()
    assert set(envs) == {"H100", "H800"}, envs
    return SimpleNamespace(url=url, path=path, h100=envs["H100"], h800=envs["H800"])
