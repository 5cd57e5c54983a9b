"""The GEMM template's search space, constraints, default config and portfolio (host-side policy;
the kernel and its launcher are ``kernels/gemm.py``, which re-exports these names)."""
from __future__ import annotations

import triton

from tuneforge.dsl.problem import Problem
from tuneforge.dsl.space import Space, categorical, pow2
from tuneforge.kernels._common import first_rejection, tile_past_problem
from tuneforge.models.problems import GEMM_EPILOGUES
from tuneforge.dsl.devices import DeviceSpec

ELEM_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# fp32 accumulator registers per thread a config may need (BM*BN / threads); beyond it ptxas spills.
MAX_ACC_REGISTERS = 128
# Split-K only pays where the M x N tiles cannot fill the device; past this many rows it only adds traffic.
SPLIT_K_MAX_M = 512
# tiles: whole tiles (optionally split-K); stream: stream-K over all tiles; hybrid: whole tiles for
# the full waves, the tiles of the last, part-empty one split-K'd to fill it.
SCHEDULES = ("tiles", "stream", "hybrid")
SPLITS = (1, 2, 3, 4, 6, 8, 16)
# Tile widths: powers of two, and a power of two plus a smaller one (two accumulators, whole tiles
# only) -- 512 x 5120 makes 80 tiles of 128 x 256 (61 % of an H100's 132 SMs) but 128 of 128 x 160.
BLOCK_NS = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256)


# --- space, constraints, default config ----------------------------------------------------------

def space(problem: Problem) -> Space:
    return Space(
        pow2("block_m", 16, 256), categorical("block_n", BLOCK_NS), pow2("block_k", 16, 256),
        categorical("group_m", [1, 4, 8, 16]),
        categorical("num_warps", [4, 8]),
        categorical("num_stages", [2, 3, 4, 5]),
        categorical("schedule", SCHEDULES),
        categorical("split_k", SPLITS, when={"schedule": ("tiles",)}),
        categorical("programs_per_sm", [1, 2, 4]),
        categorical("tma", [False, True]),
        categorical("flatten", [False, True]),
    )


def whole_tiles_config(tiles: dict) -> dict:
    """A full config for tiles a fused kernel's config chose: whole tiles, one program per SM, no
    flattening (what the fused kernels' own persistent loops run)."""
    return {**tiles, "schedule": "tiles", "split_k": 1, "programs_per_sm": 1, "flatten": False}


def split_width(block_n: int) -> tuple[int, int]:
    """A tile width as (power of two, the rest): 192 -> (128, 64), 128 -> (128, 0)."""
    high = 1 << (block_n.bit_length() - 1)
    return high, block_n - high


def fusion_of(problem: Problem) -> tuple[bool, str]:
    """(RMSNorm prologue, epilogue name) of a gemm or gemm_fused problem."""
    return bool(problem.shape.get("norm", 0)), GEMM_EPILOGUES[problem.shape.get("epi", 0)]


def out_width(problem: Problem) -> int:
    """Output columns: the weight's rows, half of them for the SiLU-mul pair (gate rows, then up rows)."""
    return problem["n"] // 2 if fusion_of(problem)[1] == "silu_mul" else problem["n"]


def output_tiles(problem: Problem, block_m: int, block_n: int) -> int:
    return -(-problem["m"] // block_m) * -(-problem["n"] // block_n)


def tma_unavailable(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    """A config's TMA loads (``tma``; moe_gemm's packed schedule's too) need a TMA device and 16-byte rows of k."""
    if not config.get("tma"):
        return None
    if "tma" not in spec.features:   # the launcher's interpreter spec has none either
        return f"tma: {spec.name} has no TMA"
    if problem["k"] * ELEM_SIZE[problem.dtype] % 16:
        return f"tma: rows of k={problem['k']} {problem.dtype} elements are not 16-byte aligned"
    return None


def smem_overflow(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    need = config["num_stages"] * (config["block_m"] + config["block_n"]) * config["block_k"] * ELEM_SIZE[problem.dtype]
    if need > spec.smem_per_block:
        return f"shared memory: {need} bytes for the pipeline > {spec.smem_per_block} on {spec.name}"
    return None


def register_pressure(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    regs = config["block_m"] * config["block_n"] // (32 * config["num_warps"])
    if regs > MAX_ACC_REGISTERS:
        return f"registers: {regs} accumulator registers per thread > {MAX_ACC_REGISTERS}"
    return None


def split_k_insane(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    if config.get("schedule") == "stream":
        if problem["m"] > SPLIT_K_MAX_M:
            return f"schedule: m={problem['m']} > {SPLIT_K_MAX_M} fills the device in whole tiles (stream-K only adds slices)"
        return None
    if config.get("schedule") == "hybrid":
        tiles = output_tiles(problem, config["block_m"], config["block_n"])
        slots = spec.sms * config.get("programs_per_sm", 1)
        if tiles <= slots:
            return f"schedule: hybrid with {tiles} tiles <= {slots} programs has no whole wave (that is stream)"
        if tiles % slots == 0:
            return f"schedule: hybrid with {tiles} tiles fills {tiles // slots} waves exactly (that is tiles)"
        return None
    split, bk, k = config.get("split_k", 1), config["block_k"], problem["k"]
    if split == 1:
        return None
    if problem["m"] > SPLIT_K_MAX_M:
        return f"split_k: m={problem['m']} > {SPLIT_K_MAX_M} fills the device without splitting k"
    k_per_split = -(-(-(-k // split)) // bk) * bk
    if (split - 1) * k_per_split >= k:
        return f"split_k: {split} splits of k={k} in blocks of {bk} leave a split empty"
    return None


def wide_tile_split(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    if split_width(config["block_n"])[1] and (config.get("schedule", "tiles") != "tiles" or config.get("split_k", 1) > 1):
        return (f"block_n={config['block_n']}: tiles that are not a power of two wide run whole "
                f"(schedule tiles, split_k 1)")
    return None


def flatten_crowds_sm(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    # measured on an H100: the flattened loop's extra buffers stop two programs sharing an SM (1.5x slower)
    if config.get("flatten") and config.get("programs_per_sm", 1) > 1:
        return f"flatten: the flattened loop's buffers leave room for one program per SM, not {config['programs_per_sm']}"
    return None


def tile_exceeds_problem(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    return tile_past_problem(config, ((name, dim, problem[dim], 16)
                                      for name, dim in (("block_m", "m"), ("block_n", "n"), ("block_k", "k"))))


# Constraints a launch must pass (the kernel could not run otherwise) ...
LAUNCH_CONSTRAINTS = (tma_unavailable, smem_overflow, wide_tile_split)
# ... and those that only keep the search away from configs that waste time.
CONSTRAINTS = LAUNCH_CONSTRAINTS + (register_pressure, split_k_insane, flatten_crowds_sm, tile_exceeds_problem)


# A split fills the waves well enough at this fraction; more slices only add fp32 traffic.
SPLIT_FILL_ENOUGH = 0.85


def split_k_to_fill(config: dict, problem: Problem, spec: DeviceSpec) -> int:
    """The smallest split whose (tile, split) units fill the persistent grid's waves to
    SPLIT_FILL_ENOUGH, else the one that fills them best, keeping >= 4 K blocks per split; 1 when
    the tiles alone fill a wave."""
    tiles = output_tiles(problem, config["block_m"], config["block_n"])
    slots = spec.sms * config.get("programs_per_sm", 1)
    if tiles >= slots:
        return 1

    def fill(split: int) -> float:
        units = tiles * split
        return units / (-(-units // slots) * slots)

    usable = [s for s in SPLITS
              if s == 1 or (split_k_insane({**config, "schedule": "tiles", "split_k": s}, problem, spec) is None
                            and problem["k"] // s >= 4 * config["block_k"])]
    enough = [s for s in usable if fill(s) >= SPLIT_FILL_ENOUGH]
    return min(enough) if enough else max(usable, key=lambda s: (round(fill(s), 2), -s))


def heuristic_config(problem: Problem, spec: DeviceSpec, programs_per_sm: int | None = None) -> dict:
    """A rule-of-thumb config (from bench_gemm's searches on an H100, bf16). Decode-sized M streams the
    weight with 16x64x256 tiles, stream-K where the tiles cannot fill the SMs twice over and each
    program still gets several K iterations (pointer loads: TMA gained nothing there), else whole
    tiles split-K'd to fill the waves. Up to 256 rows: 64x64x128 tiles, two programs per SM, split-K'd
    when they fill less than half the slots. Up to 1024 rows: 128x128x64, two per SM. Beyond:
    128x256x64, 3 stages, 8 warps, hybrid (the last wave's tiles split) when the tiles make more
    than one but fewer than four waves. Grouped order and TMA where available. Where a constraint
    rejects it (fp32, small shared memory, fused kernels' share of it) shrinks stages to 3, BLOCK_K
    to 32, stages to 2, then BLOCK_N, BLOCK_K, BLOCK_M until every constraint passes.
    ``programs_per_sm=1`` (fused kernels' persistent GEMMs): tiles for one program per SM, 64x128x128
    up to 256 rows and 128x256x64 beyond."""
    one_per_sm = programs_per_sm == 1
    m, k = problem["m"], problem["k"]
    if m <= 16:
        cfg = dict(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4, num_stages=3, programs_per_sm=1)
    elif m <= 256 and one_per_sm:
        cfg = dict(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=3, programs_per_sm=1)
    elif m <= 256:
        cfg = dict(block_m=64, block_n=64, block_k=128, group_m=8, num_warps=4, num_stages=3, programs_per_sm=2)
    elif m <= 1024 and not one_per_sm:
        cfg = dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3, programs_per_sm=2)
    else:
        cfg = dict(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3, programs_per_sm=1)
    # clamp tiles to the problem
    for name, dim in (("block_m", "m"), ("block_n", "n"), ("block_k", "k")):
        cfg[name] = min(cfg[name], max(16, triton.next_power_of_2(problem[dim])))
    tiles = output_tiles(problem, cfg["block_m"], cfg["block_n"])
    slots = spec.sms * cfg["programs_per_sm"]
    iterations = tiles * -(-k // cfg["block_k"])
    tma = tma_unavailable({**cfg, "tma": True}, problem, spec) is None
    # flattening pipelines across a program's tiles: it pays where each program has several
    cfg.update(schedule="tiles", split_k=1, tma=tma, flatten=m > 1024)
    # stream-K where whole tiles leave a wave part-empty (H200, 18992 x 5120 at 1 token: 297 tiles, 2.25
    # waves; stream-K 1.21x faster) and each program still gets several K iterations
    waves_filled = tiles / (-(-tiles // spec.sms) * spec.sms)
    if m <= 16 and (tiles < 2 * spec.sms or waves_filled < 0.9) and iterations >= 6 * spec.sms:
        del cfg["split_k"]
        cfg.update(schedule="stream", tma=False)
    elif m <= 16 or (m <= 256 and 2 * tiles < slots):
        cfg["split_k"] = split_k_to_fill(cfg, problem, spec)
    elif m > 1024 and slots < tiles < 4 * slots and tiles % slots:
        del cfg["split_k"]
        cfg["schedule"] = "hybrid"
    # keep 3 stages (the pipeline depth that hides HBM latency) before giving up BLOCK_K
    for shrink, floor in (("num_stages", 3), ("block_k", 32), ("num_stages", 2), ("block_n", 16),
                          ("block_k", 16), ("block_m", 16)):
        while first_rejection(cfg, problem, spec, CONSTRAINTS) is not None and cfg[shrink] > floor:
            cfg[shrink] = cfg[shrink] - 1 if shrink == "num_stages" else cfg[shrink] // 2
    return cfg


def default_config(problem: Problem, spec: DeviceSpec, programs_per_sm: int | None = None) -> dict:
    """The config ``gemm(x, w)`` runs untuned: the rule's config (``heuristic_config``) unless the cost
    model predicts one of the shape's portfolio families (``_families``: whole, split-K, stream-K and
    hybrid tiles) faster by more than DEFAULT_MARGIN, about its error (tests/test_calibration.py), so
    no token count between the tuned buckets is left to one rule's blind spot. ``programs_per_sm=1``
    (the fused kernels' persistent GEMMs, whole tiles): the rule."""
    if programs_per_sm == 1:
        return heuristic_config(problem, spec, programs_per_sm)
    key = (problem.key, repr(spec))
    if key not in _DEFAULTS:
        from tuneforge.dsl.roofline import gemm_config_time
        m, n, k = problem["m"], problem["n"], problem["k"]
        # min keeps the first of equals: the heuristic's config wins ties
        families = _families(problem, spec) or [heuristic_config(problem, spec)]
        time = {i: gemm_config_time(m, n, k, c, spec, problem.dtype) for i, c in enumerate(families)}
        best = min(time, key=time.get)
        # the rule's config (first) unless the model, accurate to about x1.15, predicts a clear gain
        _DEFAULTS[key] = families[best if time[best] * (1 + DEFAULT_MARGIN) < time[0] else 0]
    return dict(_DEFAULTS[key])


_DEFAULTS: dict[tuple[str, str], dict] = {}
DEFAULT_MARGIN = 0.15


def portfolio(problem: Problem, spec: DeviceSpec) -> list[dict]:
    """Configs worth trying first for this shape (the default first), per token class: whole tiles,
    unsplit and split-K to fill the waves, with and without TMA (flattened, past 512 tokens), and past
    decode sizes the hybrid (whole waves, the last split); up to 512 tokens also stream-K on the same tiles (1 program
    per SM; up to 256 tokens 2 too, and 4 for decode), listed first for decode; from 257 to 1024 tokens
    also 128 x 96 / 160 / 192 whole tiles. The tuner enqueues them before its sampler explores;
    bench_gemm's short search is exactly this list."""
    from tuneforge.kernels.gemm import TEMPLATE      # the template registered with this policy
    configs = [default_config(problem, spec)] + [c for c in _families(problem, spec, flatten_variants=True)]
    unique = []
    for c in configs:
        if c not in unique and TEMPLATE.reject_reason(c, problem, spec) is None:
            unique.append(c)
    return unique


def _families(problem: Problem, spec: DeviceSpec, flatten_variants: bool = False) -> list[dict]:
    """The heuristic's config, then the portfolio's families for the shape (the family that won most
    often on the H100 first), each passing gemm's constraints; ``flatten_variants``: also the
    flattened twin of each one-program-per-SM whole-tile config (the portfolio tries both)."""
    m = problem["m"]
    base = dict(group_m=1 if m <= 16 else 8, tma=True)
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, programs per SM)
    if m <= 16:
        tiles = [(16, 64, 128, 4, 4, 1), (16, 128, 128, 4, 4, 1), (16, 64, 256, 3, 4, 1), (16, 32, 256, 4, 4, 1)]
    elif m <= 256:
        tiles = [(64, 64, 128, 3, 4, 2), (128, 64, 64, 4, 4, 2), (64, 128, 128, 3, 4, 1), (128, 128, 64, 4, 8, 1),
                 (64, 128, 64, 4, 4, 1), (64, 256, 64, 3, 8, 1), (128, 64, 64, 4, 4, 1), (128, 256, 64, 3, 8, 1)]
    else:   # more, smaller tiles (two programs per SM) where 128 x 256 tiles leave a wave part-empty
        tiles = [(128, 128, 64, 3, 8, 2), (128, 256, 64, 3, 8, 1), (128, 128, 64, 4, 8, 1), (256, 128, 64, 3, 8, 1),
                 (64, 256, 64, 3, 8, 1), (64, 128, 64, 4, 4, 2)]
    whole, stream = [], []
    if 256 < m <= 1024:   # tiles a power of two plus a smaller one wide: the only sizes where they won (by 3-5 %)
        for bn, stages, pps in ((96, 4, 2), (160, 3, 1), (192, 3, 1)):
            whole.append(dict(base, block_m=128, block_n=bn, block_k=64, num_stages=stages, num_warps=8,
                              programs_per_sm=pps, schedule="tiles", split_k=1, flatten=m > SPLIT_K_MAX_M and pps == 1))
    for bm, bn, bk, stages, warps, pps in tiles:
        bm, bn, bk = (min(b, max(16, triton.next_power_of_2(problem[d]))) for b, d in ((bm, "m"), (bn, "n"), (bk, "k")))
        shape = dict(base, block_m=bm, block_n=bn, block_k=bk, num_stages=stages, num_warps=warps, programs_per_sm=pps)
        for tma in (True, False):
            cfg = dict(shape, schedule="tiles", split_k=1, tma=tma, flatten=False)
            whole.append(cfg)
            if m > SPLIT_K_MAX_M and pps == 1 and flatten_variants:
                whole.append(dict(cfg, flatten=True))
            if m <= SPLIT_K_MAX_M:          # the split that fills the waves best, if any
                whole.append(dict(cfg, split_k=split_k_to_fill(cfg, problem, spec)))
        if m <= SPLIT_K_MAX_M:
            for stream_pps in (1, 2, 4) if m <= 16 else (1, 2) if m <= 256 else (1,):
                stream.append(dict(shape, schedule="stream", programs_per_sm=stream_pps, tma=m > 16, flatten=False))
        if m > 16:                          # whole waves, then the part-empty last one split
            whole.append(dict(shape, schedule="hybrid", tma=True, flatten=m > SPLIT_K_MAX_M and pps == 1))
    configs = [heuristic_config(problem, spec)] + (stream + whole if m <= 16 else whole + stream)
    return [c for c in configs if first_rejection(c, problem, spec, CONSTRAINTS) is None]
