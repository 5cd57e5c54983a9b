"""The dashboard's queries: the tuning database as pandas frames.

No Streamlit here, so the numbers the pages show can be computed (and tested) without a browser.
The dashboard only reads: it never creates a database or a table. Every frame carries the
``provenance`` of its numbers (measured on which device, or predicted by the cost model for which
target), because every figure must say how it was obtained.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tuneforge.db.environment import Environment
from tuneforge.db.engine import make_engine
from tuneforge.db.store import Store, default_url, display_url, normalize_url
from tuneforge.dsl.problem import Problem
from tuneforge.engine.dispatch import ENGINE_OPS
from tuneforge.errors import DatabaseError, TuneforgeError
from tuneforge.models.configs import ModelConfig, load_config
from tuneforge.tune.plan import SEQUENCE_KV_ROLES, plan, runs_per_forward

FILL_COMMAND = "tuneforge tune --model Qwen3-32B"
TP_BLOCK_OPS = ("tp_mlp", "tp_attn")
STRATEGY_OPS = TP_BLOCK_OPS + ("allreduce", "moe_block")
NO_PLAN = "(no plan)"           # a winner whose problem no recorded plan at its TP degree uses

WINNER_COLUMNS = ["device", "fingerprint", "source", "provenance", "model", "tp", "roles", "op", "shape",
                  "tokens", "dtype", "problem", "strategy", "config", "kernel_won", "time_us", "baseline_us",
                  "speedup", "pct_sol", "baseline_pct_sol", "n_trials", "study_name", "created_at"]


def database_url(url: Optional[str] = None) -> str:
    """The URL the dashboard reads: ``url``, else ``$TUNEFORGE_DB``, else the default SQLite file."""
    return normalize_url(url) if url else default_url()


# ------------------------------------------------------------------------------- provenance

def provenance(env: Environment) -> str:
    """How a number of ``env`` was obtained, in words."""
    if env.predicted:
        return f"predicted by the cost model for {env.gpu_name} x{env.world_size} ({env.interconnect})"
    return (f"measured on {env.gpu_name} x{env.world_size} ({env.interconnect}; torch {env.torch_version}, "
            f"triton {env.triton_version}, driver {env.driver_version})")


def describe_config(config: dict) -> str:
    """A config in one short line: ``baseline``, or the strategy first and then ``name=value``."""
    if config.get("baseline"):
        return "baseline"
    head = [str(config["strategy"])] if "strategy" in config else []
    return " ".join(head + [f"{k}={v}" for k, v in sorted(config.items()) if k != "strategy"])


def strategy_label(config: dict) -> str:
    """What the strategy map shows for a winner: ``baseline`` (torch / NCCL), else its strategy
    followed by any sub-strategy (``gemm_ar + one_shot``: a TP block's own all-reduce)."""
    if config.get("baseline"):
        return "baseline"
    subs = [str(v) for k, v in sorted(config.items()) if k.endswith("_strategy")]
    return " + ".join([str(config.get("strategy", "kernel")), *subs])


def geomean(values) -> float:
    """Geometric mean of positive numbers (NaN for none)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --------------------------------------------------------------------------------- snapshot

@dataclass
class Snapshot:
    """Everything the pages show, read at once. ``empty`` when there is nothing to show yet."""
    url: str
    winners: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=WINNER_COLUMNS))
    environments: dict[str, Environment] = field(default_factory=dict)
    plans: dict[tuple[str, int], list[tuple[Problem, str]]] = field(default_factory=dict)  # (model, tp) -> pairs
    studies: list[str] = field(default_factory=list)

    @property
    def planned(self) -> dict[tuple[str, int], int]:
        """(model, tp) -> how many problems its plan holds."""
        return {mt: len({p.key for p, _ in pairs}) for mt, pairs in self.plans.items()}

    @property
    def display_url(self) -> str:
        return display_url(self.url)

    @property
    def empty(self) -> bool:
        return self.winners.empty

    def devices(self) -> pd.DataFrame:
        """One row per environment that has winners: label, fingerprint, provenance."""
        tuned = set(self.winners["fingerprint"])
        rows = [dict(device=e.label, fingerprint=fp, source="predicted" if e.predicted else "measured",
                     provenance=provenance(e)) for fp, e in self.environments.items() if fp in tuned]
        return pd.DataFrame(rows, columns=["device", "fingerprint", "source", "provenance"])


def _sqlite_path(url: str) -> Optional[str]:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def _holds_no_tables(url: str) -> bool:
    """True for a database that opens and has no tables at all (not yet filled). The engine comes
    from the store, so a server's connect timeout is the store's."""
    try:
        engine = make_engine(url, create=False)
    except DatabaseError:
        return False
    try:
        return not sa.inspect(engine).get_table_names()
    except sa.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def open_store(url: str) -> Optional[Store]:
    """The store at ``url`` read-only, or None where there is no tuning database yet (a missing or
    empty SQLite file, a database without tables); a corrupt or foreign database raises the
    store's one-line DatabaseError."""
    path = _sqlite_path(url)
    if path is not None and (not os.path.exists(path) or (os.path.isfile(path) and os.path.getsize(path) == 0)):
        return None
    try:
        return Store(url, create=False)
    except DatabaseError:
        if _holds_no_tables(url):
            return None
        raise


def load_snapshot(url: str) -> Snapshot:
    """Read the winners, environments, plans and study names of the database at ``url``."""
    store = open_store(url)
    if store is None:
        return Snapshot(url)
    try:
        try:
            frame = store.to_frame()
            environments = {e.fingerprint: e for e in store.environments()}
            plans = {(model, tp): store.plan(model, tp) for model, tp in store.models()}
            studies = _study_names(store)
        except sa.exc.SQLAlchemyError as e:
            raise DatabaseError(f"cannot read {display_url(url)}: {_first_line(e)}") from None
    finally:
        store.close()
    return Snapshot(url, winners_frame(frame, environments), environments, plans, studies)


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def _study_names(store: Store) -> list[str]:
    import optuna
    with store.engine.connect() as conn:
        if "studies" not in sa.inspect(conn).get_table_names():
            return []
    return sorted(optuna.get_all_study_names(store.optuna_storage()))


def _shape_text(dims) -> str:
    """The problem's dims other than the token dim: ``n=1024,k=3072``."""
    return ",".join(f"{k}={v}" for k, v in dims if k != "m")


def winners_frame(export: pd.DataFrame, environments: dict[str, Environment]) -> pd.DataFrame:
    """One row per (winner, model planned at the winner's TP degree) from ``Store.to_frame()``.

    A winner's environment has the world size it was tuned at; the model plans at that TP degree
    that hold its problem give its model and roles (a problem shared by two models counts for both).
    """
    rows = []
    for r in export.to_dict(orient="records"):
        env = environments[r["fingerprint"]]
        config = dict(r["config"])
        plans: dict[tuple[str, int], list[str]] = {}
        for model, tp, role in r["models"]:
            if int(tp) == env.world_size:
                plans.setdefault((model, int(tp)), []).append(role)
        tokens = dict((k, v) for k, v in r["dims"]).get("m")
        common = dict(
            device=env.label, fingerprint=env.fingerprint, source=r["source"], provenance=provenance(env),
            op=r["op"], shape=_shape_text(r["dims"]), tokens=tokens, dtype=r["dtype"], problem=r["problem_key"],
            strategy=strategy_label(config), config=describe_config(config), kernel_won=not config.get("baseline"),
            time_us=r["time_s"] * 1e6, baseline_us=r["baseline_s"] * 1e6, speedup=r["speedup"],
            pct_sol=r["pct_sol"],
            # the work is the same for both, so % of light scales with the inverse time
            baseline_pct_sol=r["pct_sol"] * r["time_s"] / r["baseline_s"],
            n_trials=r["n_trials"], study_name=r["study_name"], created_at=r["created_at"])
        for (model, tp), roles in (plans.items() or [((NO_PLAN, env.world_size), [])]):
            rows.append(dict(common, model=model, tp=tp, roles=", ".join(roles)))
    df = pd.DataFrame(rows, columns=WINNER_COLUMNS)
    df["tokens"] = df["tokens"].astype("Int64")
    return df.sort_values(["device", "model", "tp", "op", "shape", "tokens"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------- pages

def untuned_ops(planned: Iterable[Problem], tuned_keys: set[str]) -> str:
    """The ops of the planned problems without a winner, with counts: ``decode_attention x4, gemm x1``."""
    missing: dict[str, int] = {}
    for p in {p.key: p for p in planned if p.key not in tuned_keys}.values():
        missing[p.op] = missing.get(p.op, 0) + 1
    return ", ".join(f"{op} x{n}" for op, n in sorted(missing.items()))


def overview(snap: Snapshot) -> pd.DataFrame:
    """Per environment and model: problems tuned (of those planned) and the ops of the planned ones
    without a winner, kernel wins, geometric-mean and best speedup over the torch baseline, and how
    the numbers were obtained."""
    rows = []
    for (fp, model, tp), g in snap.winners.groupby(["fingerprint", "model", "tp"], sort=False):
        first = g.iloc[0]
        pairs = snap.plans.get((model, int(tp)), [])
        rows.append(dict(device=first["device"], source=first["source"], model=model, tp=int(tp),
                         tuned=int(g["problem"].nunique()), planned=snap.planned.get((model, int(tp))),
                         untuned=untuned_ops((p for p, _ in pairs), set(g["problem"])),
                         kernel_wins=int(g["kernel_won"].sum()), geomean_speedup=geomean(g["speedup"]),
                         best_speedup=float(g["speedup"].max()), median_pct_sol=float(g["pct_sol"].median()),
                         fingerprint=fp, provenance=first["provenance"]))
    cols = ["device", "source", "model", "tp", "tuned", "planned", "untuned", "kernel_wins", "geomean_speedup",
            "best_speedup", "median_pct_sol", "fingerprint", "provenance"]
    out = pd.DataFrame(rows, columns=cols)
    out["planned"] = out["planned"].astype("Int64")
    return out


# At TP > 1 the engine runs a TP block won by a kernel in place of these roles' problems
# (kernels/tp_attn: qkv_half -> attention core -> o_half; kernels/tp_mlp: gate_up -> silu_mul -> down),
# each block with its own all-reduce; otherwise the parts, with torch's all-reduce. A sparse layer's
# moe_block won by a kernel runs in place of the pack, the expert GEMMs and the all-reduce: ep (the experts
# placed, engine/ep; the engine picks the layout once, at the decode bucket, and a forward is counted as
# its own winner would run) or tp (but with a shared expert, whose partial sums ride the all-reduce).
BLOCK_PARTS = {"layer.attn.tp": ("layer.attn.qkv_proj", "layer.attn.o_proj", "layer.attn.allreduce"),
               "layer.mlp.tp": ("layer.mlp.gate_up_proj", "layer.mlp.silu_mul", "layer.mlp.down_proj",
                                "layer.mlp.allreduce"),
               "layer.moe.block": ("layer.moe.pack", "layer.moe.experts.gate_up", "layer.moe.experts.down",
                                   "layer.moe.allreduce")}
MODEL_TIME_COLUMNS = ["device", "fingerprint", "source", "provenance", "model", "tp", "phase", "tokens", "ctx",
                      "time_ms", "baseline_ms", "speedup", "tuned", "problems", "layers"]


def forwards(model: ModelConfig, tp: int, pairs: Sequence[tuple[Problem, str]]
             ) -> list[tuple[str, int, Optional[int], list]]:
    """The forwards the stored plan of ``model`` at TP ``tp`` covers: (phase, tokens, KV context or
    None, the (problem, role) pairs one forward of that many tokens runs). Decode buckets are those
    the plan computes logits for; each decode step at each planned KV context. The problems of a
    forward come from tuneforge.tune.plan (so the shapes are never derived here)."""
    decode = sorted({p.shape["m"] for p, role in pairs if role == "lm_head"})
    prefill = sorted({p.shape["m"] for p, role in pairs if role == "final_norm"} - set(decode))
    contexts = sorted({p.shape["ctx"] for p, _ in pairs if p.op == "decode_attention"})
    dtype = pairs[0][0].dtype
    out = []
    for phase, buckets in (("decode", decode), ("prefill", prefill)):
        for m in buckets:
            one = plan(model, tp, [m] if phase == "decode" else [], [m] if phase == "prefill" else [], dtype,
                       contexts=contexts, registered={})
            items = [(i.problem, r) for i in one for r in i.roles]
            # KV split by heads (the default); the GEMM fusions not credited (they stand beside the ops
            # they replace: counting both would count those ops twice)
            for ctx in (contexts or [None]) if phase == "decode" else [None]:
                out.append((phase, m, ctx, [(p, r) for p, r in items
                                            if r not in SEQUENCE_KV_ROLES and p.op != "gemm_fused"
                                            and (p.op != "decode_attention" or p.shape["ctx"] == ctx)]))
    return out


def forward_time(model: ModelConfig, pairs: Sequence[tuple[Problem, str]],
                 won: dict[str, tuple[float, float, bool]]) -> tuple[float, float, int, int]:
    """One forward's time with the winners ``won`` (problem key -> time, baseline time, whether a block
    winner runs in place of its parts: BLOCK_PARTS) as the engine dispatches them, and with the torch
    baseline: each problem's time times the number of times its role runs
    (tuneforge.tune.plan.runs_per_forward). Ops the engine does not dispatch (the stand-alone
    all-reduce, ...) count at their torch time.
    Returns (tuned s, baseline s, problems with a winner, problems); the sums cover the former."""
    blocks = {r for p, r in pairs if r in BLOCK_PARTS and won.get(p.key, (0, 0, False))[2]}
    skip = {part for b in blocks for part in BLOCK_PARTS[b]} | (set(BLOCK_PARTS) - blocks)
    tuned = baseline = 0.0
    counted, problems = set(), set()
    for p, role in pairs:
        if role in skip:
            continue
        problems.add(p.key)
        if p.key not in won:
            continue
        counted.add(p.key)
        time_s, baseline_s, _ = won[p.key]
        n = runs_per_forward(model, role)
        tuned += n * (time_s if p.op in ENGINE_OPS else baseline_s)
        baseline += n * baseline_s
    return tuned, baseline, len(counted), len(problems)


def model_times(snap: Snapshot) -> pd.DataFrame:
    """Per environment, model and forward (decode step per token bucket and KV context, prefill per
    token bucket): the model's time with its winners vs with the torch baseline, summed over its
    layers (see forward_time), measured or predicted as the environment's winners are. A model whose
    config is not known here (a local config.json tuned elsewhere) has no rows."""
    rows = []
    for (fp, model, tp), g in snap.winners.groupby(["fingerprint", "model", "tp"], sort=False):
        pairs = snap.plans.get((model, int(tp)))
        if not pairs:
            continue
        try:
            cfg = load_config(model)
            runs = forwards(cfg, int(tp), pairs)
        except TuneforgeError:      # not a built-in model, or its config no longer plans at this TP
            continue
        first = g.iloc[0]
        won = {r.problem: (r.time_us * 1e-6, r.baseline_us * 1e-6, bool(r.kernel_won) and (
                   r.op != "moe_block" or r.strategy.startswith("ep") or not cfg.has_shared_expert))
               for r in unique_problems(g).itertuples(index=False)}
        for phase, m, ctx, items in runs:
            tuned, baseline, n_tuned, n_problems = forward_time(cfg, items, won)
            rows.append(dict(device=first["device"], fingerprint=fp, source=first["source"],
                             provenance=first["provenance"], model=model, tp=int(tp), phase=phase, tokens=m,
                             ctx=ctx, time_ms=tuned * 1e3, baseline_ms=baseline * 1e3,
                             speedup=baseline / tuned if tuned else float("nan"), tuned=n_tuned,
                             problems=n_problems, layers=cfg.num_hidden_layers))
    out = pd.DataFrame(rows, columns=MODEL_TIME_COLUMNS)
    out["ctx"] = out["ctx"].astype("Int64")
    return out


def headline_forwards(times: pd.DataFrame) -> pd.DataFrame:
    """The forwards the Overview's cards show for one environment and model: the decode step at the
    smallest and largest token bucket (at the longest KV context) and prefill at its smallest and
    largest bucket."""
    picks = []
    for phase, g in times.groupby("phase", sort=False):
        if phase == "decode":
            g = g[g["ctx"].isna() | (g["ctx"] == g["ctx"].max())]
        picks.extend(sorted({g.index[g["tokens"].argmin()], g.index[g["tokens"].argmax()]}))
    return times.loc[picks]


def filter_winners(df: pd.DataFrame, **choices) -> pd.DataFrame:
    """The rows whose column value is in each given list (``device=[...]``, ``op=[...]``, ...);
    an empty or missing list keeps everything."""
    mask = pd.Series(True, index=df.index)
    for column, wanted in choices.items():
        if wanted:
            mask &= df[column].isin(list(wanted))
    return df[mask]


def unique_problems(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (environment, problem): a problem two models share is one winner."""
    return df.drop_duplicates(["fingerprint", "problem"])


def strategy_map(df: pd.DataFrame) -> pd.DataFrame:
    """The chosen strategy of every TP block, all-reduce and MoE block (experts tp-sharded + all-reduce or
    ep-placed + all-to-all) by token count, per environment."""
    rows = unique_problems(df[df["op"].isin(STRATEGY_OPS)]).copy()
    rows["block"] = rows["op"] + " " + rows["shape"]
    rows["label"] = rows["speedup"].map(lambda s: f"{s:.2f}x")
    return rows[["device", "fingerprint", "provenance", "op", "block", "tokens", "strategy", "config", "speedup",
                 "label", "time_us", "baseline_us", "problem"]].reset_index(drop=True)


def default_pair(snap: Snapshot) -> tuple[str, str]:
    """The two environments (A, B) that share the most tuned problems; of equal pairs one measured
    against one predicted first, then the first in label order. A is the measured one of a mixed pair."""
    devs = snap.devices()
    keys = {fp: set(g["problem"]) for fp, g in snap.winners.groupby("fingerprint")}
    source = dict(zip(devs["fingerprint"], devs["source"]))
    best = max(itertools.combinations(devs["fingerprint"], 2),
               key=lambda ab: (len(keys[ab[0]] & keys[ab[1]]), source[ab[0]] != source[ab[1]]))
    return tuple(sorted(best, key=lambda fp: source[fp] != "measured"))


def without_history(snap: Snapshot) -> pd.DataFrame:
    """The winners whose Optuna study is not in the database (imported with `tuneforge db import`,
    which carries winners, not their studies), one row per environment and problem."""
    rows = unique_problems(snap.winners)
    return rows[~rows["study_name"].isin(set(snap.studies))]


def compare_devices(df: pd.DataFrame, fingerprint_a: str, fingerprint_b: str) -> pd.DataFrame:
    """The problems both environments tuned, with both times and ``time_ratio`` = time on B / time on A."""
    cols = ["problem", "op", "shape", "tokens", "time_us", "baseline_us", "speedup", "strategy", "config"]
    a = unique_problems(df[df["fingerprint"] == fingerprint_a])[cols]
    b = unique_problems(df[df["fingerprint"] == fingerprint_b])[cols]
    both = a.merge(b, on=["problem", "op", "shape", "tokens"], suffixes=("_a", "_b"))
    both["time_ratio"] = both["time_us_b"] / both["time_us_a"]
    both["baseline_ratio"] = both["baseline_us_b"] / both["baseline_us_a"]
    return both.sort_values(["op", "shape", "tokens"], kind="stable").reset_index(drop=True)


def roofline(df: pd.DataFrame) -> pd.DataFrame:
    """Each winner's (and its baseline's) % of the device's speed of light."""
    rows = unique_problems(df)
    return rows[["device", "fingerprint", "provenance", "op", "shape", "tokens", "problem", "config", "pct_sol",
                 "baseline_pct_sol", "time_us", "speedup"]].sort_values(
        ["device", "op", "shape", "tokens"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------- trials

def study_fingerprint(study_name: str) -> str:
    """Studies are named ``<problem key>@<fingerprint>`` (Store.study_name)."""
    return study_name.rpartition("@")[2]


@dataclass
class StudyData:
    name: str
    trials: pd.DataFrame          # number, state, value_us, best_us (running best), params_*, user_attrs_*
    baseline_us: Optional[float]
    importances: pd.DataFrame     # param, importance (empty when they cannot be computed)
    importance_note: str          # why importances are missing, else ""


def load_study(url: str, study_name: str) -> StudyData:
    """A study's trial history and parameter importances, read from the tuning database."""
    import optuna
    store = open_store(url)
    if store is None:
        raise DatabaseError(f"no tuning database at {display_url(url)}")
    try:
        try:
            study = optuna.load_study(study_name=study_name, storage=store.optuna_storage())
        except KeyError:
            raise DatabaseError(f"no study named {study_name!r} in {display_url(url)}") from None
        trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
        baseline_s = study.user_attrs.get("baseline_s")
        importances, note = _importances(study)
    finally:
        store.close()
    if trials.empty:
        trials = pd.DataFrame(columns=["number", "value", "state"])
    trials["value_us"] = trials["value"].astype(float) * 1e6
    complete = trials["state"] == "COMPLETE"
    trials["best_us"] = trials["value_us"].where(complete).cummin().ffill()
    return StudyData(study_name, trials, baseline_s * 1e6 if baseline_s else None, importances, note)


def _importances(study) -> tuple[pd.DataFrame, str]:
    import optuna
    from optuna.trial import TrialState
    cols = ["param", "importance"]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return pd.DataFrame(columns=cols), f"{len(complete)} complete trial(s): importances need at least 2"
    try:
        # Optuna's default evaluator (PED-ANOVA): deterministic, and needs no scikit-learn
        values = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:
        return pd.DataFrame(columns=cols), f"importances unavailable: {_first_line(e)}"
    if not values:
        return pd.DataFrame(columns=cols), "no parameter varied across the complete trials"
    return pd.DataFrame(list(values.items()), columns=cols), ""
