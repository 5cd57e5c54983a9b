"""The dashboard's pages (Streamlit AppTest) over a database filled by the real tuner.

`tuneforge tune` runs twice in a subprocess (Qwen3-0.6B predicted by the cost model for one H100,
and for eight H800s at TP 8, a few token buckets), then every page is rendered and the numbers it
shows are compared with what the Store and Optuna read from the same database independently.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

# The GPU image has no streamlit (nor optuna unless carried): skip there, not a collection error.
st = pytest.importorskip("streamlit")
pa = pytest.importorskip("pyarrow")
import optuna
import pandas as pd
from streamlit.testing.v1 import AppTest

from conftest import DASHBOARD_MODEL
from tuneforge.cli import main as tuneforge_main
from tuneforge.dashboard import data
from tuneforge.dashboard.cli import DEFAULT_PORT
from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl.problem import DECODE_CONTEXTS
from tuneforge.models.configs import load_config
from tuneforge.tune.plan import plan

APP = Path(data.__file__).with_name("app.py")
README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = DASHBOARD_MODEL   # the model conftest.tuned_db tunes


@pytest.fixture
def store(tuned_db):
    s = Store(tuned_db.url, create=False)
    yield s
    s.close()


def open_app(monkeypatch, url: str, page: str | None = None) -> AppTest:
    monkeypatch.setenv("TUNEFORGE_DB", url)
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    if page is not None:
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[tuple[dict, dict]]:
    """Each Altair chart on the page: (its Vega-Lite spec, its datasets by name as lists of records)."""
    out = []
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        frames = {d.name: pa.ipc.open_stream(d.data.data).read_pandas().to_dict(orient="records")
                  for d in el.proto.datasets}
        out.append((spec, frames))
    return out


def mark_data(spec: dict, frames: dict, mark: str) -> list[dict]:
    """The records the chart draws with ``mark`` (its layer's data, else the chart's)."""
    (name,) = {(layer.get("data") or spec["data"])["name"] for layer in spec.get("layer", [spec])
               if (layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]) == mark}
    return frames[name]


def title_text(spec: dict) -> str:
    title = spec.get("title") or next((layer.get("title") for layer in spec.get("layer", []) if "title" in layer), {})
    if isinstance(title, str):
        return title
    sub = title.get("subtitle", "")
    return " ".join([title.get("text", ""), *(sub if isinstance(sub, list) else [sub])])


def assert_every_chart_says_how(at: AppTest) -> list[tuple[dict, list]]:
    found = charts(at)
    assert found, "the page shows no chart"
    for spec, _ in found:
        text = title_text(spec)
        assert "predicted by the cost model for" in text or "measured on" in text, text
    return found


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ------------------------------------------------------------------------------------- pages

def test_overview_counts_and_geomean_match_the_database(monkeypatch, tuned_db, store):
    at = open_app(monkeypatch, tuned_db.url)
    assert [h.value for h in at.header] == ["Overview"]
    table = at.dataframe[-1].value.set_index("fingerprint")
    for env in (tuned_db.h100, tuned_db.h800):
        tp = env.world_size
        winners = store.winners(fingerprint=env.fingerprint, model=MODEL, tp=tp)
        assert winners
        row = table.loc[env.fingerprint]
        assert row["geomean_speedup"] == pytest.approx(geomean(w.speedup for w in winners))
        assert row["tuned"] == len(winners)
        assert row["planned"] == len({p.key for p, _ in store.plan(MODEL, tp)})
        assert row["untuned"] == ""          # every planned problem (decode attention too) has a winner
        assert row["kernel_wins"] == sum(not w.config.get("baseline") for w in winners)
        assert row["source"] == "predicted"
        assert any(f"predicted by the cost model for {env.gpu_name} x{tp}" in c.value for c in at.caption)
    # nothing planned is said to be untuned (decode attention is tuned like the rest)
    assert not any("not tuned" in md.value for md in at.markdown)
    ((spec, frames),) = assert_every_chart_says_how(at)
    by_op = {(r["device"], r["op"]): r["geomean_speedup"] for r in mark_data(spec, frames, "bar")}
    rmsnorm = [w.speedup for w in store.winners(fingerprint=tuned_db.h800.fingerprint, op="rmsnorm")]
    assert by_op[(tuned_db.h800.label, "rmsnorm")] == pytest.approx(geomean(rmsnorm))


def test_overview_leads_with_the_model_time_per_forward(monkeypatch, tuned_db):
    at = open_app(monkeypatch, tuned_db.url)
    times = data.model_times(data.load_snapshot(tuned_db.url))
    assert set(times["fingerprint"]) == {tuned_db.h100.fingerprint, tuned_db.h800.fingerprint}
    assert [s.value for s in at.subheader][:2] == [f"{MODEL} · TP 1 · {tuned_db.h100.label}",
                                                   f"{MODEL} · TP 8 · {tuned_db.h800.label}"]
    cards = [(m.label, m.value, m.proto.delta) for m in at.metric]
    expected = []
    for fp in (tuned_db.h100.fingerprint, tuned_db.h800.fingerprint):
        for f in data.headline_forwards(times[times["fingerprint"] == fp]).itertuples():
            assert f.tuned == f.problems and f.time_ms < f.baseline_ms
            expected.append((f.phase, f.tokens, f.ctx, f.time_ms, f.baseline_ms, f.speedup))
    # decode at 1 and 16 tokens (the longest KV context), prefill at 512, on each device
    assert [(p, m) for p, m, *_ in expected] == [("decode", 1), ("decode", 16), ("prefill", 512)] * 2
    assert len(cards) == len(expected)
    for (label, value, delta), (phase, m, ctx, t, b, speedup) in zip(cards, expected):
        assert label == (f"{phase} · {m} tok" + (f" · ctx {ctx}" if phase == "decode" else ""))
        def ms(x):     # three figures, whole milliseconds from 100 on
            return f"{x:#.3g} ms" if x < 100 else f"{x:.0f} ms"
        assert value == ms(t) and delta == f"{speedup:.2f}x vs torch {ms(b)}"


def test_speedups_filter_table_and_bars(monkeypatch, tuned_db, store):
    at = open_app(monkeypatch, tuned_db.url, "Speedups")
    everything = at.dataframe[0].value
    assert len(everything) == len(store.winners())      # each problem tuned in one plan per device here
    at.multiselect(key="f_op").set_value(["allreduce"]).run()
    at.multiselect(key="f_tokens").set_value([16]).run()
    shown = at.dataframe[0].value
    (expected,) = [w for w in store.winners(op="allreduce") if w.problem.shape["m"] == 16]
    assert len(shown) == 1
    row = shown.iloc[0]
    assert row["problem"] == expected.key and row["device"] == tuned_db.h800.label and row["tp"] == 8
    assert row["speedup"] == pytest.approx(expected.speedup)
    assert row["time_us"] == pytest.approx(expected.time_s * 1e6)
    assert row["baseline_us"] == pytest.approx(expected.baseline_s * 1e6)
    ((spec, frames),) = assert_every_chart_says_how(at)
    assert "H800 x8" in title_text(spec)
    bars = mark_data(spec, frames, "bar")
    assert [(b["problem"], b["speedup"]) for b in bars] == [(expected.key, pytest.approx(expected.speedup))]


def test_strategy_map_shows_each_chosen_strategy(monkeypatch, tuned_db, store):
    at = open_app(monkeypatch, tuned_db.url, "Strategy map")
    assert [h.value for h in at.header] == ["Strategy map"]
    def label(config):   # a TP block's gemm_ar strategy names its all-reduce's strategy too
        if config.get("baseline"):
            return "baseline"
        sub = config.get("ar_strategy")
        return config["strategy"] + (f" + {sub}" if sub else "")

    expected = {(w.problem.op, w.problem.shape["m"]): (label(w.config), w.speedup)
                for op in data.STRATEGY_OPS for w in store.winners(op=op)}
    # the TP8 run tuned blocks and all-reduces (a dense model: no MoE blocks)
    assert {op for op, _ in expected} == set(data.STRATEGY_OPS) - {"moe_block"}
    found = assert_every_chart_says_how(at)
    cells = {}
    for spec, frames in found:
        assert "H800 x8" in title_text(spec)
        marks = {layer["mark"]["type"] for layer in spec["layer"]}
        assert marks == {"rect", "text"}
        for r in mark_data(spec, frames, "rect"):
            cells[(r["op"], r["tokens"])] = (r["strategy"], r["speedup"])
            assert r["label"] == f"{r['speedup']:.2f}x"
    assert cells.keys() == expected.keys()
    for k, (strategy, speedup) in expected.items():
        assert cells[k][0] == strategy and cells[k][1] == pytest.approx(speedup)


def test_trials_history_and_importances_of_a_study(monkeypatch, tuned_db, store):
    (winner,) = [w for w in store.winners(fingerprint=tuned_db.h800.fingerprint, op="allreduce")
                 if w.problem.shape["m"] == 512]
    at = open_app(monkeypatch, tuned_db.url, "Trials")
    at.selectbox(key="t_device").set_value(tuned_db.h800.label).run()
    at.selectbox(key="t_op").set_value("allreduce").run()
    at.selectbox(key="t_study").set_value(winner.study_name).run()
    assert not at.exception, at.exception
    study = optuna.load_study(study_name=winner.study_name, storage=store.optuna_storage())
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["trials"] == str(len(trials))
    assert metrics["complete"] == str(len(complete))
    assert metrics["rejected (pruned)"] == str(sum(t.state == optuna.trial.TrialState.PRUNED for t in trials))
    assert metrics["best"] == f"{min(t.value for t in complete) * 1e6:.2f} µs"
    assert metrics["torch baseline"] == f"{study.user_attrs['baseline_s'] * 1e6:.2f} µs"
    assert any("predicted by the cost model for H800 x8" in c.value for c in at.caption)
    history, importances = assert_every_chart_says_how(at)
    points = mark_data(*history, "circle")
    assert sorted(p["value_us"] for p in points) == pytest.approx(sorted(t.value * 1e6 for t in complete))
    params = {r["param"]: r["importance"] for r in mark_data(*importances, "bar")}
    assert params and params.keys() <= {k for t in complete for k in t.params}
    assert sum(params.values()) == pytest.approx(1.0)


def test_devices_side_by_side_time_ratio(monkeypatch, tuned_db, store):
    at = open_app(monkeypatch, tuned_db.url, "Devices side by side")
    at.selectbox(key="d_a").set_value(tuned_db.h100.fingerprint).run()
    at.selectbox(key="d_b").set_value(tuned_db.h800.fingerprint).run()
    a = {w.key: w for w in store.winners(fingerprint=tuned_db.h100.fingerprint)}
    b = {w.key: w for w in store.winners(fingerprint=tuned_db.h800.fingerprint)}
    common = sorted(a.keys() & b.keys())
    assert common, "the two runs share single-GPU problems (e.g. the rmsnorms)"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["problems in common"] == str(len(common))
    assert metrics["geomean time ratio B / A"] == f"{geomean(b[k].time_s / a[k].time_s for k in common):.3f}"
    table = at.dataframe[0].value.set_index("problem")
    for k in common:
        assert table.loc[k, "time_ratio"] == pytest.approx(b[k].time_s / a[k].time_s)
    ((spec, _),) = assert_every_chart_says_how(at)
    assert "H100 x1" in title_text(spec) and "H800 x8" in title_text(spec)


def test_roofline_shows_each_winners_percent_of_light(monkeypatch, tuned_db, store):
    at = open_app(monkeypatch, tuned_db.url, "Roofline")
    found = assert_every_chart_says_how(at)
    # one chart and one table per device, in label order
    assert [title_text(spec).split(": ")[1].split(" (")[0] for spec, _ in found] == ["H100 x1", "H800 x8"]
    for env, table in zip((tuned_db.h100, tuned_db.h800), at.dataframe):
        expected = {(w.problem.op, data._shape_text(w.problem.dims), w.problem.shape["m"]): w
                    for w in store.winners(fingerprint=env.fingerprint)}
        rows = table.value.to_dict(orient="records")
        assert len(rows) == len(expected)
        for r in rows:
            w = expected[(r["op"], r["shape"], r["tokens"])]
            assert r["pct_sol"] == pytest.approx(w.pct_sol)
            assert r["baseline_pct_sol"] == pytest.approx(w.pct_sol * w.time_s / w.baseline_s)


# --------------------------------------------------------------------------- no data, bad data

def _no_tables(path: Path) -> None:
    sqlite3.connect(path).close()      # an SQLite file without tables


def _tables_no_winners(path: Path) -> None:
    Store(f"sqlite:///{path}").close()


@pytest.mark.parametrize("make", [None, lambda p: p.write_bytes(b""), _no_tables, _tables_no_winners],
                         ids=["missing-file", "empty-file", "no-tables", "no-winners"])
def test_empty_database_says_how_to_fill_it(monkeypatch, tmp_path, make):
    path = tmp_path / "fresh.db"
    if make is not None:
        make(path)
    at = open_app(monkeypatch, f"sqlite:///{path}")
    assert [h.value for h in at.header] == ["No tuning results yet"]
    assert data.FILL_COMMAND in at.code[0].value and str(path) in at.code[0].value
    assert not at.error
    assert path.exists() == (make is not None)          # the dashboard never creates a database


@pytest.mark.parametrize("content, message", [
    (b"\x13\x37" * 4096, "not an SQLite database"),
    (None, "not a tuneforge database"),
], ids=["garbage", "foreign-tables"])
def test_unreadable_database_is_one_clear_error(monkeypatch, tmp_path, content, message):
    path = tmp_path / "bad.db"
    if content is None:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE users (id INTEGER)")
    else:
        path.write_bytes(content)
    at = open_app(monkeypatch, f"sqlite:///{path}")
    assert len(at.error) == 1 and message in at.error[0].value
    assert not at.dataframe and not charts(at)


# ---------------------------------------------------------------------------------- data, CLI

def test_winners_take_model_and_roles_from_the_plan_at_their_tp(tuned_db, store):
    snap = data.load_snapshot(tuned_db.url)
    h800 = snap.winners[snap.winners["fingerprint"] == tuned_db.h800.fingerprint]
    assert set(h800["tp"]) == {8} and set(h800["model"]) == {MODEL}
    # the final norm and both layer norms are one problem: one row with all three roles
    norm = h800[(h800["op"] == "rmsnorm") & (h800["tokens"] == 1)]
    assert len(norm) == 1
    assert set(norm.iloc[0]["roles"].split(", ")) == {r for p, r in store.plan(MODEL, 8)
                                                      if p.key == norm.iloc[0]["problem"]}
    assert sorted(snap.studies) == sorted(optuna.get_all_study_names(store.optuna_storage()))


def test_cli_refuses_a_busy_port(tuned_db, capsys):
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert tuneforge_main(["dashboard", "--db", tuned_db.url, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tuneforge: error: port {port} on localhost is in use; pick another with --port"]


# ------------------------------------------------------------------ model time over a filled store

H800 = Environment("H800", 132, 80.0, 1, "nvswitch:400GB/s", "2.13.0", "3.9.0", "cost-model", True)


def record_plan(url: str, tp: int, decode=(1,), prefill=(512,), skip=(), baseline_won=(), model: str = MODEL,
                configs=None) -> tuple:
    """A store holding the plan of ``model`` at ``tp`` and a winner for each of its problems (but the
    ``skip`` ops and roles): problem i takes (i + 1) us, its baseline 3x that (the ``baseline_won``
    roles' winners are the baseline, same time; ``configs``: role -> the config its winners hold).
    Returns (env, {(role, m, ctx): winner})."""
    env = replace(H800, world_size=tp)
    p = plan(model, tp, decode, prefill)
    by_role = {}
    with Store(url) as store:
        store.add_plan(p.model, tp, p.pairs())
        for i, item in enumerate(p):
            t = (i + 1) * 1e-6
            base = any(r in baseline_won for r in item.roles)
            config = next((c for r, c in (configs or {}).items() if r in item.roles), {"x": i})
            w = Winner(item.problem, env, {"baseline": True} if base else config, t, t if base else 3 * t,
                       1.0 if base else 3.0, 50.0, "predicted", "h", Store.study_name(item.problem, env), 1)
            if item.problem.op not in skip and not set(item.roles) & set(skip):
                store.record_winner(w)
            for r in item.roles:
                by_role[(r, item.problem.shape["m"], item.problem.shape.get("ctx"))] = w
    return env, by_role


def test_model_time_sums_every_op_over_the_layers_it_runs_in(tmp_path):
    url = f"sqlite:///{tmp_path / 'tp1.db'}"
    env, w = record_plan(url, 1)
    layers = load_config(MODEL).num_hidden_layers
    times = data.model_times(data.load_snapshot(url)).set_index(["phase", "tokens", "ctx"])
    assert sorted(times.index, key=str) == sorted([("decode", 1, c) for c in DECODE_CONTEXTS] + [("prefill", 512, pd.NA)],
                                                  key=str)

    def total(m, attention, tuned):
        t = (lambda x: x.time_s) if tuned else (lambda x: x.baseline_s)
        per_layer = ["layer.attn.qkv_proj", "layer.attn.rope_qk_norm", "layer.attn.o_proj", "layer.mlp.gate_up_proj",
                     "layer.mlp.silu_mul", "layer.mlp.down_proj"]
        s = layers * sum(t(w[(r, m, None)]) for r in per_layer) + (2 * layers + 1) * t(w[("final_norm", m, None)])
        if attention is not None:      # a decode step: attention over the KV cache, logits
            s += layers * t(w[("layer.attn.decode", m, attention)]) + t(w[("lm_head", m, None)])
        return s * 1e3

    for (phase, m, ctx), row in times.iterrows():
        attention = None if phase == "prefill" else ctx
        assert row["time_ms"] == pytest.approx(total(m, attention, True))
        assert row["baseline_ms"] == pytest.approx(total(m, attention, False))
        assert row["speedup"] == pytest.approx(3.0)          # every winner here is 3x its baseline
        assert row["tuned"] == row["problems"] == (9 if phase == "decode" else 7)
        assert row["source"] == "predicted" and row["device"] == env.label


def test_model_time_at_tp_runs_a_kernel_won_block_in_place_of_its_parts(tmp_path):
    url = f"sqlite:///{tmp_path / 'tp2.db'}"
    env, w = record_plan(url, 2, prefill=(), baseline_won=("layer.mlp.tp",))
    layers = load_config(MODEL).num_hidden_layers
    row = data.model_times(data.load_snapshot(url)).query("ctx == 256").iloc[0]
    m, ctx = 1, 256
    # tp_attn won by a kernel: it replaces qkv_proj, o_proj and their all-reduce; tp_mlp won by the
    # baseline: the engine runs its parts, the all-reduce being torch's (the engine never dispatches
    # a stand-alone all-reduce)
    tuned = layers * (w[("layer.attn.tp", m, None)].time_s + w[("layer.attn.rope_qk_norm", m, None)].time_s
                      + w[("layer.attn.decode", m, ctx)].time_s + w[("layer.mlp.gate_up_proj", m, None)].time_s
                      + w[("layer.mlp.silu_mul", m, None)].time_s + w[("layer.mlp.down_proj", m, None)].time_s
                      + w[("layer.mlp.allreduce", m, None)].baseline_s)
    tuned += (2 * layers + 1) * w[("final_norm", m, None)].time_s + w[("lm_head", m, None)].time_s
    assert w[("layer.mlp.allreduce", m, None)].time_s < w[("layer.mlp.allreduce", m, None)].baseline_s
    assert row["time_ms"] == pytest.approx(tuned * 1e3)
    assert row["problems"] == row["tuned"] == 9


def test_model_time_runs_a_kernel_won_moe_block_in_place_of_the_expert_parts(tmp_path):
    """Qwen3-30B-A3B at TP 2: a moe_block won by a kernel, ep (the experts placed, engine/ep) or tp (no
    shared expert), replaces the pack, both expert GEMMs and the all-reduce of every sparse layer; one
    won by the baseline leaves the parts."""
    moe = "Qwen3-30B-A3B"
    times, by_role = {}, None
    for won in ("ep", "tp", "baseline"):
        url = f"sqlite:///{tmp_path / f'{won}.db'}"
        _, by_role = record_plan(url, 2, prefill=(), model=moe, configs={"layer.moe.block": {"strategy": won}},
                                 baseline_won=("layer.moe.block",) if won == "baseline" else ())
        times[won] = data.model_times(data.load_snapshot(url)).query("ctx == 256").iloc[0]["time_ms"]
    parts = ("layer.moe.pack", "layer.moe.experts.gate_up", "layer.moe.experts.down")
    block = by_role[("layer.moe.block", 1, None)].time_s - sum(by_role[(r, 1, None)].time_s for r in parts) \
        - by_role[("layer.moe.allreduce", 1, None)].baseline_s      # the engine's all-reduce is torch's
    layers = load_config(moe).num_hidden_layers
    assert times["ep"] == pytest.approx(times["tp"])
    assert times["ep"] - times["baseline"] == pytest.approx(layers * block * 1e3)


def test_strategy_map_shows_the_predicted_moe_strategy_of_qwen3_30b_a3b_at_tp8_on_h800(monkeypatch, tmp_path):
    """`tuneforge tune --model Qwen3-30B-A3B --tp 8 --target H800` on its moe_block problems: the Strategy
    map shows, for H800 x8 predicted by the cost model, the strategy the store holds at each bucket."""
    from tuneforge.tune.plan import Plan
    from tuneforge.tune.tuner import TuneOptions, Tuner
    url = f"sqlite:///{tmp_path / 'moe.db'}"
    full = plan("Qwen3-30B-A3B", 8, decode_buckets=[1, 16], prefill_buckets=[4096])
    with Store(url) as s:
        Tuner(s, TuneOptions(target="H800", trials=4, verify=False, progress=None)).tune(
            Plan(full.model, 8, full.dtype, full.decode_buckets, full.prefill_buckets, full.find("moe_block")))
        expected = {w.problem.shape["m"]: (data.strategy_label(w.config), w.speedup) for w in s.winners(op="moe_block")}
    assert sorted(expected) == [1, 16, 4096]
    at = open_app(monkeypatch, url, "Strategy map")
    ((spec, frames),) = assert_every_chart_says_how(at)
    assert "H800 x8" in title_text(spec) and "predicted by the cost model" in title_text(spec)
    cells = {r["tokens"]: (r["strategy"], r["speedup"]) for r in mark_data(spec, frames, "rect")
             if r["op"] == "moe_block"}
    assert cells.keys() == expected.keys()
    for m, (strategy, speedup) in expected.items():
        assert cells[m][0] == strategy and cells[m][1] == pytest.approx(speedup)


def test_planned_problems_without_a_winner_are_named_and_the_model_time_says_partial(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path / 'partial.db'}"
    record_plan(url, 1, skip=("decode_attention",))
    snap = data.load_snapshot(url)
    (row,) = data.overview(snap).itertuples()
    contexts = len(DECODE_CONTEXTS)
    assert row.untuned == f"decode_attention x{contexts}" and row.tuned == row.planned - contexts
    times = data.model_times(snap)
    decode = times[times["phase"] == "decode"]
    assert (decode["problems"] - decode["tuned"] == 1).all()
    at = open_app(monkeypatch, url)
    assert all("partial: 8 of 9 problems have a winner" in m.help for m in at.metric if m.label.startswith("decode"))


def recorded_in(w: Winner, env: Environment) -> Winner:
    """``w`` as if tuned in ``env`` (a new record: nothing of the row ``w`` was read from)."""
    return Winner(w.problem, env, w.config, w.time_s, w.baseline_s, w.speedup, w.pct_sol, w.source,
                  w.template_hash, Store.study_name(w.problem, env), w.n_trials)


def test_devices_default_to_the_pair_sharing_most_problems(monkeypatch, tuned_db, tmp_path):
    url = f"sqlite:///{tmp_path / 'three.db'}"
    with sqlite3.connect(tuned_db.path) as src, sqlite3.connect(tmp_path / "three.db") as dst:
        src.backup(dst)                                 # the WAL's pages too
    h200 = replace(tuned_db.h800, gpu_name="H200", memory_gb=141.0)
    with Store(url, create=False) as store:        # an H200 x8 that tuned what the H800 x8 did
        for w in store.winners(fingerprint=tuned_db.h800.fingerprint):
            store.record_winner(recorded_in(w, h200))
        h100_keys = {w.key for w in store.winners(fingerprint=tuned_db.h100.fingerprint)}
        h800_keys = {w.key for w in store.winners(fingerprint=tuned_db.h800.fingerprint)}
    at = open_app(monkeypatch, url, "Devices side by side")
    picked = {at.selectbox(key="d_a").value, at.selectbox(key="d_b").value}
    assert picked == {h200.fingerprint, tuned_db.h800.fingerprint}
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["problems in common"]) == len(h800_keys) > len(h100_keys & h800_keys)


def test_speedups_note_counts_winners_per_device(monkeypatch, tuned_db, store):
    at = open_app(monkeypatch, tuned_db.url, "Speedups")
    winners = store.winners()
    note = f"{len(winners)} winners: {len({w.key for w in winners})} problems on 2 device(s)."
    assert note in [md.value for md in at.markdown]      # one model: one row per winner, nothing else said


def test_trials_page_says_imported_winners_have_no_history(monkeypatch, tuned_db, tmp_path, store):
    exported = tmp_path / "winners.json"
    store.export(exported)
    url = f"sqlite:///{tmp_path / 'imported.db'}"
    with Store(url) as fresh:
        fresh.import_(exported)
    at = open_app(monkeypatch, url, "Trials")
    assert not at.exception
    (info,) = at.info
    n = len(store.winners())
    assert info.value.startswith(f"{n} of {n} winners carry no Optuna history") and "db import" in info.value


# ----------------------------------------------------------------------------------------- CLI, README

def test_sigint_stops_the_dashboard_even_when_started_with_sigint_ignored(tuned_db):
    """A background job of a non-interactive shell inherits SIGINT ignored: it must still stop."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "dashboard", "--db", tuned_db.url,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.3)
        assert proc.poll() is None, "the dashboard did not start"
        proc.send_signal(signal.SIGINT)                # to the CLI only, as `kill -INT <pid>` does
        assert proc.wait(timeout=30) == 130
        gone = time.monotonic() + 10                    # the streamlit child is gone too (a loaded CI machine may lag)
        while _group_alive(proc.pid) and time.monotonic() < gone:
            time.sleep(0.2)
        assert not _group_alive(proc.pid)
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_readme_examples_match_the_main_job_and_the_cli():
    text = README.read_text()
    (key,) = re.findall(r"tuneforge db show '([^']+)'", text)
    assert key in {i.key for i in plan("Qwen3-32B", 1)}     # stored by `tuneforge tune --model Qwen3-32B`
    ports = re.findall(r"tuneforge dashboard \[--db URL\] \[--port (\d+)\]", text)
    assert ports == [str(DEFAULT_PORT)]
