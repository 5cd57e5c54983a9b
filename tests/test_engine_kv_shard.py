"""The KV cache sharded by sequence over TP ranks (``--kv-shard sequence``, models/kv_cache.py): at TP 2 in
a 2-process CPU world under Triton's interpreter, the engine equals TP 1 and Hugging Face transformers
(prefill logits, every decode step's logits and the greedy tokens; fp32, tiny random checkpoints), with a
prompt whose prefill spans both ranks' placement blocks: 32 steps under baseline dispatch (torch and
torch.distributed) on a model with one KV head (fewer than ranks: split by heads both ranks would store
it), and a few steps under tuned dispatch on a model with two, the cache's heap all-gathering the new
tokens and the decode attention's form coming per batch bucket from a real SQLite store (fused_tiles
at bucket 1, two_step at bucket 2). The ranks' shards reassembled
are TP 1's cache (each token once, every KV head); every lookup is planned; bad combinations are refused
in one line. GPU (``-m gpu``): 2 processes sharing one GPU, CUDA-graph decode equal to eager decode."""
import logging
from types import SimpleNamespace

import pytest
import torch

from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl import get
from tuneforge.dsl.devices import SPECS
from tuneforge.engine.dispatch import DispatchTable, Ops
from tuneforge.engine.generate import Generator, kv_layout, sequence_write_s
from tuneforge.engine.lookup import family
from tuneforge.errors import InputError
from tuneforge.kernels import decode_attention_sp as SP
from tuneforge.kernels._common import launch_spec
from tuneforge.models.configs import load_config
from tuneforge.models.kv_cache import KVCache
from tuneforge.models.loading import load_model
from tuneforge.tune.plan import DECODE_SP_ROLE, GATHER_SEQ_KV_ROLE, ROPE_SEQ_KV_ROLE, plan
from tuneforge.world import spawn

from test_engine import TOL, checkpoint, hf_greedy, saved, tiny_hf  # noqa: F401  (checkpoint: the fixture)
from test_engine import prefill_and_generate
from test_engine_tp import Lines, block_config

TP = 2
ENV = Environment("interpreter", 4, 0.0, TP, "single-gpu", torch.__version__, "3", "none", False)
# 20 tokens: its prefill fills placement block 0 (rank 0) and part of block 1 (rank 1)
PROMPTS = [[5, 3, 9, 1, 7], [42, 8], list(range(11, 31))]
CPU_SPEC = launch_spec(torch.device("cpu"))
FORMS = {1: "fused_tiles", 2: "two_step"}       # decode batch bucket -> form (None: the baseline)


def sp_config(problem, spec, form):
    config = {**get(SP.OP).default_config(problem, spec), "form": form}
    assert get(SP.OP).reject_reason(config, problem, spec) is None, (problem.key, config)
    return config


def write_store(path: str, model_dir: str, env: Environment = ENV, spec=CPU_SPEC, blocks: bool = False,
                forms: dict = FORMS, prefill_buckets: tuple = (64,)) -> str:
    """A store with the TP 2 plan's problems: decode_attention_sp gets ``forms``' choice per batch bucket,
    the TP blocks gemm_ar (``blocks``; else no record: the torch path), every other op the torch baseline.
    A prefill past the largest of ``prefill_buckets`` runs the torch baseline with a dispatch warning."""
    cfg = load_config(model_dir)
    the_plan = plan(cfg, tp=TP, decode_buckets=tuple(forms), prefill_buckets=prefill_buckets, dtype="fp32")
    with Store(path) as store:
        store.add_plan(cfg.name, TP, the_plan.pairs())
        for item in the_plan.tunable:
            p = item.problem
            if p.op == SP.OP:
                form = forms[p["m"]]
                config = {"baseline": True} if form is None else sp_config(p, spec, form)
            elif p.op in ("tp_attn", "tp_mlp"):
                if not blocks:
                    continue
                config = block_config(p, "gemm_ar", spec)
            else:
                config = {"baseline": True}
            store.record_winner(Winner(p, env, config, 1e-5, 2e-5, 2.0, 50.0, "measured", get(p.op).source_hash,
                                       "test", 1))
    return cfg.name


def run(gen: Generator, prompts, steps: int):
    """(prefill logits [b, T, vocab], tokens, decode logits [steps, b, vocab], the cache's k)."""
    prefill, out = prefill_and_generate(gen, prompts, steps)
    return prefill.cpu(), out.tokens, torch.stack(out.logits).cpu(), gen.cache.k.cpu()


def _rank(world, cases, db: str, env: Environment, graphs: bool):
    """Each case (checkpoint, name, prompt sets, steps) with the cache sharded by sequence, under tuned
    dispatch from ``db`` (name None: baseline dispatch): its runs, the problems looked up, the dispatch
    warnings."""
    from tuneforge.models.qwen3 import Shard
    lines = Lines()
    logging.getLogger("tuneforge.engine").addHandler(lines)
    out = []
    for path, name, prompt_sets, steps in cases:
        lookups = []
        ops = Ops("baseline")
        if name is not None:
            with Store(db, create=False) as store:
                ops = Ops("tuned", DispatchTable.load(store, env, name, TP))
            ops.table.on_lookup = lambda problem, config: lookups.append(problem)
        model = load_model(path, shard=Shard.of(world), dtype=torch.float32, device=world.device)
        runs = []
        for prompts in prompt_sets:
            for g in ((False, True) if graphs else (False,)):
                gen = Generator(model, ops, max_batch=len(prompts), max_len=max(map(len, prompts)) + steps,
                                graphs=g, kv_shard="sequence")
                runs.append(run(gen, prompts, steps))
        out.append((runs, lookups))
    return out, lines.lines


def reassembled(shards: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's k [layers, batch, kv_heads, capacity + 1, d] (less the spill slot) as one cache."""
    return torch.stack([SP._full_cache([s[layer, :, :, :-1] for s in shards], SP.SHARD_BLOCK)
                        for layer in range(shards[0].shape[0])])


def check_case(hf, path, prompt_sets, steps, runs_by_rank):
    tp1 = load_model(path, dtype=torch.float32)
    for set_index, prompts in enumerate(prompt_sets):
        ref = run(Generator(tp1, Ops("baseline"), max_batch=len(prompts), max_len=max(map(len, prompts)) + steps),
                  prompts, steps)
        for runs in runs_by_rank:                       # every rank ends with the whole vocabulary's logits
            prefill, tokens, logits, _ = runs[set_index]
            assert tokens == ref[1]
            torch.testing.assert_close(prefill, ref[0], **TOL)
            torch.testing.assert_close(logits, ref[2], **TOL)
        for i, p in enumerate(prompts):
            hf_tokens, hf_prefill, hf_logits = hf_greedy(hf, p, steps)
            assert ref[1][i] == hf_tokens
            torch.testing.assert_close(runs_by_rank[0][set_index][0][i, :len(p)], hf_prefill, **TOL)
            torch.testing.assert_close(runs_by_rank[0][set_index][2][:, i], hf_logits, **TOL)
        # the shards together are TP 1's cache: each token once, every KV head, on its position's rank
        full = reassembled([runs[set_index][3] for runs in runs_by_rank])
        for i, p in enumerate(prompts):
            n = len(p) + steps - 1                      # the last sampled token is never written
            torch.testing.assert_close(full[:, i, :, :n], ref[3][:, i, :, :n], **TOL)


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory):
    """A checkpoint with one KV head: at TP 2 split by heads both ranks would store it."""
    return saved(tmp_path_factory, tiny_hf(num_key_value_heads=1), "tiny-qwen3-1kv")


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    """Two KV heads a rank at TP 2: the gathered heads come as [ranks, heads], written without merging them."""
    return saved(tmp_path_factory, tiny_hf(num_key_value_heads=4), "tiny-qwen3-4kv")


def test_tp2_sequence_sharded_kv_matches_tp1_and_transformers(checkpoint, one_kv_head, four_kv_heads, tmp_path):
    path1, hf1 = one_kv_head
    path, hf = checkpoint
    path4, hf4 = four_kv_heads
    db = str(tmp_path / "tf.db")
    cases = [(path1, None, [PROMPTS], 32), (path, write_store(db, path), [PROMPTS[2:], PROMPTS[:2]], 3),
             (path4, None, [PROMPTS], 6)]
    results = spawn(_rank, TP, cases, db, ENV, False, timeout=600.0)
    for _, lines in results:
        # no TP block records (the torch path): those two lines only; nothing else falls back
        assert sorted(line.split(":")[1] for line in lines) == [" tp_attn runs the torch baseline",
                                                                " tp_mlp runs the torch baseline"], lines
    for case, (path_, _, prompt_sets, steps) in enumerate(cases):
        check_case((hf1, hf, hf4)[case], path_, prompt_sets, steps, [r[0][case][0] for r in results])
    planned = {family(i.problem) for i in plan(load_config(path), tp=TP, dtype="fp32")}
    for out, _ in results:
        lookups = out[1][1]
        assert {family(p) for p in lookups} <= planned
        assert not any(p.op == "decode_attention" for p in lookups)
        assert {(p["m"], p["heads"], p["kv_heads"]) for p in lookups if p.op == SP.OP} == {(1, 4, 2), (2, 4, 2)}
        # every layer's head columns gathered through its tuned record: q|k|v in decode, k|v in the prefills
        assert {p["n"] for p in lookups if p.op == "allgather"} == {64, 32}


def test_bad_combinations_are_refused_in_one_line(checkpoint, capsys):
    from tuneforge.cli import main
    path, _ = checkpoint
    model = load_model(path, dtype=torch.float32)
    with pytest.raises(InputError, match="--kv-shard sequence shards the KV cache over TP ranks: it needs --tp 2"):
        Generator(model, Ops("baseline"), max_batch=1, max_len=8, kv_shard="sequence")
    with pytest.raises(InputError, match="unknown kv_shard 'tokens'; expected one of heads, sequence"):
        Generator(model, Ops("baseline"), max_batch=1, max_len=8, kv_shard="tokens")
    assert main(["generate", "--model", path, "--prompt", "1 2", "--kv-shard", "sequence"]) == 2
    assert capsys.readouterr().err == ("tuneforge: error: --kv-shard sequence shards the KV cache over TP ranks: "
                                       "it needs --tp 2 or more\n")
    assert (SP.shard_capacity(64, 2), SP.shard_capacity(64, 8), SP.shard_capacity(100, 4)) == (32, 16, 32)
    two_ranks = SimpleNamespace(size=2, rank=0)          # the sizes are checked before the world is used
    with pytest.raises(InputError, match=r"needs exchange= with \['heads', 'kv', 'qkv', 'tokens'\]"):
        KVCache(1, 1, 1, 8, 4, torch.float32, "cpu", world=two_ranks)


def test_plan_has_both_kv_layouts_at_tp_above_1():
    """Qwen3-30B-A3B at TP 8: split by heads each rank holds one of the 4 KV heads (each on 2 ranks); the
    sequence-sharded problems see all 32 q and 4 KV heads."""
    from tuneforge.dsl.problem import DECODE_CONTEXTS
    p = plan("Qwen3-30B-A3B", 8, decode_buckets=[1, 8], prefill_buckets=[])
    for m in (1, 8):
        for ctx in DECODE_CONTEXTS:
            assert p.find("decode_attention", m=m, heads=4, kv_heads=1, head_dim=128, ctx=ctx)
            (item,) = p.find(SP.OP, m=m, heads=32, kv_heads=4, head_dim=128, ctx=ctx)
            assert item.roles == [DECODE_SP_ROLE] and item.problem.world == 8 and not item.baseline_only
        # rope_qk_norm stores k and v into a cache split by heads in its launch; one sharded by sequence apart
        roles = {i.problem.shape.get("cache", 0): i.roles for i in p.find("rope_qk_norm", m=m)}
        assert roles == {1: ["layer.attn.rope_qk_norm"], 0: [ROPE_SEQ_KV_ROLE]}
        # every rank's head columns gathered: q|k|v (4 q heads and 1 KV head of 128 at TP 8) in decode
        (gather,) = p.find("allgather", m=8 * m)
        assert gather.roles == [GATHER_SEQ_KV_ROLE] and gather.problem["n"] == (4 + 2) * 128
    (prefill_gather,) = plan("Qwen3-30B-A3B", 8, decode_buckets=[], prefill_buckets=[64]).find("allgather")
    assert prefill_gather.problem.shape == {"m": 8 * 64, "n": 2 * 128}        # k|v in a prefill
    assert not plan("Qwen3-30B-A3B", 1, decode_buckets=[1], prefill_buckets=[]).find(SP.OP)
    assert not plan("Qwen3-30B-A3B", 1, decode_buckets=[1], prefill_buckets=[64]).find("allgather")


def _layout_table(the_plan, seconds) -> DispatchTable:
    """A dispatch table of ``the_plan``'s problems, each recorded at ``seconds(problem)``."""
    winners = {item.problem.key: Winner(item.problem, ENV, {"baseline": True}, seconds(item.problem), 1.0, 1.0, 1.0,
                                        "measured", get(item.problem.op).source_hash, "test", 1)
               for item in the_plan.tunable}
    return DispatchTable(winners, {}, where="test", model=the_plan.model, tp=the_plan.tp, quiet=True)


def test_kv_shard_auto_takes_the_layout_the_records_price_lower():
    """--kv-shard auto sums each layout's tuned problems (the plan's own: one missing means heads) over
    the context buckets a run steps through, each weighted by its steps."""
    cfg, tp = load_config("Qwen3-30B-A3B"), 8
    the_plan = plan(cfg, tp, decode_buckets=[8], prefill_buckets=[])
    h200 = SPECS["H200"]

    def seconds(attention_heads, attention_sequence):
        def at(problem):
            return {"decode_attention": attention_heads, SP.OP: attention_sequence}.get(problem.op, 1e-6)
        return _layout_table(the_plan, at).time

    # a layer: heads = rope (with the store) + attention; sequence = gather + rope + write + attention
    slow_heads = seconds(20e-6, 10e-6)
    layout, why = kv_layout("auto", cfg, tp, torch.bfloat16, 8, 4096, slow_heads, h200)
    assert layout == "sequence", why
    write = sequence_write_s(h200, 8, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16)
    assert 1e-6 < write < 3e-6      # one small kernel: 32 KiB of k|v read and written, and a launch
    assert why == (f"tuned records price a layer's decode attention work at 21.0 us split by heads, "
                   f"{12.0 + write * 1e6:.1f} us by sequence, over 4096 positions at 8 rows")
    assert kv_layout("auto", cfg, tp, torch.bfloat16, 8, 4096, seconds(10e-6, 10e-6), h200)[0] == "heads"
    # the contexts a run reaches weigh in: attention cheaper by sequence only past 8k keys
    by_context = _layout_table(the_plan, lambda p: (30e-6 if p["ctx"] > 8192 else 5e-6)
                               if p.op == "decode_attention" else 10e-6 if p.op == SP.OP else 1e-6).time
    assert kv_layout("auto", cfg, tp, torch.bfloat16, 8, 4096, by_context, h200)[0] == "heads"
    assert kv_layout("auto", cfg, tp, torch.bfloat16, 8, 131072, by_context, h200)[0] == "sequence"
    partial = _layout_table(plan(cfg, tp, decode_buckets=[1], prefill_buckets=[]), lambda p: 1e-6).time
    layout, why = kv_layout("auto", cfg, tp, torch.bfloat16, 8, 4096, partial, h200)
    assert layout == "heads" and why.startswith("no tuned record for decode_attention|m=8,")
    assert kv_layout("auto", cfg, 1, torch.bfloat16, 8, 4096, slow_heads, h200) == ("heads", "one rank")
    assert kv_layout("auto", cfg, tp, torch.bfloat16, 8, 4096, None)[0] == "heads"
    with pytest.raises(ValueError, match="needs spec"):
        kv_layout("auto", cfg, tp, torch.bfloat16, 8, 4096, slow_heads)
    assert kv_layout("sequence", cfg, tp, torch.bfloat16, 8, 4096, None) == ("sequence", "asked for")
    with pytest.raises(InputError, match="unknown kv_shard 'rows'; expected one of heads, sequence, auto"):
        kv_layout("rows", cfg, tp, torch.bfloat16, 8, 4096)


@pytest.mark.gpu
def test_tp2_sequence_sharded_kv_cuda_graphs_on_one_gpu(checkpoint, tmp_path):
    """2 processes sharing one GPU: TP blocks gemm_ar, the decode attention through
    the fused_tiles kernel at this GPU's default tiles; prompts cross the 256-slot KV bucket.
    CUDA-graph decode equals eager decode, and both are transformers'."""
    path, hf = checkpoint
    spec = launch_spec(torch.device("cuda"))
    db = str(tmp_path / "tf.db")
    env = Environment("gpu-test", 1, 0.0, TP, "single-gpu", torch.__version__, "3", "none", False)
    # the prefill (3 prompts padded to 250 tokens: 750 rows) within a tuned bucket, so no dispatch warning
    name = write_store(db, path, env, spec, blocks=True, forms={4: "fused_tiles"}, prefill_buckets=(64, 1024))
    prompts = [[(7 * i + j) % 128 for j in range(250 - 40 * i)] for i in range(3)]
    steps = 20
    results = spawn(_rank, TP, [(path, name, [prompts], steps)], db, env, True, device="cuda", share_gpu=True,
                    timeout=600.0)
    for out, lines in results:
        assert lines == []
        (eager, graphed), _ = out[0]
        assert eager[1] == graphed[1]
        torch.testing.assert_close(eager[2], graphed[2], rtol=1e-4, atol=1e-4)    # graphs pad the prefill
        for i, p in enumerate(prompts):
            hf_tokens, _, hf_logits = hf_greedy(hf, p, steps)
            assert graphed[1][i] == hf_tokens
            torch.testing.assert_close(graphed[2][:, i], hf_logits, rtol=1e-3, atol=1e-3)
