"""The Qwen3 engine against Hugging Face transformers on a tiny random checkpoint (fp32, CPU):
prefill logits, every decode step's logits and the greedy tokens; through the torch baselines, through
the tuned Triton kernels (a real SQLite store filled from the tuning plan), and at TP=2 in a 2-process
gloo world. Plus checkpoint loading (sharded files, per-rank slices), sampling, EOS, the one-line
errors and `tuneforge generate` as a subprocess. GPU tests: CUDA-graph decode equals eager decode."""
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl import get
from tuneforge.engine.dispatch import DispatchTable, Ops
from tuneforge.engine.generate import Generator, sample
from tuneforge.errors import InputError, UnknownModel
from tuneforge.kernels import _common as kernel_common
from tuneforge.models.configs import load_config
from tuneforge.models.loading import load_model, load_weights
from tuneforge.models.qwen3 import Qwen3, Shard
from tuneforge.dsl.devices import SPECS
from tuneforge.tune.plan import plan

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)
PROMPTS = [[5, 3, 9, 1, 7], [42, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19]]   # 3 rows: a padded batch bucket
TOL = dict(rtol=1e-4, atol=1e-4)


def tiny_hf(tied: bool = False, **dims):
    """Random weights scaled so activations stay O(1) and greedy tokens vary (HF's 0.02 init repeats one token);
    ``dims`` override TINY's."""
    from transformers import Qwen3Config, Qwen3ForCausalLM     # here: TP ranks import this module too
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TINY, **dims}, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def saved(tmp_path_factory, hf, name: str) -> tuple[str, object]:
    """``hf`` written with save_pretrained into a new folder: (its path, hf)."""
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return str(path), hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved(tmp_path_factory, tiny_hf(), "tiny-qwen3")


def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(greedy tokens, prefill logits [len, vocab], the logits before each new token [steps, vocab])."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = hf(ids).logits[0]
        out = hf.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), prefill, torch.cat(out.logits)


def padded(prompts):
    """(tokens [b, longest prompt] padded with 0 on the right, lengths [b])."""
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    return tokens, lengths


def prefill_and_generate(gen: Generator, prompts, steps: int):
    """(prefill logits of every prompt token [b, T, vocab], ``gen.generate``'s ``steps`` greedy tokens with
    their logits)."""
    tokens, lengths = padded(prompts)
    prefill = gen.prefill(tokens.to(gen.device), lengths.to(gen.device), all_logits=True)
    return prefill, gen.generate(prompts, steps, return_logits=True)


def check_against_hf(hf, gen: Generator, steps: int) -> None:
    prefill, out = prefill_and_generate(gen, PROMPTS, steps)
    assert out.decode_steps == steps - 1 and out.finish == ["length"] * len(PROMPTS)
    for i, p in enumerate(PROMPTS):
        tokens, ref_prefill, ref_steps = hf_greedy(hf, p, steps)
        torch.testing.assert_close(prefill[i, :len(p)], ref_prefill, **TOL)
        torch.testing.assert_close(torch.stack([s[i] for s in out.logits]), ref_steps, **TOL)
        assert out.tokens[i] == tokens


def test_baseline_matches_transformers_for_32_greedy_steps(checkpoint):
    path, hf = checkpoint
    model = load_model(path, dtype=torch.float32)
    check_against_hf(hf, Generator(model, Ops("baseline"), max_batch=3, max_len=64), steps=32)


def fast_interpreted_config(template, problem, spec) -> dict:
    """A valid config with few programs, so the interpreter runs quickly: the default for ``spec``,
    with rows / heads per program raised as far as the constraints allow."""
    config = template.default_config(problem, spec)
    for param in template.space(problem).params:
        if param.name in ("rows", "heads"):
            for value in sorted(param.choices, reverse=True):
                if template.reject_reason({**config, param.name: value}, problem, spec) is None:
                    config[param.name] = value
                    break
    return config


INTERPRETER_ENV = Environment("interpreter", 4, 0.0, 1, "single-gpu", torch.__version__, "3", "none", False)
INTERPRETER_SPEC = replace(SPECS["H100"], name="interpreter", sms=4, features=frozenset())


def fast_winners_table(db: str, cfg, the_plan) -> DispatchTable:
    """A real store holding a fast interpreted kernel winner for every tunable problem of ``the_plan``,
    read back as the engine reads it."""
    with Store(db) as store:
        store.add_plan(cfg.name, 1, the_plan.pairs())
        for item in the_plan.tunable:
            t = get(item.problem.op)
            store.record_winner(Winner(item.problem, INTERPRETER_ENV,
                                       fast_interpreted_config(t, item.problem, INTERPRETER_SPEC),
                                       1e-5, 2e-5, 2.0, 50.0, "measured", t.source_hash, "test", 1))
        return DispatchTable.load(store, INTERPRETER_ENV, cfg.name, 1)


def test_tuned_kernels_match_transformers(checkpoint, tmp_path, caplog):
    """The tuning plan's problems get winners in a real store; the engine then runs every op through a
    Triton kernel (no warning: nothing falls back) and still matches transformers."""
    path, hf = checkpoint
    cfg = load_config(path)
    the_plan = plan(cfg, tp=1, decode_buckets=(1, 2, 4), prefill_buckets=(32,), dtype="fp32")
    table = fast_winners_table(str(tmp_path / "tf.db"), cfg, the_plan)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    model = load_model(path, dtype=torch.float32)
    check_against_hf(hf, Generator(model, Ops("tuned", table), max_batch=3, max_len=32), steps=3)
    assert [r.getMessage() for r in caplog.records if r.name == "tuneforge.engine"] == []


def _tp_rank(world, path: str, steps: int):
    from tuneforge.engine.dispatch import Ops as RankOps
    model = load_model(path, shard=Shard(world.rank, world.size, world.group), dtype=torch.float32)
    out = Generator(model, RankOps("baseline"), max_batch=3, max_len=32).generate(PROMPTS, steps, return_logits=True)
    return out.tokens, torch.stack(out.logits)


def test_tp2_matches_transformers(checkpoint):
    from tuneforge.world import spawn
    path, hf = checkpoint
    steps = 6
    results = spawn(_tp_rank, 2, path, steps, device="cpu", timeout=300.0)
    for tokens, logits in results:            # every rank ends with the full vocabulary's logits
        for i, p in enumerate(PROMPTS):
            ref_tokens, _, ref_logits = hf_greedy(hf, p, steps)
            assert tokens[i] == ref_tokens
            torch.testing.assert_close(logits[:, i], ref_logits, **TOL)


def test_rank_shards_are_slices_of_the_checkpoint(checkpoint):
    """TP=4 with 2 KV heads: each rank gets 1 query head and a replicated KV head (ranks 0,1 -> head 0)."""
    path, hf = checkpoint
    cfg = load_config(path)
    sd = hf.state_dict()
    d = cfg.head_dim
    for r in range(4):
        model = Qwen3(cfg, Shard(r, 4), torch.float32)
        load_weights(model, path)
        a, mlp, kv = model.layers[1].attn, model.layers[1].mlp, r // 2
        p = "model.layers.1."
        expect_qkv = torch.cat((sd[p + "self_attn.q_proj.weight"][r * d:(r + 1) * d],
                                sd[p + "self_attn.k_proj.weight"][kv * d:(kv + 1) * d],
                                sd[p + "self_attn.v_proj.weight"][kv * d:(kv + 1) * d]))
        assert torch.equal(a.qkv, expect_qkv)
        assert torch.equal(a.o, sd[p + "self_attn.o_proj.weight"][:, r * d:(r + 1) * d])
        i = cfg.intermediate_size // 4
        assert torch.equal(mlp.gate_up, torch.cat((sd[p + "mlp.gate_proj.weight"][r * i:(r + 1) * i],
                                                   sd[p + "mlp.up_proj.weight"][r * i:(r + 1) * i])))
        assert torch.equal(mlp.down, sd[p + "mlp.down_proj.weight"][:, r * i:(r + 1) * i])
        assert torch.equal(model.head_weight, sd["lm_head.weight"][r * 32:(r + 1) * 32])
        assert torch.equal(model.embed, sd["model.embed_tokens.weight"])


def test_sharded_checkpoint_loads_the_same(checkpoint, tmp_path):
    path, hf = checkpoint
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    files = [f for f in tmp_path.iterdir() if f.suffix == ".safetensors"]
    assert len(files) > 3 and (tmp_path / "model.safetensors.index.json").is_file()
    a, b = load_model(path, dtype=torch.float32), load_model(str(tmp_path), dtype=torch.float32)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def test_tied_embeddings_share_the_table(tmp_path):
    hf = tiny_hf(tied=True)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float32)
    assert model.lm_head is None and model.head_weight.data_ptr() == model.embed.data_ptr()
    tokens, _, _ = hf_greedy(hf, PROMPTS[0], 8)
    assert Generator(model, Ops("baseline"), max_batch=1, max_len=32).generate(PROMPTS[:1], 8).tokens == [tokens]


def edit_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    with open(dst / "config.json") as f:
        raw = json.load(f)
    raw.update(changes)
    with open(dst / "config.json", "w") as f:
        json.dump(raw, f)
    return str(dst)


def test_mismatched_checkpoint_shape_is_one_line(checkpoint, tmp_path):
    path = edit_config(checkpoint[0], tmp_path / "ckpt", intermediate_size=192)
    with pytest.raises(InputError) as e:
        load_model(path, dtype=torch.float32)
    assert str(e.value) == ("checkpoint tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64], "
                            "the config expects [192, 64]")


def test_missing_tensor_and_unknown_model_are_one_line(checkpoint, tmp_path):
    # transformers 5 writes layer_types, which must then list every layer
    path = edit_config(checkpoint[0], tmp_path / "ckpt", num_hidden_layers=3, layer_types=["full_attention"] * 3)
    with pytest.raises(InputError, match=r"has no tensor model\.layers\.2\.self_attn\.q_proj\.weight$"):
        load_model(path, dtype=torch.float32)
    with pytest.raises(UnknownModel, match="unknown model 'Qwen3-999B'"):
        load_model("Qwen3-999B", random=True)
    with pytest.raises(InputError, match="names? a model|model name, not a directory"):
        load_model("Qwen3-0.6B")


def test_prompt_errors_are_one_line(checkpoint):
    model = load_model(checkpoint[0], dtype=torch.float32)
    gen = Generator(model, Ops("baseline"), max_batch=2, max_len=16)
    with pytest.raises(InputError) as e:
        gen.generate([list(range(10))], 8)
    assert str(e.value) == "prompt 0 is too long: 10 tokens + 8 new tokens exceed the context of 16 tokens"
    for bad, msg in (([[1], [2], [3]], "3 prompts exceed this engine's batch of 2"), ([[]], "prompt 0 is empty"),
                     ([[1, 500]], r"token id 500 outside the vocabulary \[0, 128\)")):
        with pytest.raises(InputError, match=msg):
            gen.generate(bad, 2)
    with pytest.raises(InputError, match="exceeds the model's 512 positions"):
        Generator(model, Ops("baseline"), max_batch=1, max_len=600)


def test_eos_stops_each_prompt(checkpoint):
    path, hf = checkpoint
    tokens, _, _ = hf_greedy(hf, PROMPTS[0], 12)
    k = next(j for j in range(2, 12) if tokens[j] not in tokens[:j])      # first occurrence at j
    other, _, _ = hf_greedy(hf, PROMPTS[1], 12)
    model = load_model(path, dtype=torch.float32)
    out = Generator(model, Ops("baseline"), max_batch=2, max_len=32).generate(PROMPTS[:2], 12, eos_ids=[tokens[k]])
    assert out.tokens[0] == tokens[:k] and out.finish[0] == "eos"
    stop = other.index(tokens[k]) if tokens[k] in other else None
    assert out.tokens[1] == other[:stop] and out.finish[1] == ("length" if stop is None else "eos")


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(sample(logits, 0.0, 1.0, None), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, 1e-6, torch.Generator().manual_seed(1)), logits.argmax(-1))
    draw = lambda seed: sample(logits, 0.8, 0.9, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    # top-p keeps the smallest set of top tokens holding >= p of the mass; nothing outside is drawn
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = torch.softmax(row[0], -1)
    nucleus = int((probs.cumsum(0) < 0.8).sum()) + 1
    draws = sample(row.expand(20000, -1), 1.0, 0.8, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(range(nucleus))
    # temperature sampling follows softmax(logits / T)
    draws = sample(row.expand(40000, -1), 2.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(row[0] / 2.0, -1), atol=0.01, rtol=0)


def test_cli_generate(checkpoint):
    path, hf = checkpoint
    r = subprocess.run([sys.executable, "-m", "tuneforge.cli", "generate", "--model", path, "--prompt", "5 3 9 1 7",
                        "--prompt", "42,8", "--max-new-tokens", "6", "--dispatch", "baseline", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == [hf_greedy(hf, p, 6)[0] for p in PROMPTS[:2]]
    assert out["finish"] == ["length", "length"] and out["dispatch"] == "torch baseline"


def test_cli_generate_with_a_tokenizer(checkpoint, tmp_path, capsys):
    """Text prompts go through the checkpoint's tokenizer (a word-level one: "w5" is token 5) and
    generation stops at the tokenizer's EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tuneforge.cli import main
    path, hf = checkpoint
    expect = hf_greedy(hf, [5, 3, 9], 8)[0]
    stop = next(j for j in range(2, 8) if expect[j] not in expect[:j])   # first occurrence at `stop`
    ckpt = shutil.copytree(path, tmp_path / "with-tokenizer")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token=f"w{expect[stop]}", unk_token="w0").save_pretrained(ckpt)
    assert main(["generate", "--model", str(ckpt), "--prompt", "w5 w3 w9", "--max-new-tokens", "8",
                 "--dispatch", "baseline", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == [expect[:stop]] and out["finish"] == ["eos"]
    assert out["outputs"][0].split() == [f"w{t}" for t in expect[:stop]]


def test_cli_bench_e2e(checkpoint, capsys):
    from tuneforge.cli import main
    assert main(["bench", "e2e", "--model", checkpoint[0], "--bsz", "2", "--ctx", "5", "--gen", "3",
                 "--dispatch", "baseline"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("tuneforge (baseline dispatch, TP=1): bsz 2 ctx 5 gen 3: prefill ")
    assert "ms/token" in line and "tokens/s" in line and "dispatch: torch baseline" in line
    assert ("floor: n/a" in line) != torch.cuda.is_available()


@pytest.mark.parametrize("argv, msg", [
    (["--model", "CKPT", "--prompt", "hello world"], "the model has no tokenizer, so a prompt must be token ids"),
    (["--model", "Qwen3-999B", "--prompt", "1", "--random-weights"], "unknown model 'Qwen3-999B'"),
    (["--model", "Qwen3-0.6B", "--prompt", "1"], "'Qwen3-0.6B' names a model but no checkpoint"),
    (["--model", "CKPT", "--prompt", "1 2", "--max-new-tokens", "511"],
     "prompt 0 is too long: 2 tokens + 511 new tokens exceed the context of 512 tokens"),
])
def test_cli_errors_are_one_line(checkpoint, capsys, argv, msg):
    from tuneforge.cli import main
    argv = ["generate", "--dispatch", "baseline"] + [checkpoint[0] if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuneforge: error: {msg}") and err.count("\n") == 1, err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["baseline", "default"])
def test_cuda_graph_decode_matches_eager(checkpoint, mode):
    """Prompts long enough that decode crosses the 256-slot KV bucket: two graphs per batch bucket (on
    Hopper each kept chained or unchained by its replays' time, kernels/_common.chained)."""
    path, hf = checkpoint
    model = load_model(path, dtype=torch.float32, device="cuda")
    prompts = [[(7 * i + j) % 128 for j in range(250 - 40 * i)] for i in range(3)]
    gens = [Generator(model, Ops(mode), max_batch=3, max_len=280, graphs=g) for g in (False, True)]
    runs = [gen.generate(prompts, 20, return_logits=True) for gen in gens]
    captured = {(b, kv) for b, st in gens[1]._static.items() for kv in st.graphs}
    assert len(captured) == 2
    measured = kernel_common.chained(model.embed)["PDL"] and mode != "baseline"
    assert set(gens[1].chained_decode) == (captured if measured else set())
    assert runs[0].tokens == runs[1].tokens
    for a, b in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tokens, _, ref = hf_greedy(hf, prompts[0], 20)      # and both are the transformers model
    assert runs[1].tokens[0] == tokens
    torch.testing.assert_close(torch.stack([s[0] for s in runs[1].logits]).cpu(), ref, rtol=1e-3, atol=1e-3)


# --- RoPE scaling (issue 21): a config's rope_parameters through the engine, against transformers ------

def scaled_rope_checkpoint(path, rope: dict):
    """tiny_hf's weights with another RoPE (its config's rope_parameters replaced, the rotary embedding
    rebuilt from them; the weights do not depend on RoPE), saved with save_pretrained."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    hf = tiny_hf()
    hf.config.rope_parameters = {"rope_theta": hf.config.rope_parameters["rope_theta"], **rope}
    hf.model.rotary_emb = Qwen3RotaryEmbedding(hf.config)
    hf.save_pretrained(path)
    return str(path), hf


YARN = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("rope", [YARN, dict(rope_type="linear", factor=4.0), dict(rope_type="dynamic", factor=4.0)],
                         ids=["yarn", "linear", "dynamic"])
def test_scaled_rope_matches_transformers(tmp_path, rope):
    """Prefill logits, decode logits and greedy tokens of the padded batch, and of a prompt longer than
    YaRN's original_max_position_embeddings (torch baselines)."""
    path, hf = scaled_rope_checkpoint(tmp_path / "ckpt", rope)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["rope_parameters"]["rope_type"] == rope["rope_type"]
    model = load_model(path, dtype=torch.float32)
    check_against_hf(hf, Generator(model, Ops("baseline"), max_batch=3, max_len=64), steps=8)
    prompt = [(5 * i + 3) % 128 for i in range(80)]
    tokens, ref_prefill, ref_steps = hf_greedy(hf, prompt, 8)
    gen = Generator(model, Ops("baseline"), max_batch=1, max_len=96)
    prefill = gen.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), all_logits=True)
    torch.testing.assert_close(prefill[0], ref_prefill, **TOL)
    out = gen.generate([prompt], 8, return_logits=True)
    assert out.tokens == [tokens]
    torch.testing.assert_close(torch.cat(out.logits), ref_steps, **TOL)


def test_yarn_through_the_triton_kernels_matches_transformers(tmp_path):
    """The interpreted Triton path (every kernel at its default config, rope_qk_norm with YaRN's frequencies
    and attention factor): prefill logits of one prompt."""
    path, hf = scaled_rope_checkpoint(tmp_path / "ckpt", YARN)
    gen = Generator(load_model(path, dtype=torch.float32), Ops("default"), max_batch=1, max_len=16)
    prompt = PROMPTS[2]
    prefill = gen.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), all_logits=True)
    torch.testing.assert_close(prefill[0], hf_greedy(hf, prompt, 1)[1], **TOL)


def _random_rank(world, steps: int):
    from tuneforge.engine.dispatch import Ops as RankOps
    shard = Shard() if world is None else Shard(world.rank, world.size, world.group)
    cfg = replace(load_config("Qwen3-0.6B"), **{**TINY, "num_key_value_heads": 1})
    model = load_model(cfg.name, config=cfg, shard=shard, random=True, dtype=torch.float32, seed=3)
    out = Generator(model, RankOps("baseline"), max_batch=3, max_len=32).generate(PROMPTS, steps, return_logits=True)
    return out.tokens, torch.stack(out.logits)


def test_random_weights_are_the_same_model_at_every_tp_degree():
    """Each checkpoint tensor is drawn whole from its own seeded generator and sliced per rank, so TP 2
    (its one KV head replicated on both ranks) runs the model TP 1 runs."""
    from tuneforge.world import spawn
    tokens, logits = _random_rank(None, 4)
    for rank_tokens, rank_logits in spawn(_random_rank, 2, 4, device="cpu", timeout=300.0):
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logits, logits, **TOL)
