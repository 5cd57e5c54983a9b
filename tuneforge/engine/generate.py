"""Generation: prefill a batch of prompts, then decode token by token (CUDA graphs on a GPU).

Padding: prompts are RIGHT-padded. Sequence ``b`` occupies cache row ``b`` and its token at position
``p`` sits in slot ``p``, so prefill is a plain causal attention from slot 0 and each decode step
writes slot ``length[b] + step`` of its own row, attending to slots ``<= position`` (pad slots past a
short prompt are overwritten by its generated tokens before any query can see them).

Decode runs one CUDA graph per (batch bucket, KV-length bucket): the batch is padded up to a
power of two (dummy rows decode harmlessly in their own cache rows) and attention reads the first
``kv_len`` slots, a power of two >= 256 (capped at the cache length). Graphs are captured on first
use, after two eager warm-up steps, against static input buffers. Where launches chain
(``kernels/_common.chained``: programmatic dependent launch on Hopper and later) and the model runs on
one rank, each decode graph is captured chained and unchained and the one that replays faster is kept:
chaining won 1.07x at Qwen3-30B-A3B's batch-1 step on the H200 and lost 0.92x at Qwen3-32B's.

Prefill runs in CUDA graphs too (``pad_prefill``, on wherever graphs are), one per chunk shape, so no
Triton launch pays its Python launcher per call: prompts are padded to the next of ``PREFILL_LENGTHS``
(16 and up: past 16, at most 1.5x their length) and the batch to its bucket, run in chunks of at most
``PREFILL_GRAPH_TOKENS`` padded tokens (whole prompts: a chunk's rows are cache rows ``first ..
first + rows - 1``, an input of its graph like the tokens and each prompt's last index). Padding
changes no real token's logits: pad tokens come after a prompt's (causal attention never lets it see
them) and their cache slots are overwritten by generated tokens before any query reads them, as for
right-padded prompts. A prompt longer than the largest bucket runs eagerly, unpadded, one per chunk.

At TP > 1 every rank runs the same calls in the same order (the TP blocks' first call of each
shape is collective), and the Generator opens the blocks' symmetric heap once (``Ops.open_tp``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from tuneforge.dsl.problem import bucket
from tuneforge.errors import InputError
from tuneforge.kernels import _common as kernel_common
from tuneforge.models.kv_cache import KV_SHARDS, KVCache
from tuneforge.models.qwen3 import Qwen3, Step
from tuneforge.tune.measure import replay_times

log = logging.getLogger("tuneforge.engine")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# prompt lengths a prefill is padded to: powers of two and 1.5x powers of two, 16 ... 8192
PREFILL_LENGTHS = tuple(sorted([2 ** k for k in range(4, 14)] + [3 * 2 ** k for k in range(3, 12)]))
PREFILL_GRAPH_TOKENS = PREFILL_LENGTHS[-1]    # the most padded tokens one prefill chunk (and graph) holds
MIN_KV_LEN = 256        # smallest decode KV-length bucket
SLOT_ALIGN = 64         # the cache length is a multiple of this (aligned attention masks)
DECODE_CHOICE_REPLAYS = 9   # replays of each of a decode graph's chained and unchained captures, interleaved


@dataclass
class Generation:
    tokens: list[list[int]]               # new tokens per prompt (up to, not including, an EOS)
    finish: list[str]                     # "eos" | "length" per prompt
    prefill_s: float
    decode_s: float
    decode_steps: int                     # batched decode steps after the prefill's first token
    logits: list[torch.Tensor] = field(default_factory=list)   # [batch, vocab] per new token, if asked


@dataclass
class _Static:
    """The fixed buffers one batch bucket's decode graphs read and write."""
    tokens: torch.Tensor                  # [B, 1] int64
    positions: torch.Tensor               # [B, 1] int64
    rows: torch.Tensor                    # [B, 1] int64 (0..B-1)
    graphs: dict = field(default_factory=dict)    # kv_len -> (CUDAGraph, logits)


@dataclass
class _Chunk:
    """The fixed buffers of one prefill chunk shape (``rows`` prompts padded to ``length`` tokens)."""
    tokens: torch.Tensor                  # [rows, length] int64
    first: torch.Tensor                   # [rows] int64: the cache row of each chunk row
    last: torch.Tensor                    # [rows] int64: flat index of each row's last prompt token
    index: torch.Tensor                   # [rows] int64 (0..rows-1)
    step: Step
    graph: object = None                  # (CUDAGraph, logits); False: runs eagerly; None: not captured yet


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]
           ) -> torch.Tensor:
    """Next tokens [batch] from logits [batch, vocab]: greedy when ``temperature`` is 0, else from
    softmax(logits / temperature) restricted to the smallest set of top tokens whose mass reaches
    ``top_p``. Sampling uses argmax(p / Exp(1)) (exact, and needs no host sync)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        beyond = sorted_p.cumsum(dim=-1) - sorted_p >= top_p      # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(beyond, 0.0))
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


KV_LAYOUTS = KV_SHARDS + ("auto",)     # --kv-shard


def sequence_write_s(spec, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """The sequence layout's KV write in a decode layer, outside every tuned problem (the heads layout
    stores inside rope_qk_norm's launch): one indexed copy of the batch's new k|v of every KV head, read
    and written, priced by the cost model (its slots come once per forward, ``KVCache.slots``; the
    4.0 us a layer measured on the H200 on 2026-12-03 included placing the slots in every layer)."""
    from tuneforge.dsl.roofline import roofline
    return roofline(0.0, 2.0 * 2 * batch * kv_heads * head_dim * dtype.itemsize, spec, launches=1)


def kv_layout(requested: str, cfg, tp: int, dtype, batch: int, max_len: int, time=None,
              spec=None) -> tuple[str, str]:
    """(the KV cache's layout for ``requested`` -- heads, sequence or auto --, why). ``auto``: sequence
    where the tuned records (``time``: problem -> seconds or None, ``DispatchTable.time``) price a decode
    layer's attention work lower that way -- every rank's heads gathered (allgather), rope_qk_norm
    without the cache store, the cache written apart (``sequence_write_s`` on ``spec``, the device's
    DeviceSpec), attention over every head
    of this rank's shard with the partials combined (decode_attention_sp) -- than split by heads (the
    store inside rope_qk_norm, decode_attention over this rank's heads), summed over the context buckets
    a run of ``max_len`` positions steps through, each weighted by its steps, at the decode bucket of
    ``batch`` rows; heads at TP 1, without tuned records or where one is missing."""
    from tuneforge.models import problems as P
    from tuneforge.models.problems import DECODE_CONTEXTS
    if requested not in KV_LAYOUTS:
        raise InputError(f"unknown kv_shard {requested!r}; expected one of {', '.join(KV_LAYOUTS)}")
    if requested != "auto":
        return requested, "asked for"
    if tp < 2:
        return "heads", "one rank"
    if time is None:
        return "heads", "no tuned records to compare the layouts by"
    if spec is None:
        raise ValueError("kv_layout: pricing the layouts by tuned records needs spec, the device the cache is written on")
    d, contexts = P.rank_dims(cfg, tp), sorted(DECODE_CONTEXTS)
    steps, done = {}, 0
    for ctx in contexts:               # positions 1..max_len by the context bucket serving them
        upto = max_len if ctx == contexts[-1] else min(ctx, max_len)
        if upto > done:
            steps[ctx], done = upto - done, upto
    totals = {"heads": 0.0, "sequence": 0.0}
    for ctx, n in steps.items():
        heads = [P.decode_attention(dtype, batch, d.heads, d.kv_heads, d.head_dim, ctx)]
        sequence = [P.allgather(dtype, tp, batch, d.qkv),
                    P.decode_attention_sp(dtype, tp, batch, d.seq_heads, d.seq_kv_heads, d.head_dim, ctx)]
        write = 0.0
        if cfg.has_qk_norm:            # else both layouts write the cache apart after torch's RoPE
            heads.append(P.rope_qk_norm(dtype, batch, d.heads, d.kv_heads, d.head_dim, cache=True))
            sequence.append(P.rope_qk_norm(dtype, batch, d.heads, d.kv_heads, d.head_dim))
            write = sequence_write_s(spec, batch, d.seq_kv_heads, d.head_dim, dtype)
        for layout, problems in (("heads", heads), ("sequence", sequence)):
            for problem in problems:
                t = time(problem)
                if t is None:
                    return "heads", f"no tuned record for {problem.key}"
                totals[layout] += n * t
        totals["sequence"] += n * write
    per_step = {k: v / max_len * 1e6 for k, v in totals.items()}
    pick = "sequence" if totals["sequence"] < totals["heads"] else "heads"
    return pick, (f"tuned records price a layer's decode attention work at {per_step['heads']:.1f} us split by "
                  f"heads, {per_step['sequence']:.1f} us by sequence, over {max_len} positions at {batch} rows")


class Generator:
    """Runs ``model`` with ``ops`` over a KV cache for up to ``max_batch`` sequences of ``max_len`` tokens,
    split over the TP ranks by KV heads or by sequence (``kv_shard``, models/kv_cache.py)."""

    def __init__(self, model: Qwen3, ops, *, max_batch: int, max_len: int, graphs: Optional[bool] = None,
                 kv_shard: str = "heads", pad_prefill: Optional[bool] = None):
        cfg = model.cfg
        if max_len > cfg.max_positions:
            raise InputError(f"max_len {max_len} exceeds the model's {cfg.max_positions} positions")
        if max_batch < 1 or max_batch > BATCH_BUCKETS[-1]:
            raise InputError(f"max_batch must be 1..{BATCH_BUCKETS[-1]}, got {max_batch}")
        self.model, self.ops = model, ops
        self.device = model.embed.device
        self.max_batch, self.max_len = max_batch, max_len
        slots = min(-(-max_len // SLOT_ALIGN) * SLOT_ALIGN, cfg.max_positions)
        rows = bucket(max_batch, BATCH_BUCKETS)
        # the largest prefill forward: every prompt unpadded, or one padded chunk
        prefill_tokens = max(max_batch * max_len, min(PREFILL_GRAPH_TOKENS, rows * slots))
        tuned = getattr(ops, "mode", None) == "tuned" and getattr(ops, "table", None) is not None
        self.kv_shard, why = kv_layout(kv_shard, cfg, model.shard.size, model.dtype, rows, max_len,
                                       ops.table.time if tuned else None, kernel_common.launch_spec(self.device))
        if kv_shard == "auto" and model.shard.rank == 0:
            log.warning("KV cache split by %s (--kv-shard auto: %s)", self.kv_shard, why)
        self.cache = self._kv_cache(model, rows, slots, prefill_tokens)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise InputError("CUDA graphs need the model on a CUDA device")
        # padded prefill chunks (their shapes few and fixed) are what prefill graphs capture; without
        # graphs padding only adds work, so it is on where graphs are unless asked (tests ask on the CPU)
        self.pad_prefill = self.graphs if pad_prefill is None else pad_prefill
        if model.shard.size > 1:
            # the TP blocks' heap, warmed at the largest forward: a full prefill, or a decode batch bucket
            ops.open_tp(model, max_tokens=max(prefill_tokens, rows), logit_rows=rows)
        self._slots = torch.arange(slots, device=self.device)
        self._static: dict[int, _Static] = {}
        self._chunks: dict[tuple[int, int], _Chunk] = {}
        self._pool = None
        self.chained_decode: dict[tuple[int, int], bool] = {}     # (batch bucket, kv_len) -> graph kept chained

    def _kv_cache(self, model: Qwen3, batch: int, slots: int, max_tokens: int) -> KVCache:
        """The cache in ``self.kv_shard``'s layout; invalid choices refused in one line."""
        cfg, shard, attn = model.cfg, model.shard, model.layers[0].attn
        if self.kv_shard not in KV_SHARDS:
            raise InputError(f"unknown kv_shard {self.kv_shard!r}; expected one of {', '.join(KV_SHARDS)}")
        if self.kv_shard == "heads":
            if shard.size > cfg.num_key_value_heads and shard.rank == 0:
                log.info("KV cache: each of %d KV heads is stored on %d ranks; --kv-shard sequence stores it once",
                         cfg.num_key_value_heads, shard.size // cfg.num_key_value_heads)
            return KVCache(cfg.num_hidden_layers, batch, attn.kv_heads, slots, cfg.head_dim, model.dtype, self.device)
        if shard.size == 1:
            raise InputError("--kv-shard sequence shards the KV cache over TP ranks: it needs --tp 2 or more")
        if shard.world is None:
            raise InputError("--kv-shard sequence needs this rank's World: build the model with Shard.of(world)")
        d = cfg.head_dim
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, d, model.dtype, self.device,
                       world=shard.world, exchange=dict(tokens=max_tokens, qkv=attn.qkv.shape[0],
                                                        kv=2 * attn.kv_heads * d, heads=cfg.num_attention_heads))

    # --- forward passes ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Right-padded prompts [b, T] with ``lengths`` [b] from an empty cache -> logits [b, vocab] of
        each prompt's last token (``all_logits``: [b, T, vocab] for every position, in one eager pass).
        With ``pad_prefill``, in chunks of ``prefill_shape(b, T)``, each a CUDA graph where graphs are on."""
        b, t = tokens.shape
        if not self.pad_prefill or all_logits:
            step = Step(rows=torch.arange(b, device=self.device)[:, None].expand(b, t),
                        positions=torch.arange(t, device=self.device)[None, :].expand(b, t), prefill=True, kv_len=t)
            last = None if all_logits else torch.arange(b, device=self.device) * t + lengths.to(self.device) - 1
            logits = self.model(tokens, step, self.cache, self.ops, logits_rows=last)
            return logits.view(b, t, -1) if all_logits else logits
        rows, length = self.prefill_shape(b, t)
        chunk = self._chunks.get((rows, length)) or self._new_chunk(rows, length)
        graphed = self.graphs and rows * length <= PREFILL_GRAPH_TOKENS
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        out = None
        for first in range(0, b, rows):
            n = min(rows, b - first)
            chunk.tokens.zero_()        # pad ids (any id would do: no prompt token sees them)
            chunk.tokens[:n, :t].copy_(tokens[first:first + n])
            torch.add(chunk.index, first, out=chunk.first)
            torch.mul(chunk.index, length, out=chunk.last)
            chunk.last[:n] += lengths[first:first + n] - 1
            logits = self._prefill_chunk(chunk, graphed)
            if out is None:
                out = torch.empty((b, logits.shape[1]), dtype=logits.dtype, device=self.device)
            out[first:first + n].copy_(logits[:n])
        return out

    def prefill_shape(self, b: int, t: int) -> tuple[int, int]:
        """(rows, length) of the chunks a padded prefill of ``b`` prompts of ``t`` tokens runs in: ``t``
        padded to its bucket in ``PREFILL_LENGTHS`` (at most the cache's slots), and the batch bucket of
        ``b`` halved until a chunk holds at most ``PREFILL_GRAPH_TOKENS``; past the largest bucket, one
        unpadded prompt per chunk. The chunks of a batch tile its bucket, so pad rows stay in cache rows
        below it."""
        if t > PREFILL_LENGTHS[-1]:
            return 1, t
        length = min(bucket(t, PREFILL_LENGTHS), self.cache.max_len)
        rows = bucket(b, BATCH_BUCKETS)
        while rows > 1 and rows * length > PREFILL_GRAPH_TOKENS:
            rows //= 2
        return rows, length

    def _new_chunk(self, rows: int, length: int) -> _Chunk:
        z = torch.zeros(rows, dtype=torch.long, device=self.device)
        first = z.clone()
        step = Step(rows=first[:, None].expand(rows, length),
                    positions=torch.arange(length, device=self.device)[None, :].expand(rows, length),
                    prefill=True, kv_len=length)
        chunk = _Chunk(torch.zeros((rows, length), dtype=torch.long, device=self.device), first, z.clone(),
                       torch.arange(rows, device=self.device), step)
        self._chunks[(rows, length)] = chunk
        return chunk

    def _prefill_chunk(self, chunk: _Chunk, graphed: bool) -> torch.Tensor:
        """Logits [rows, vocab] of the chunk in its buffers: its graph replayed (captured on first use)
        or an eager pass."""
        def run():
            return self.model(chunk.tokens, chunk.step, self.cache, self.ops, logits_rows=chunk.last)
        if graphed and chunk.graph is None:
            chunk.graph = self._capture(run) or False
        if not graphed or not chunk.graph:
            return run()
        graph, logits = chunk.graph
        graph.replay()
        return logits

    def _decode_eager(self, st: _Static, kv_len: int) -> torch.Tensor:
        b = st.tokens.shape[0]
        # an additive mask built once per step (a boolean one would be converted in every layer)
        valid = self._slots[:kv_len] <= st.positions
        mask = torch.zeros(valid.shape, dtype=self.model.dtype, device=self.device).masked_fill_(~valid, float("-inf"))
        mask = mask.view(b, 1, 1, kv_len)
        step = Step(rows=st.rows, positions=st.positions, prefill=False, kv_len=kv_len, mask=mask)
        return self.model(st.tokens, step, self.cache, self.ops)

    def kv_len(self, needed: int) -> int:
        """The KV-length bucket that covers ``needed`` slots."""
        n = MIN_KV_LEN
        while n < needed:
            n *= 2
        return min(n, self.cache.max_len)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, max_position: Optional[int] = None
               ) -> torch.Tensor:
        """One token per sequence: ``tokens`` [b] at ``positions`` [b] (each row's next slot) -> logits
        [b, vocab]. ``max_position``: the largest of ``positions`` if the host knows it (else a sync)."""
        b = tokens.shape[0]
        big = bucket(b, BATCH_BUCKETS)
        st = self._static.get(big)
        if st is None:
            z = torch.zeros((big, 1), dtype=torch.long, device=self.device)
            st = self._static[big] = _Static(z, z.clone(), torch.arange(big, device=self.device)[:, None])
        st.tokens[:b, 0].copy_(tokens)
        st.positions[:b, 0].copy_(positions)
        if b < big:                                   # dummy rows: slot 0 of their own cache rows
            st.tokens[b:].zero_()
            st.positions[b:].zero_()
        kv_len = self.kv_len((int(positions.max()) if max_position is None else max_position) + 1)
        if not self.graphs:
            return self._decode_eager(st, kv_len)[:b]
        if kv_len not in st.graphs:
            st.graphs[kv_len] = self._capture_decode(big, kv_len, lambda: self._decode_eager(st, kv_len))
        if st.graphs[kv_len] is None:
            return self._decode_eager(st, kv_len)[:b]
        graph, logits = st.graphs[kv_len]
        graph.replay()
        return logits[:b]

    def _capture(self, run):
        """(graph, logits) of ``run`` (a decode step or a prefill chunk on its static buffers), after two
        eager warm-up runs (compiles kernels, settles dispatch) that compute exactly what is about to be
        replayed, so their cache writes are the same values. None when a call in the warm-up cannot be
        captured: from then on prefill and decode run eagerly, said once."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.ops.uncapturable:
            # a torch baseline that syncs with the host ran in the warm-up
            if self.graphs and self.model.shard.rank == 0:
                log.warning("prefill and decode run without CUDA graphs: %s", self.ops.uncapturable)
            self.graphs = self.pad_prefill = False
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = run()
        return graph, logits

    def _capture_decode(self, batch: int, kv_len: int, run):
        """``_capture`` of a decode step; where launches chain, the dispatch runs Triton kernels (the
        baseline chains nothing) and the model runs on one rank (ranks must replay the same graphs),
        captured chained and unchained (both in the pool: the loser is dropped before anything else is
        captured) and the one whose interleaved replays are faster kept. Replays redo the warm-up's
        step: the same cache writes."""
        if (self.model.shard.size > 1 or self.ops.mode == "baseline"
                or not kernel_common.chained(self._slots)["PDL"]):
            return self._capture(run)
        captured = {}
        try:
            for chain in (True, False):
                kernel_common.CHAINED = chain              # read at each launch, so at capture
                captured[chain] = self._capture(run)
                if captured[chain] is None:
                    return None
        finally:
            kernel_common.CHAINED = True
        chained, unchained = replay_times([captured[True][0], captured[False][0]], [1, 1], DECODE_CHOICE_REPLAYS)
        keep = chained.median_s <= unchained.median_s
        self.chained_decode[batch, kv_len] = keep
        log.debug("decode graph (batch %d, kv %d): chained %.3f ms, unchained %.3f ms: kept %s", batch, kv_len,
                  chained.median_ms, unchained.median_ms, "chained" if keep else "unchained")
        return captured[keep]

    # --- the loop ----------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise InputError("no prompts")
        if len(prompts) > self.max_batch:
            raise InputError(f"{len(prompts)} prompts exceed this engine's batch of {self.max_batch}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        vocab = self.model.cfg.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_len:
                raise InputError(f"prompt {i} is too long: {len(p)} tokens + {max_new_tokens} new tokens "
                                 f"exceed the context of {self.max_len} tokens")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, eos_ids: Sequence[int] = (), seed: int = 0,
                 return_logits: bool = False) -> Generation:
        """Up to ``max_new_tokens`` new tokens per prompt; a prompt stops at its first EOS token, and
        the loop stops when every prompt has (checking needs a device sync, so only with ``eos_ids``)."""
        self.check_prompts(prompts, max_new_tokens)
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        dev = self.device
        b = len(prompts)
        lengths_host = [len(p) for p in prompts]
        t = max(lengths_host)
        tokens = torch.zeros((b, t), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
        tokens, lengths = tokens.to(dev), torch.tensor(lengths_host, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed)
        eos = torch.tensor(list(eos_ids), dtype=torch.long, device=dev)

        self._sync()
        start = time.perf_counter()
        logits = self.prefill(tokens, lengths)
        nxt = sample(logits, temperature, top_p, gen)
        self._sync()
        prefill_s = time.perf_counter() - start

        out, kept = [nxt], [logits.float()] if return_logits else []
        done = torch.isin(nxt, eos) if len(eos_ids) else None
        steps = 0
        start = time.perf_counter()
        while steps + 1 < max_new_tokens and not (done is not None and bool(done.all())):
            # the token sampled last sits at position length + steps
            logits = self.decode(nxt, lengths + steps, t + steps)
            steps += 1
            nxt = sample(logits, temperature, top_p, gen)
            out.append(nxt)
            if return_logits:
                kept.append(logits.float().clone())
            if done is not None:
                done |= torch.isin(nxt, eos)
        self._sync()
        decode_s = time.perf_counter() - start

        new = torch.stack(out, dim=1).tolist()
        finish = []
        for i, row in enumerate(new):
            stop = next((j for j, tok in enumerate(row) if tok in set(eos_ids)), None)
            finish.append("length" if stop is None else "eos")
            new[i] = row if stop is None else row[:stop]
        return Generation(new, finish, prefill_s, decode_s, steps, kept)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- measuring (tuneforge bench e2e, benchmarks/bench_e2e.py) -------------------------------------

def hbm_bandwidth(device, nbytes: int = 2**30) -> Optional[float]:
    """Bytes/s a large device-to-device copy reaches (read + write), median of many; None without a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from tuneforge.tune.measure import time_calls
    with torch.cuda.device(device):
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = time_calls([lambda: dst.copy_(src)], warmup=5, rep=30, flush_l2=False).median_s
        del src, dst
        torch.cuda.empty_cache()
    return 2 * nbytes / t


def time_generation(generator: Generator, bsz: int, ctx: int, gen: int, seed: int = 0) -> dict:
    """Random prompts of ``ctx`` tokens, ``gen`` new tokens each, no EOS: one warm-up run (kernels
    compile, decode graphs are captured), then the timed run."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, generator.model.cfg.vocab_size, (bsz, ctx), generator=g).tolist()
    generator.generate(prompts, gen, seed=seed)
    out = generator.generate(prompts, gen, seed=seed)
    steps = out.decode_steps
    return dict(bsz=bsz, ctx=ctx, gen=gen, prefill_ms=out.prefill_s * 1e3,
                decode_ms_per_token=out.decode_s / steps * 1e3 if steps else float("nan"),
                tokens_per_s=bsz * steps / out.decode_s if steps else float("nan"),
                e2e_tokens_per_s=bsz * gen / (out.prefill_s + out.decode_s))
