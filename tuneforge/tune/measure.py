"""Timing: warm-up, CUDA events (or a CUDA graph of many calls), median of many, rotated inputs
and an L2 flush so caches do not flatter; and the speed-of-light figure a time is compared with."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    samples: int
    method: str

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


_flush_buf: dict = {}
# ~100 us at GPU clocks: longer than a Python launcher or a graph launch takes. The GPU sleeps this
# long before each timed call or replay, so the host's launch is hidden, not counted as the calls' time
# (without it one tiny kernel in a graph timed 9.7 us a replay on an H200, 2026-12-03: the graph launch)
_HOST_GAP_CYCLES = 200_000


def _flush_l2(device) -> None:
    buf = _flush_buf.get(device)
    if buf is None:
        # Twice the largest L2 of the targets (B300 126 MB) so every line is evicted.
        buf = _flush_buf[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    buf.zero_()


def _summary(samples: list[float], method: str) -> Timing:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    return Timing(statistics.median(s), q(0.2), q(0.8), len(s), method)


def time_calls(calls: Sequence[Callable[[], object]], *, warmup: int = 10, rep: int = 50,
               flush_l2: bool = True, graph: bool = False, barrier: Callable[[], None] | None = None) -> Timing:
    """Time ``calls`` (closures over different input sets, rotated so no set stays cached).

    ``graph=True`` captures one pass over all calls in a CUDA graph and times replays (launch gaps
    vanish, as in a served decode step); otherwise each call is timed alone with events, after an
    L2 flush. ``barrier`` (multi-rank) is called before timing starts so all ranks start together.
    Without a GPU, host time is reported (interpreter runs: meaningful only relative to each other).
    """
    calls = list(calls)
    if not torch.cuda.is_available():
        for c in calls[:1]:
            c()
        samples = []
        for i in range(max(3, min(rep, 5))):
            t = time.perf_counter()
            calls[i % len(calls)]()
            samples.append(time.perf_counter() - t)
        return _summary(samples, "host-clock")
    dev = torch.cuda.current_device()
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    if barrier is not None:
        barrier()
    if graph:
        return replay_times([_capture(calls)], [len(calls)], max(5, rep // len(calls)))[0]
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for i in range(rep):
        if flush_l2:
            _flush_l2(dev)
        torch.cuda._sleep(_HOST_GAP_CYCLES)
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)],
                    "cuda-events" + ("+l2flush" if flush_l2 else ""))


def _capture(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """One CUDA graph of one pass over ``calls`` (warmed in the capture stream, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for c in calls:
            c()
        stream.synchronize()
        with torch.cuda.graph(g, stream=stream):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    g.replay()
    torch.cuda.synchronize()
    return g


def replay_times(graphs: Sequence[torch.cuda.CUDAGraph], calls_per_graph: Sequence[int],
                  rounds: int) -> list[Timing]:
    """Per-call time of each graph over ``rounds`` rounds that replay every graph once, in turn."""
    samples = [[] for _ in graphs]
    for _ in range(rounds):
        for g, n, out in zip(graphs, calls_per_graph, samples):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(_HOST_GAP_CYCLES)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3 / n)
    return [_summary(s, "cuda-graph") for s in samples]


def time_interleaved(candidates: Sequence[Sequence[Callable[[], object]]], *, rounds: int = 20,
                     warmup: int = 10) -> list[Timing]:
    """Time several candidates (each a list of calls over rotated input sets, captured as one CUDA
    graph) with their replays interleaved A, B, C, A, B, C, ...: drift in clocks and power (an H100
    slows down as a long GEMM run heats it) then reaches all of them alike, so their ratios are fair
    where back-to-back runs of one config differed by up to 20 % on an H100. Needs a GPU."""
    graphs = []
    for calls in candidates:
        for i in range(warmup):
            calls[i % len(calls)]()
        graphs.append(_capture(calls))
    return replay_times(graphs, [len(c) for c in candidates], rounds)


def speed_of_light(flops: float, nbytes: float, spec, dtype: str = "bf16") -> float:
    """The floor in seconds: the larger of compute time at peak and memory time at HBM bandwidth."""
    return max(flops / spec.peak_flops(dtype) if flops else 0.0, nbytes / spec.hbm_bytes_per_s)


def percent_of_light(seconds: float, flops: float, nbytes: float, spec, dtype: str = "bf16") -> float:
    return 100.0 * speed_of_light(flops, nbytes, spec, dtype) / seconds if seconds > 0 else 0.0
