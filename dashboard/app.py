"""The tuneforge dashboard: a Streamlit app over the tuning database.

Run it with ``tuneforge dashboard [--db URL]`` (or ``streamlit run dashboard/app.py`` with
``$TUNEFORGE_DB`` set). Pages are chosen in the sidebar (the choice is kept in the URL as
``?page=Strategy%20map``). Every chart and table says how its numbers were obtained: measured on which
device, or predicted by the cost model for which target.
"""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from tuneforge.dashboard import data
from tuneforge.errors import DatabaseError

STRATEGY_COLOURS = ["#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3", "#a6d854", "#ffd92f", "#e5c494"]   # ColorBrewer Set2
BASELINE_COLOUR = "#d9d9d9"
CACHE_S = 30          # how long a read of the database is reused before the next rerun reads again


@st.cache_data(ttl=CACHE_S, show_spinner=False)
def snapshot(url: str) -> data.Snapshot:
    return data.load_snapshot(url)


@st.cache_data(ttl=CACHE_S, show_spinner=False)
def study(url: str, name: str) -> data.StudyData:
    return data.load_study(url, name)


def _number(label: str, fmt: str):
    return st.column_config.NumberColumn(label, format=fmt)


# how every table labels and formats the columns it shows
COLUMNS = {
    "time_us": _number("time", "%.2f µs"), "baseline_us": _number("torch baseline", "%.2f µs"),
    "speedup": _number("speedup", "%.2fx"), "pct_sol": _number("% of SOL", "%.1f%%"),
    "baseline_pct_sol": _number("baseline % of SOL", "%.1f%%"),
    "geomean_speedup": _number("geomean speedup", "%.2fx"), "best_speedup": _number("best speedup", "%.2fx"),
    "median_pct_sol": _number("median % of SOL", "%.1f%%"), "kernel_wins": _number("kernel wins", "%d"),
    "value_us": _number("time", "%.3f µs"), "best_us": _number("best so far", "%.3f µs"),
    "time_us_a": _number("time A", "%.2f µs"), "time_us_b": _number("time B", "%.2f µs"),
    "baseline_us_a": _number("baseline A", "%.2f µs"), "baseline_us_b": _number("baseline B", "%.2f µs"),
    "speedup_a": _number("speedup A", "%.2fx"), "speedup_b": _number("speedup B", "%.2fx"),
    "time_ratio": _number("time B / A", "%.3f"), "baseline_ratio": _number("baseline B / A", "%.3f"),
    "time_ms": _number("tuned", "%.3f ms"), "baseline_ms": _number("torch baseline", "%.3f ms"),
}


def table(df: pd.DataFrame) -> None:
    st.dataframe(df, hide_index=True, column_config={c: COLUMNS[c] for c in df.columns if c in COLUMNS})


def provenance_lines(frame: pd.DataFrame) -> None:
    """A caption per environment in ``frame``: how its numbers were obtained."""
    for device, how in frame[["device", "provenance"]].drop_duplicates().itertuples(index=False):
        st.caption(f"**{device}**: {how}")


def pick(label: str, options: list, key: str) -> list:
    return st.multiselect(label, options, default=[], key=key, placeholder="all")


# -------------------------------------------------------------------------------------- pages

def _ms(value: float) -> str:
    return f"{value:#.3g} ms" if value < 100 else f"{value:.0f} ms"     # 21.0 ms, 6.48 ms, 214 ms


def forward_label(phase: str, tokens: int, ctx) -> str:
    """A card's title, short enough for a quarter of the page: ``decode · 1 tok · ctx 4096``."""
    return f"{phase} · {tokens} tok" + ("" if pd.isna(ctx) else f" · ctx {ctx}")


def page_overview(snap: data.Snapshot) -> None:
    st.header("Overview")
    st.write("The model's time per forward with the tuned winners against the torch baseline: each planned op's "
             "time times the number of times it runs (per layer, plus the final norm and the LM head), as the "
             "engine dispatches them (a TP block won by a kernel in place of its GEMMs and all-reduce; ops the "
             "engine does not dispatch at their torch time). Prefill attention (torch SDPA) is not a planned op "
             "and is not counted.")
    over = data.overview(snap)
    times = data.model_times(snap)
    for r in over.itertuples(index=False):
        mine = times[(times["fingerprint"] == r.fingerprint) & (times["model"] == r.model) & (times["tp"] == r.tp)]
        st.subheader(f"{r.model} · TP {r.tp} · {r.device}")
        st.caption(r.provenance)
        if mine.empty:
            st.info(f"No model time for {r.model}: its config is not a built-in model here, or it has no plan.")
            continue
        picks = data.headline_forwards(mine)
        columns = st.columns(max(len(picks), 1))
        for col, f in zip(columns, picks.itertuples(index=False)):
            partial = "" if f.tuned == f.problems else f"; partial: {f.tuned} of {f.problems} problems have a winner"
            col.metric(forward_label(f.phase, f.tokens, f.ctx), _ms(f.time_ms),
                       delta=f"{f.speedup:.2f}x vs torch {_ms(f.baseline_ms)}", delta_color="normal",
                       help=f"{f.phase} of {f.tokens} tokens over {f.layers} layers, {r.provenance}{partial}",
                       border=True)
    if not times.empty:
        with st.expander("Every forward: decode step per token bucket and KV context, prefill per bucket"):
            table(times.drop(columns=["fingerprint", "provenance"]))

    st.subheader("Per problem")
    st.write("Per device and model: how many of the planned problems are tuned (the ops of any without a "
             "winner under *untuned*), and the geometric-mean speedup of the winners over the torch baseline, "
             "each problem counting once whatever its share of the model's time (a problem won by the "
             "baseline counts as 1.00x).")
    table(over)
    provenance_lines(over)

    by_op = (data.unique_problems(snap.winners).groupby(["device", "op"])["speedup"]
             .agg(data.geomean).rename("geomean_speedup").reset_index())
    how = [f"{d}: {p}" for d, p in over[["device", "provenance"]].drop_duplicates().itertuples(index=False)]
    chart = (alt.Chart(by_op, title=alt.TitleParams("Geometric-mean speedup over the torch baseline, by op and device",
                                                    subtitle=how))
             .mark_bar()
             .encode(x=alt.X("op:N", title=None, axis=alt.Axis(labelAngle=0)), xOffset="device:N",
                     y=alt.Y("geomean_speedup:Q", title="speedup (x)"),
                     color=alt.Color("device:N", title="device (measured / predicted)"),
                     tooltip=["device", "op", alt.Tooltip("geomean_speedup:Q", format=".2f")]))
    st.altair_chart(chart + _one_x_rule("y"), width="stretch")


def speedups_note(rows: pd.DataFrame) -> str:
    """What the table's rows are: winners per device, and why there are more rows where there are."""
    winners = len(data.unique_problems(rows))
    note = (f"{winners} winners: {rows['problem'].nunique()} problems on "
            f"{rows['fingerprint'].nunique()} device(s).")
    if len(rows) > winners:
        note += f" {len(rows)} rows: a problem that several models share is listed once for each."
    return note


def page_speedups(snap: data.Snapshot) -> None:
    st.header("Speedups")
    df = snap.winners
    c = st.columns(5)
    with c[0]:
        devices = pick("device", sorted(df["device"].unique()), "f_device")
    with c[1]:
        models = pick("model", sorted(df["model"].unique()), "f_model")
    with c[2]:
        tps = pick("TP size", sorted(df["tp"].unique()), "f_tp")
    with c[3]:
        ops = pick("op", sorted(df["op"].unique()), "f_op")
    with c[4]:
        buckets = pick("token bucket (m)", sorted(df["tokens"].dropna().unique()), "f_tokens")
    rows = data.filter_winners(df, device=devices, model=models, tp=tps, op=ops, tokens=buckets)
    st.write(speedups_note(rows))
    table(rows[["device", "source", "model", "tp", "roles", "op", "shape", "tokens", "config", "time_us",
                "baseline_us", "speedup", "pct_sol", "n_trials", "problem"]])
    for device, g in data.unique_problems(rows).groupby("device", sort=True):
        how = g["provenance"].iloc[0]
        g = g.assign(problem_shape=g["op"] + " " + g["shape"])
        chart = (alt.Chart(g, title=alt.TitleParams(f"Speedup over the torch baseline: {device}",
                                                    subtitle=how))
                 .mark_bar()
                 .encode(y=alt.Y("problem_shape:N", title=None, axis=alt.Axis(labelLimit=320)),
                         yOffset="tokens:O",
                         x=alt.X("speedup:Q", title="speedup over the torch baseline (x)"),
                         color=alt.Color("tokens:O", title="tokens (m)", scale=alt.Scale(scheme="viridis")),
                         tooltip=["problem", "config", alt.Tooltip("speedup:Q", format=".3f"),
                                  alt.Tooltip("time_us:Q", format=".2f", title="time (µs)"),
                                  alt.Tooltip("baseline_us:Q", format=".2f", title="baseline (µs)")])
                 .properties(height=80 + 12 * len(g)))
        st.altair_chart(chart + _one_x_rule("x"), width="stretch")


def page_strategy(snap: data.Snapshot) -> None:
    st.header("Strategy map")
    st.write("The winning strategy of each tensor-parallel block (tp_mlp / tp_attn: gemm+allreduce vs "
             "allgather-gemm + gemm-reducescatter), of each all-reduce (one-shot vs two-shot) and of each MoE "
             "layer's experts (moe_block: tp = every expert's channels sharded + all-reduce vs ep = experts "
             "placed + all-to-all; `baseline` = torch / NCCL), by token count. Each cell shows the speedup "
             "over the torch baseline.")
    strat = data.strategy_map(snap.winners)
    if strat.empty:
        st.info("No TP-block, all-reduce or MoE-block winners in this database: they are tuned at TP > 1, e.g. "
                "`tuneforge tune --model Qwen3-32B --tp 8` or `tuneforge tune --model Qwen3-30B-A3B --tp 8`.")
        return
    if not strat["op"].isin(data.TP_BLOCK_OPS).any():
        st.caption("No tp_mlp / tp_attn winners yet (only all-reduces or MoE blocks): their templates were not "
                   "tuned.")
    # one colour per strategy on every device's map; the torch baseline in grey
    names = sorted(strat["strategy"].unique())
    palette = iter(STRATEGY_COLOURS * len(names))
    colours = alt.Scale(domain=names, range=[BASELINE_COLOUR if n == "baseline" else next(palette) for n in names])
    for device, g in strat.groupby("device", sort=True):
        how = g["provenance"].iloc[0]
        base = alt.Chart(g, title=alt.TitleParams(f"Chosen strategy: {device}", subtitle=how)).encode(
            x=alt.X("tokens:O", title="tokens (m)", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("block:N", title=None, axis=alt.Axis(labelLimit=320)))
        cells = base.mark_rect(stroke="white").encode(
            color=alt.Color("strategy:N", title="strategy", scale=colours),
            tooltip=["problem", "strategy", "config", alt.Tooltip("speedup:Q", format=".3f"),
                     alt.Tooltip("time_us:Q", format=".2f", title="time (µs)")])
        text = base.mark_text(fontSize=13).encode(text="label:N")
        st.altair_chart((cells + text).properties(height=150 + 50 * g["block"].nunique()), width="stretch")
        table(g[["block", "tokens", "strategy", "speedup", "config", "time_us", "baseline_us"]])


def page_trials(snap: data.Snapshot) -> None:
    st.header("Trials")
    bare = data.without_history(snap)
    if len(bare):
        st.info(f"{len(bare)} of {len(data.unique_problems(snap.winners))} winners carry no Optuna history: "
                "their studies are not in this database (`tuneforge db import` carries winners and plans, not "
                "studies; import into the database that tuned them, or tune here, to see trials).")
    if not snap.studies:
        return
    labels = {fp: e.label for fp, e in snap.environments.items()}
    studies = pd.DataFrame({"name": snap.studies})
    studies["problem"] = studies["name"].str.rpartition("@")[0]
    studies["device"] = studies["name"].map(lambda n: labels.get(data.study_fingerprint(n), "unknown environment"))
    studies["op"] = studies["problem"].str.split("|").str[0]
    c = st.columns([1, 1, 3])
    device = c[0].selectbox("device", sorted(studies["device"].unique()), key="t_device")
    mine = studies[studies["device"] == device]
    op = c[1].selectbox("op", sorted(mine["op"].unique()), key="t_op")
    mine = mine[mine["op"] == op]
    name = c[2].selectbox("study (problem)", list(mine["name"]), key="t_study",
                          format_func=lambda n: n.rpartition("@")[0])
    sd = study(snap.url, name)
    env = snap.environments.get(data.study_fingerprint(name))
    how = data.provenance(env) if env else "environment not in the database"
    st.caption(f"Study `{name}`: trial times {how}.")
    t = sd.trials
    states = t["state"].value_counts()
    m = st.columns(5)
    m[0].metric("trials", len(t))
    m[1].metric("complete", int(states.get("COMPLETE", 0)))
    m[2].metric("rejected (pruned)", int(states.get("PRUNED", 0)))
    m[3].metric("best", f"{t['value_us'].min():.2f} µs" if t["value_us"].notna().any() else "-")
    m[4].metric("torch baseline", f"{sd.baseline_us:.2f} µs" if sd.baseline_us else "-")

    done = t[t["value_us"].notna()]
    points = alt.Chart(done).mark_circle(size=50, opacity=0.7).encode(
        x=alt.X("number:Q", title="trial"), y=alt.Y("value_us:Q", title="time (µs)", scale=alt.Scale(zero=False)),
        tooltip=["number", alt.Tooltip("value_us:Q", format=".3f", title="time (µs)")]
        + [c for c in t.columns if c.startswith("params_")])
    best = alt.Chart(t).mark_line(interpolate="step-after", color="#e45756").encode(x="number:Q", y="best_us:Q")
    layers = [points, best]
    if sd.baseline_us:
        layers.append(alt.Chart(pd.DataFrame({"baseline": [sd.baseline_us]})).mark_rule(strokeDash=[6, 4])
                      .encode(y="baseline:Q"))
    st.altair_chart(alt.layer(*layers).properties(title=alt.TitleParams(
        "Optimization history (dots: trials; red: best so far; dashed: torch baseline)", subtitle=how)),
        width="stretch")

    st.subheader("Parameter importances")
    if sd.importances.empty:
        st.info(sd.importance_note)
    else:
        chart = alt.Chart(sd.importances, title=alt.TitleParams(
            "Parameter importances (Optuna PED-ANOVA over the trials)", subtitle=how)).mark_bar().encode(
            x=alt.X("importance:Q"), y=alt.Y("param:N", sort="-x", title=None),
            tooltip=["param", alt.Tooltip("importance:Q", format=".3f")])
        st.altair_chart(chart, width="stretch")
    with st.expander("All trials"):
        table(t.drop(columns=["value"]))


def page_devices(snap: data.Snapshot) -> None:
    st.header("Devices side by side")
    devs = snap.devices()
    if len(devs) < 2:
        st.info("Only one device in this database. Tune another target to compare, e.g. "
                "`tuneforge tune --model Qwen3-32B --target H800 --tp 8`.")
        return
    order = list(devs["fingerprint"])
    default_a, default_b = data.default_pair(snap)       # the pair with the most problems in common
    label = dict(zip(devs["fingerprint"], devs["device"] + " · " + devs["fingerprint"]))
    c = st.columns(2)
    a = c[0].selectbox("device A", order, index=order.index(default_a), format_func=label.get, key="d_a")
    b = c[1].selectbox("device B", order, index=order.index(default_b), format_func=label.get, key="d_b")
    how = dict(zip(devs["fingerprint"], devs["provenance"]))
    st.caption(f"**A**: {how[a]}  \n**B**: {how[b]}")
    both = data.compare_devices(snap.winners, a, b)
    if both.empty:
        st.info("These two devices have no tuned problem in common (same op, shape, dtype and world size).")
        return
    m = st.columns(3)
    m[0].metric("problems in common", len(both))
    m[1].metric("geomean time ratio B / A", f"{data.geomean(both['time_ratio']):.3f}")
    m[2].metric("geomean baseline ratio B / A", f"{data.geomean(both['baseline_ratio']):.3f}")
    both = both.assign(problem_label=both["op"] + " " + both["shape"] + " m=" + both["tokens"].astype(str))
    chart = (alt.Chart(both, title=alt.TitleParams(
        f"Winner time on B / time on A (B = {label[b]}, A = {label[a]})",
        subtitle=[f"A: {how[a]}", f"B: {how[b]}"]))
        .mark_bar().encode(x=alt.X("problem_label:N", title=None, sort=None,
                                   axis=alt.Axis(labelAngle=-40, labelLimit=260)),
                           y=alt.Y("time_ratio:Q", title="time ratio B / A"), color="op:N",
                           tooltip=["problem", "config_a", "config_b", alt.Tooltip("time_ratio:Q", format=".3f")]))
    st.altair_chart(chart + _one_x_rule("y"), width="stretch")
    table(both.drop(columns=["problem_label"]))


def page_roofline(snap: data.Snapshot) -> None:
    st.header("Roofline")
    st.write("Each winner's time as a percentage of the device's speed of light (the larger of its "
             "compute-bound and memory/link-bound times from the device spec), next to the torch baseline's.")
    roof = data.roofline(snap.winners)
    for device, g in roof.groupby("device", sort=True):
        how = g["provenance"].iloc[0]
        long = pd.concat([g.assign(who="winner", pct=g["pct_sol"]),
                          g.assign(who="torch baseline", pct=g["baseline_pct_sol"])])
        chart = (alt.Chart(long, title=alt.TitleParams(f"% of speed of light: {device}", subtitle=how))
                 .mark_point(size=70, filled=True)
                 .encode(x=alt.X("tokens:Q", title="tokens (m)", scale=alt.Scale(type="log")),
                         y=alt.Y("pct:Q", title="% of speed of light", scale=alt.Scale(domain=[0, 100])),
                         color=alt.Color("op:N", scale=alt.Scale(scheme="tableau10")),
                         shape=alt.Shape("who:N", title=None),
                         tooltip=["problem", "who", "config", alt.Tooltip("pct:Q", format=".1f", title="% SOL")]))
        st.altair_chart(chart, width="stretch")
        table(g[["op", "shape", "tokens", "config", "pct_sol", "baseline_pct_sol", "speedup", "time_us"]])


def page_empty(snap: data.Snapshot) -> None:
    st.header("No tuning results yet")
    st.write(f"The database `{snap.display_url}` holds no tuned problems (or does not exist yet). "
             "Fill it by tuning a model, for example:")
    st.code(f"{data.FILL_COMMAND} --db {snap.display_url}", language="bash")
    st.write("Without a GPU, or for another target, the winners are predicted by the cost model "
             "(e.g. `--target H800 --tp 8`); on a GPU they are measured. Then reload this page.")


def _one_x_rule(axis: str) -> alt.Chart:
    """A dashed line at speedup / ratio 1.0."""
    return alt.Chart(pd.DataFrame({axis: [1.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(
        **{axis: f"{axis}:Q"})


PAGES = {
    "Overview": page_overview,
    "Speedups": page_speedups,
    "Strategy map": page_strategy,
    "Trials": page_trials,
    "Devices side by side": page_devices,
    "Roofline": page_roofline,
}


def main() -> None:
    st.set_page_config(page_title="tuneforge dashboard", layout="wide")
    url = data.database_url()
    st.sidebar.title("tuneforge")
    page = st.sidebar.radio("Page", list(PAGES), key="page", bind="query-params")
    st.sidebar.caption(f"Database: `{data.display_url(url)}`")
    if st.sidebar.button("Reload from the database"):
        st.cache_data.clear()
    try:
        snap = snapshot(url)
    except DatabaseError as e:
        st.header("tuneforge dashboard")
        st.error(f"Cannot read the tuning database: {e}")
        return
    if snap.empty:
        page_empty(snap)
        return
    PAGES[page](snap)


main()
