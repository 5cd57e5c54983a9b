"""gemm's kernel: gluon_ws family (kernels/_gemm_gluon.py): where its constraints remove it (the
interpreter, GPUs without wgmma, fp32, rows TMA cannot address), that configs without ``kernel`` stay
Triton ones, the register budget of its partitions; opt-in, a compile for sm_90 with triton 3.6's Gluon
(``TUNEFORGE_TRITON36=<site dir>``); on a GPU, its configs against the fp64 reference with
NaN-poisoned outputs on ragged shapes (one and several tiles per program, both consumers busy), in a
CUDA graph, each config's launches in a fresh process (a crash or hang is that config's verdict, not
the suite's end), and the fallback for rows TMA cannot take."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

from tuneforge.dsl import Problem, check, compare
from tuneforge.dsl.devices import SPECS
from tuneforge.errors import ConfigRejected
from tuneforge.kernels import _gemm_gluon as GW
from tuneforge.kernels import gemm as G

CPU = torch.device("cpu")
WS = dict(kernel="gluon_ws", block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4, consumers=1)


def gemm_problem(dtype="bf16", m=129, n=1280, k=5120):
    return Problem.make("gemm", dtype, m=m, n=n, k=k)


@pytest.mark.parametrize("spec_name,dims,reason", [
    ("H200", {}, "the interpreter runs no Gluon kernels"),
    ("A100", {}, "A100 has no tma, warp_specialize, wgmma"),
    ("B200", {}, "B200 has no wgmma"),          # Blackwell's MMAs are tcgen05
    ("MI300X", {}, "MI300X has no tma, warp_specialize, wgmma"),
    ("H200", {"dtype": "fp32"}, "fp32 is not bf16/fp16"),
    ("H200", {"k": 5124}, "rows of k=5124 bf16 elements are not 16-byte aligned (TMA)"),
    ("H200", {"n": 1281}, "rows of n=1281 bf16 elements are not 16-byte aligned (TMA)"),
])
def test_constraints_remove_the_family_where_it_cannot_run(spec_name, dims, reason):
    why = G.TEMPLATE.reject_reason(WS, gemm_problem(**dims), SPECS[spec_name])
    assert why == f"kernel gluon_ws: {reason}"
    assert GW.portfolio(gemm_problem(**dims), SPECS[spec_name]) == []


def test_under_the_interpreter_a_gluon_config_is_refused_in_one_line_and_the_default_stays_triton():
    x, w = torch.randn(5, 64), torch.randn(24, 64)
    with pytest.raises(ConfigRejected, match="kernel gluon_ws: interpreter has no tma, warp_specialize, wgmma$"):
        G.gemm(x.bfloat16(), w.bfloat16(), config=WS)
    problem = gemm_problem("fp32", 5, 24, 64)
    default = G.TEMPLATE.default_config(problem, G.launch_spec(CPU))
    assert default["kernel"] == "triton" and G.TEMPLATE.reject_reason(default, problem, G.launch_spec(CPU)) is None
    assert torch.allclose(G.gemm(x, w, config=default), x @ w.T, atol=1e-5)
    seeds = G.TEMPLATE.seeds(problem, G.launch_spec(CPU))
    assert seeds and all(c["kernel"] != "gluon_ws" for c in seeds)      # gemv ones run under the interpreter


def test_the_family_space_keeps_each_kernels_parameters_apart(monkeypatch):
    import tuneforge
    monkeypatch.setattr(tuneforge, "INTERPRETED", False)     # the tile constraints, as on the GPU
    problem = gemm_problem(m=512, n=1024, k=1024)
    space = G.TEMPLATE.space(problem)
    triton_config = G.default_config(problem, SPECS["H200"])
    assert space.validate(triton_config) == {"kernel": "triton", **triton_config}   # no kernel: a Triton one
    assert space.validate(WS) == WS
    with pytest.raises(ValueError, match=r"not active in this space: \['schedule'\]"):
        space.validate({**WS, "schedule": "tiles"})
    with pytest.raises(ValueError, match="missing parameter 'consumers'"):
        space.validate({k: v for k, v in WS.items() if k != "consumers"})
    # Triton's constraints pass gluon configs (they have no 'tma', 'schedule'), and the reverse
    h200 = SPECS["H200"]
    assert G.TEMPLATE.reject_reason({**WS, "block_m": 32}, problem, h200) == \
        "kernel gluon_ws: block_m=32 is not one of [64, 128, 256]"
    assert G.TEMPLATE.reject_reason({**WS, "num_stages": 5, "block_n": 256}, problem, h200).startswith(
        "kernel gluon_ws: shared memory: 312320 bytes")   # 5 x (128 + 256) x 64 x 2 + 128 x 256 x 2 + 1024
    assert G.TEMPLATE.reject_reason({**WS, "consumers": 2, "num_warps": 8}, problem, h200) == \
        "kernel gluon_ws: two consumers run 4 warps each"


@pytest.mark.parametrize("m", [1, 7, 129, 511, 4097])
def test_the_portfolio_on_hopper_fits_registers_and_shared_memory(m, monkeypatch):
    import tuneforge
    monkeypatch.setattr(tuneforge, "INTERPRETED", False)     # as on the GPU: only the device decides
    problem = gemm_problem(m=m)
    configs = GW.portfolio(problem, SPECS["H200"])
    assert len(configs) >= 4
    for c in configs:
        maxnreg, consumer = GW.launch_registers(c)
        groups = c["consumers"] * c["num_warps"] // 4 + 1          # warpgroups: consumers + the loader's
        assert maxnreg * 128 * groups <= GW.REGISTER_FILE and maxnreg % 8 == 0 and consumer <= 256
        assert consumer * 128 * (groups - 1) + GW.LOADER_REGS * 128 <= maxnreg * 128 * groups
        assert GW.smem_bytes(c, "bf16") <= SPECS["H200"].smem_per_block


# --- opt-in: compile for sm_90 against triton 3.6 (the GPU image's) -------------------------------

COMPILE = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from tuneforge.kernels import _gemm_gluon as GW
for cfg in json.loads(sys.argv[1]):
    bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    maxnreg, consumer_regs = GW.launch_registers(cfg)
    consts = dict(GROUP_M=cfg["group_m"], STAGES=cfg["num_stages"], CONSUMERS=cfg["consumers"],
                  CONSUMER_REGS=consumer_regs)
    descs = zip(("x_desc", "w_desc", "y_desc"), ([bm, bk], [bn, bk], [bm, bn]), GW._layouts(bm, bn, bk, torch.bfloat16))
    sig = {name: f"tensordesc<bf16[{shape[0]}, {shape[1]}],{layout!r}>" for name, shape, layout in descs}
    sig.update(M="i32", N="i32", K="i32", **{c: "constexpr" for c in consts})
    compiled = triton.compile(GluonASTSource(fn=GW.gemm_ws_kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg["num_warps"], maxnreg=maxnreg))
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 232448, compiled.metadata.shared
    print(triton.__version__, "compiled", bm, bn, bk, cfg["consumers"], compiled.metadata.shared)
'''


def test_the_kernel_compiles_for_sm90_with_triton_3_6():
    site = os.environ.get("TUNEFORGE_TRITON36")
    if not site:
        pytest.skip("set TUNEFORGE_TRITON36 to a directory holding triton 3.6 (pip install --target)")
    configs = [WS, {**WS, "consumers": 2}, {**WS, "block_n": 256, "num_warps": 8, "num_stages": 3},
               {**WS, "block_m": 64, "block_n": 64, "block_k": 128}]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([site, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])}
    r = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(configs)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [["3.6.0", "compiled"]] * len(configs)


# --- GPU: every Gluon launch in a fresh process, so a crash or hang leaves this one's CUDA context alive ---

def hopper_configs(problem: Problem, device) -> list[dict]:
    spec = G.launch_spec(device)
    if G.TEMPLATE.reject_reason(WS, gemm_problem(), spec):
        pytest.skip(f"no Gluon family here: {G.TEMPLATE.reject_reason(WS, gemm_problem(), spec)}")
    return GW.portfolio(problem, spec)


def _report(results) -> None:
    """(child) one config's verdict line: the first failing result's reason, the worst error."""
    bad = next((r for r in results if not r), None)
    print(json.dumps({"ok": bad is None, "max_err": max(r.max_abs_err for r in results),
                      "reason": bad.reason if bad else ""}), flush=True)


def gpu_launches(dtype: str, dims: dict, configs: list, seeds: list) -> None:
    """(child) each config once per seed, on fresh inputs with a NaN-poisoned output, against the fp64
    reference; one verdict line per config."""
    device, problem = torch.device("cuda"), Problem.make("gemm", dtype, **dims)
    for config in configs:
        results = []
        for seed in seeds:          # one process, several launches: no barrier state carried between them
            inputs = G.make_inputs(problem, device, seed)
            assert all(G._tma_ready(inputs[name]) for name in ("x", "w", "out"))   # the Gluon kernel runs
            results.append(check(G.TEMPLATE, problem, config, device=device, inputs=inputs))
        _report(results)


def gpu_graph_replays(dtype: str, dims: dict, configs: list, seeds: list) -> None:
    """(child) each config captured in a CUDA graph (compiled outside the capture), replayed on each seed's
    x with a NaN-poisoned output; one verdict line per config."""
    device, problem = torch.device("cuda"), Problem.make("gemm", dtype, **dims)
    for config in configs:
        inputs = G.make_inputs(problem, device, seed=0)
        x, w, out = inputs["x"], inputs["w"], inputs["out"]
        G.gemm(x, w, out=out, config=config)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            G.gemm(x, w, out=out, config=config)
        results = []
        for seed in seeds:
            x.copy_(G.make_inputs(problem, device, seed=seed)["x"])
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize(device)
            results.append(compare(out, G.reference(x, w), out.dtype))
        _report(results)


CHILD = "import json, sys; sys.path.insert(0, sys.argv[1]); import test_gemm_gluon as t; " \
        "name, *args = json.loads(sys.argv[2]); getattr(t, name)(*args)"


def _failure_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["(no stderr)"])[-1][:300]


def isolated(child, problem: Problem, configs: list, seeds, timeout_each: float = 90) -> list[dict]:
    """``child(dtype, dims, configs, seeds)`` (a function above) in fresh processes: one verdict per config,
    ``{"status": "ok" | "wrong" | "crash" | "hang", "detail", "max_err"}``. A crash, or no verdict line
    within ``timeout_each`` s (a hang: the process is killed), is the verdict of the config in flight;
    the configs after it run in a new process."""
    verdicts = []
    while len(verdicts) < len(configs):
        rest = configs[len(verdicts):]
        args = json.dumps([child.__name__, problem.dtype, dict(problem.dims), rest, list(seeds)])
        with tempfile.TemporaryFile("w+") as err:        # a file: a chatty stderr cannot block the child
            proc = subprocess.Popen([sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), args],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            lines = queue.Queue()
            threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                             daemon=True).start()
            hung = False
            while len(verdicts) < len(configs):
                try:
                    line = lines.get(timeout=timeout_each)
                except queue.Empty:
                    hung = True
                    proc.kill()
                    break
                if line is None:
                    break
                if line.startswith("{"):
                    v = json.loads(line)
                    verdicts.append({"status": "ok" if v["ok"] else "wrong", "detail": v["reason"],
                                     "max_err": v["max_err"]})
            try:
                code = proc.wait(timeout=timeout_each)
            except subprocess.TimeoutExpired:       # every verdict in, stuck on the way out
                proc.kill()
                code = proc.wait()
            err.seek(0)
            if len(verdicts) < len(configs):
                if hung:
                    verdict = {"status": "hang", "detail": f"no verdict within {timeout_each:g} s"}
                else:
                    signal_name = f" ({signal.Signals(-code).name})" if code < 0 else ""
                    verdict = {"status": "crash", "detail": f"rc {code}{signal_name}: {_failure_line(err.read())}"}
                verdicts.append({**verdict, "max_err": None})
    return verdicts


def assert_all_ok(configs: list, verdicts: list[dict]):
    bad = [f"{config}: {v['status']} {v['detail']}" for config, v in zip(configs, verdicts) if v["status"] != "ok"]
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 129, 511, 4097])
@pytest.mark.parametrize("n,k", [(1000, 1048), (1280, 5120)])    # 1000 / 1048: no tile divides them
def test_gpu_gluon_configs_match_reference(device, m, n, k):
    """From m=4097 on, programs take several tiles and two consumers both have some."""
    problem = gemm_problem(m=m, n=n, k=k)
    configs = hopper_configs(problem, device)
    assert configs
    assert_all_ok(configs, isolated(gpu_launches, problem, configs, seeds=[m]))


@pytest.mark.gpu
def test_gpu_gluon_fp16_two_consumers_and_repeated_launches(device):
    problem = gemm_problem("fp16", m=1333, n=5120, k=6400)     # 440 tiles: 3 or 4 per program, both consumers
    hopper_configs(problem, device)
    configs = [{**WS, "consumers": 2}, {**WS, "block_m": 64, "block_n": 256, "consumers": 2}]
    assert_all_ok(configs, isolated(gpu_launches, problem, configs, seeds=[0, 1, 2]))


@pytest.mark.gpu
def test_gpu_gluon_in_a_cuda_graph(device):
    problem = gemm_problem(m=2200, n=1280, k=5120)              # 180 tiles of 128 x 128: some programs take two
    hopper_configs(problem, device)
    configs = [WS, {**WS, "consumers": 2}]
    assert_all_ok(configs, isolated(gpu_graph_replays, problem, configs, seeds=[1, 2]))


@pytest.mark.gpu
def test_gpu_rows_tma_cannot_take_fall_back_to_the_default(device):
    problem = gemm_problem(m=64, n=1280, k=512)
    hopper_configs(problem, device)
    inputs = G.make_inputs(problem, device, seed=0)
    x = torch.empty(64, 512 + 3, device=device, dtype=torch.bfloat16)[:, :512].copy_(inputs["x"])
    assert not G._tma_ready(x)                     # row stride 515 elements: not 16-byte aligned
    out = inputs["out"].fill_(float("nan"))
    G.gemm(x, inputs["w"], out=out, config=WS)
    result = compare(out, G.reference(x, inputs["w"]), out.dtype)
    assert result, result.reason
