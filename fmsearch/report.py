"""Figures, summary.md and trials.csv for a study, drawn from the Optuna storage alone (no retraining).

Writes results/<study>/{curves,fraction,search,importance,classes,confusion}.png, summary.md and
trials.csv, each atomically, uploads each PNG as a study artifact once per content and saves
summary.md as each condition's dashboard note. What a condition is (its label budget, its unlabeled
objective) is read from the settings its study stored, never from its name; what was searched is
read from its trials' distributions, so the report follows any study file.
"""

from __future__ import annotations

import io
import math
import shlex
import statistics
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from optuna.distributions import CategoricalDistribution, IntDistribution  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from fmsearch.config import UNLABELED, TrainConfig, train_flags  # noqa: E402
from fmsearch.errors import ConfigError, FmsearchError  # noqa: E402
from fmsearch.files import write_atomic  # noqa: E402
from fmsearch.params import flag, parameters  # noqa: E402
from fmsearch.spec import condition_label, is_semi  # noqa: E402
from fmsearch.storage import (  # noqa: E402
    DIVERGED,
    Attr,
    BestTrialScore,
    Gate,
    best_trial,
    confirm_name,
    confirmation_reruns,
    is_finished,
    study_name_parts,
    study_setting,
    unselected,
)

DPI = 160
FIGURES = ("curves.png", "fraction.png", "search.png", "importance.png", "classes.png", "confusion.png")
CURVE_PANELS = (
    ("train_loss", "Train loss", "cross-entropy (nats)"),
    ("val_loss", "Validation loss", "cross-entropy (nats)"),
    ("train_accuracy", "Train accuracy", "accuracy (fraction)"),
    ("val_accuracy", "Validation accuracy", "accuracy (fraction)"),
)
FULL_LABELS = "full labels"  # the arm of a condition that hides no label
LABELS_ONLY = "skip"  # the objective that ignores unlabeled images: the low-budget baseline
BUDGET_KEYS = ("labeled_fraction", "labeled_count")
ARM_ORDER = {FULL_LABELS: -1, **{name: rank for rank, name in enumerate(UNLABELED)}}
# Where several conditions share an objective, each gets a shade of its objective's colour map.
ARM_COLOURS = {
    FULL_LABELS: "Greys",
    "skip": "Oranges",
    "pseudo": "Greens",
    "distill": "Blues",
    "vat": "Purples",
}
LABELS_ONLY_COLOUR, OBJECTIVE_COLOUR = "tab:orange", "tab:blue"  # fraction.png and classes.png
EDGE_SHARE = 0.05  # a best value within this share of its (log) range from an end is at the edge
VALIDATION = "validation accuracy (fraction)"
TEST_ACCURACY = "test accuracy (fraction)"


class ReportError(FmsearchError):
    """Nothing to report (no such study, no finished trial); the message says what to run."""


@dataclass(frozen=True)
class Score:
    """A condition's test accuracy: over the confirmation reruns of its best trial, else the best
    trial's own single run. Accuracies and recalls are fractions."""

    accuracies: tuple[float, ...]  # one per run
    recall: tuple[float, ...]  # per class, the mean over the runs
    classes: tuple[str, ...]
    trial: int  # the search trial they score
    confirmed: bool  # True: reruns on new seeds; False: the best trial itself, once

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return statistics.mean(self.accuracies)

    @property
    def sd(self) -> float:
        """The sample standard deviation over the runs; NaN with a single run."""
        return statistics.stdev(self.accuracies) if self.n > 1 else math.nan

    def text(self) -> str:
        """'0.8123 ± 0.0021 (n=3)', or '0.8123 (trial #7, a single run)'."""
        if self.n > 1:
            return f"{self.mean:.4f} ± {self.sd:.4f} (n={self.n})"
        if self.confirmed:
            return f"{self.mean:.4f} (trial #{self.trial} on one new seed, a single run)"
        return f"{self.mean:.4f} (trial #{self.trial}, a single run)"


@dataclass(frozen=True, eq=False)  # one condition is one study: compared and hashed by identity
class Condition:
    """One condition's study as the report sees it."""

    study: optuna.Study
    label: str  # "labels=10%,unlabeled=distill" from its condition keys, else the study name
    setting: dict[str, Any]  # its fixed values and its condition together
    trials: list[FrozenTrial]
    finished: list[FrozenTrial]
    reruns: list[FrozenTrial]  # every trial of its confirmation study, of any source trial
    test: BestTrialScore | None = None  # the best trial's own test score, else None
    stale_test: BestTrialScore | None = None  # a stored score of another trial: never shown as this one's
    score: Score | None = None
    colour: Any = None

    @property
    def best(self) -> FrozenTrial | None:
        return best_trial(self.trials)

    @property
    def is_full(self) -> bool:
        return not is_semi(self.setting)

    @property
    def budget(self) -> str:
        """'full labels', 'labels=10%' or 'labels=500'."""
        if self.is_full:
            return FULL_LABELS
        if self.setting.get("labeled_count") is not None:
            return condition_label("labeled_count", self.setting["labeled_count"])
        return condition_label("labeled_fraction", self.setting["labeled_fraction"])

    @property
    def labeled_images(self) -> int | None:
        """The labeled images its trials trained on, as they recorded it; None before any did."""
        for trial in [self.best, *self.finished]:
            if trial is not None and trial.user_attrs.get(Attr.LABELED_IMAGES) is not None:
                return trial.user_attrs[Attr.LABELED_IMAGES]
        return None

    @property
    def arm(self) -> str:
        """'full labels', or the unlabeled objective: the condition's own, else its best trial's."""
        if self.is_full:
            return FULL_LABELS
        if "unlabeled" in self.setting:
            return self.setting["unlabeled"]
        if "unlabeled" not in study_setting(self.study, "space", {}):
            return parameters(TrainConfig)["unlabeled"].default
        best = self.best
        return best.user_attrs.get(Attr.CONFIG, {}).get("unlabeled", "?") if best else "?"

    @property
    def series(self) -> str:
        """The condition keys other than the label budget and the objective, e.g. 'arch=plain'."""
        keys = (*BUDGET_KEYS, "unlabeled")
        condition = study_setting(self.study, Attr.CONDITION, {})
        return ",".join(condition_label(k, v) for k, v in condition.items() if k not in keys)


def _named(c: Condition) -> str:
    """Its label, with its objective where the label leaves it out (it was searched, or fixed)."""
    if c.is_full or "unlabeled" in study_setting(c.study, Attr.CONDITION, {}):
        return c.label
    return f"{c.label} ({c.arm})"


def _order(c: Condition) -> tuple:
    """Full labels first, then the larger label budget, then the objective (skip first). The budget
    is the condition's own setting: its image count is known only once a trial has run."""
    count = c.setting.get("labeled_count")
    fraction = c.setting.get("labeled_fraction", 1.0) if count is None else 0.0
    arm = ARM_ORDER.get(c.arm, len(UNLABELED))
    return (not c.is_full, -fraction, -(count or 0), -(c.labeled_images or 0), arm, c.series, c.label)


def load_conditions(storage, name: str) -> list[Condition]:
    """Every study of spec `name` (`name` itself or `name/...`), full labels first."""
    names = optuna.get_all_study_names(storage=storage)
    mine = [n for n in names if n == name or n.startswith(f"{name}/")]
    if not mine:
        raise ReportError(f"no study named {name!r} in the storage: run `make study STUDY={name}` first")
    conditions = []
    for study_name in mine:
        study = optuna.load_study(study_name=study_name, storage=storage)
        condition = study_setting(study, Attr.CONDITION, {})
        setting = {**study_setting(study, Attr.FIXED, {}), **condition}
        trials = study.get_trials(deepcopy=False)
        score, best = BestTrialScore.of(study), best_trial(trials)
        current = score is not None and best is not None and score.trial == best.number
        reruns = []
        if confirm_name(study_name) in names:
            confirming = optuna.load_study(study_name=confirm_name(study_name), storage=storage)
            reruns = confirming.get_trials(deepcopy=False)
        conditions.append(
            Condition(
                study=study,
                label=",".join(condition_label(k, v) for k, v in condition.items()) or study_name,
                setting=setting,
                trials=trials,
                finished=[t for t in trials if is_finished(t)],
                reruns=reruns,
                test=score if current else None,
                stale_test=None if current else score,
            )
        )
    classes = next((c.test.classes for c in conditions if c.test), None)
    conditions = [replace(c, score=_score(c, classes)) for c in conditions]
    conditions.sort(key=_order)
    return [replace(c, colour=colour) for c, colour in zip(conditions, _palette(conditions), strict=True)]


def _palette(conditions: list[Condition]) -> list:
    """A colour per condition: where some objective has several conditions (budgets), a shade of the
    objective's colour per condition, darker for fewer labels; else the colour-blind palette."""
    arms = [c.arm for c in conditions]
    if 1 < len(set(arms)) < len(arms):
        shades = {}
        for arm in dict.fromkeys(arms):
            cmap = matplotlib.colormaps[ARM_COLOURS.get(arm, "Greys")]
            count = arms.count(arm)
            shades[arm] = iter(cmap(np.linspace(0.45, 0.95, count) if count > 1 else [0.75]))
        return [next(shades[arm]) for arm in arms]
    return sns.color_palette("colorblind" if len(conditions) <= 10 else "husl", len(conditions))


def _score(c: Condition, classes: list[str] | None) -> Score | None:
    best = c.best
    if best is None:
        return None
    reruns = list(confirmation_reruns(c.study, best.number).values()) if c.reruns else []
    own = None
    if c.test is not None:
        matrix = np.array(c.test.confusion, dtype=float)
        own = (c.test.test_accuracy, np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1))
    if reruns:
        runs = [
            (t.user_attrs[Attr.TEST]["test_accuracy"], t.user_attrs[Attr.TEST]["test_recall"]) for t in reruns
        ]
        if own is not None and unselected(best):  # searched nothing: the trial is a seed too (confirm.py)
            runs.insert(0, own)
        recall = np.mean([r for _, r in runs], axis=0)
        names = classes or [f"class {i}" for i in range(len(recall))]
        return Score(tuple(a for a, _ in runs), tuple(recall), tuple(names), best.number, True)
    if own is None:
        return None
    return Score((own[0],), tuple(own[1]), tuple(c.test.classes), best.number, False)


@dataclass(frozen=True)
class Budget:
    """One label budget of one series: its labels-only condition and its best objective, beside the
    series' full-labels condition. Each is the scored condition of best validation accuracy, or None."""

    series: str
    label: str  # "labels=10%"
    labeled_images: int | None
    labeled_fraction: float | None  # None for a labeled_count budget
    full: Condition | None
    labels_only: Condition | None
    objective: Condition | None


def _best_scored(conditions: list[Condition]) -> Condition | None:
    """The one a reader is told about: picked by validation accuracy, the search's own criterion."""
    scored = [c for c in conditions if c.score is not None]
    return max(scored, key=lambda c: c.best.value) if scored else None


def budgets(conditions: list[Condition]) -> list[Budget]:
    """Each hidden-label budget of each series, largest budget first."""
    found = []
    for series in dict.fromkeys(c.series for c in conditions):
        mine = [c for c in conditions if c.series == series]
        full = _best_scored([c for c in mine if c.is_full])
        for label in dict.fromkeys(c.budget for c in mine if not c.is_full):
            here = [c for c in mine if c.budget == label]
            count = here[0].setting.get("labeled_count")
            found.append(
                Budget(
                    series=series,
                    label=label,
                    labeled_images=next((c.labeled_images for c in here if c.labeled_images), None),
                    labeled_fraction=None if count is not None else here[0].setting["labeled_fraction"],
                    full=full,
                    labels_only=_best_scored([c for c in here if c.arm == LABELS_ONLY]),
                    objective=_best_scored([c for c in here if c.arm not in (LABELS_ONLY, "?")]),
                )
            )
    return found


def _history_frame(conditions: list[Condition]) -> pd.DataFrame:
    rows = []
    for c in conditions:
        best = c.best
        for t in c.finished:
            for h in t.user_attrs.get(Attr.HISTORY, []):
                config = t.user_attrs.get(Attr.CONFIG, {})
                rows.append(
                    {
                        **h,
                        "condition": c.label,
                        "trial": t.number,
                        "best": best is not None and t.number == best.number,
                        "seed": config.get("seed", 0),
                        "config_key": repr(sorted((k, v) for k, v in config.items() if k != "seed")),
                    }
                )
    return pd.DataFrame(rows)


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        write_atomic(path, lambda partial: fig.savefig(partial, format="png", dpi=DPI, bbox_inches="tight"))
    except OSError as error:
        raise ReportError(
            f"cannot write {path} ({error.strerror}): free disk space or fix its permissions, then rerun "
            "`fmsearch report`; the storage is untouched"
        ) from None
    finally:
        plt.close(fig)
    return path


def _grid(
    panels: int, ncols: int, width: float, height: float, share: bool = False
) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure of `panels` axes in rows of at most `ncols`; the spare cells are hidden."""
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width * ncols, height * nrows),
        constrained_layout=True,
        squeeze=False,
        sharex=share,
        sharey=share,
    )
    for spare in axes.flat[panels:]:
        spare.set_visible(False)
    return fig, list(axes.flat[:panels])


def _condition_legend(fig: plt.Figure, conditions: list[Condition], extra: list | None = None) -> None:
    """One legend under the figure: a colour per condition, then what the marker shapes mean."""
    handles = [
        matplotlib.lines.Line2D([], [], marker="o", color=c.colour, linestyle="", label=c.label)
        for c in conditions
    ]
    handles += extra or []
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)


def plot_curves(conditions: list[Condition], out: Path) -> Path:
    """The 2x2 grid of train/validation loss and accuracy: each condition's best trial bold."""
    frame = _history_frame(conditions)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, constrained_layout=True)
    for ax, (metric, title, unit) in zip(axes.flat, CURVE_PANELS, strict=True):
        for c in conditions:
            mine = frame[frame.condition == c.label]
            for _, trial in mine[~mine.best].groupby("trial"):
                ax.plot(trial.epoch, trial[metric], color=c.colour, alpha=0.18, linewidth=0.9)
            best = mine[mine.best]
            if best.empty:
                continue
            repeats = mine[mine.config_key == best.config_key.iloc[0]]
            if repeats.seed.nunique() > 1:  # the best config rerun with several seeds: mean and band
                sns.lineplot(
                    data=repeats,
                    x="epoch",
                    y=metric,
                    errorbar="sd",
                    color=c.colour,
                    ax=ax,
                    linewidth=2.4,
                    label=f"{c.label} (best, {repeats.seed.nunique()} seeds)",
                )
            else:
                ax.plot(
                    best.epoch,
                    best[metric],
                    color=c.colour,
                    linewidth=2.4,
                    label=f"{c.label} (best trial #{best.trial.iloc[0]})",
                )
        _frame_the_bold(ax, frame, metric, lower_is_better=metric.endswith("loss"))
        ax.set_title(title)
        ax.set_xlabel("epoch" if ax in axes[1] else "")  # the shared axis is labeled under the bottom row
        ax.set_ylabel(unit)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
    fig.suptitle("Learning curves: best trial per condition (bold), other finished trials (faint)")
    return _save(fig, out / "curves.png")


@dataclass(frozen=True)
class Dimension:
    """One searched dimension, as the trials' distributions give it (ranges joined over conditions)."""

    name: str
    numeric: bool  # a Float or Int range; False: a list of choices
    low: float | None
    high: float | None
    log: bool
    integer: bool  # an Int range
    conditions: tuple[str, ...]  # the labels of the conditions that searched it


def searched_dimensions(conditions: list[Condition]) -> list[Dimension]:
    """Every dimension any trial was suggested, in TrainConfig's field order."""
    found: dict[str, list] = {}
    where: dict[str, list[str]] = {}
    for c in conditions:
        for t in c.trials:
            for name, distribution in t.distributions.items():
                found.setdefault(name, []).append(distribution)
                if c.label not in where.setdefault(name, []):
                    where[name].append(c.label)
    order = list(parameters(TrainConfig))
    dimensions = []
    for name in sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n)):
        ranges = found[name]
        numeric = not any(isinstance(d, CategoricalDistribution) for d in ranges)
        dimensions.append(
            Dimension(
                name=name,
                numeric=numeric,
                low=min(d.low for d in ranges) if numeric else None,
                high=max(d.high for d in ranges) if numeric else None,
                log=numeric and any(d.log for d in ranges),
                integer=all(isinstance(d, IntDistribution) for d in ranges),
                conditions=tuple(where[name]),
            )
        )
    return dimensions


def _value_frame(conditions: list[Condition]) -> pd.DataFrame:
    """One row per finished trial that has a value: its condition, state, value and parameters."""
    rows = []
    for c in conditions:
        best = c.best
        for t in c.finished:
            if t.value is None:  # diverged: no value to place
                continue
            rows.append(
                {
                    "condition": c.label,
                    "trial": t.number,
                    "state": t.state.name.lower(),
                    "value": t.value,
                    "best": best is not None and t.number == best.number,
                    **{f"param:{name}": value for name, value in t.params.items()},
                }
            )
    return (
        pd.DataFrame(rows) if rows else pd.DataFrame(columns=["condition", "trial", "state", "value", "best"])
    )


# A trial under twice chance (Fashion-MNIST has ten classes) learned next to nothing. The search's
# panels mark it on their lower edge rather than stretch down to it, which would squeeze every other
# trial into their top tenth.
DEAD_ACCURACY = 2 / 10


def draw_search(conditions: list[Condition]) -> plt.Figure:
    """The optimization history, then one panel per searched dimension, titled by its name."""
    frame = _value_frame(conditions)
    dimensions = searched_dimensions(conditions)
    fig, axes = _grid(1 + len(dimensions), ncols=3, width=5.4, height=4.3)
    dead = frame[frame.value <= DEAD_ACCURACY]
    alive = frame[frame.value > DEAD_ACCURACY]
    if alive.empty:  # every trial dead: their scale is the only one there is
        alive, dead = frame, frame.iloc[0:0]
    _history_panel(axes[0], alive, conditions)
    done = alive[alive.state == "complete"]
    edges = {c.label: edge_warnings(c) for c in conditions}
    for ax, dimension in zip(axes[1:], dimensions, strict=True):
        at_edge = [c for c, notes in edges.items() for note in notes if note.name == dimension.name]
        if dimension.numeric:
            _numeric_panel(ax, done, dimension, conditions)
        else:
            _choice_panel(ax, done, dimension, conditions)
        if at_edge:  # the title turns red and names where
            where = ", ".join(at_edge)
            where = where if len(where) <= 40 else f"{len(at_edge)} conditions (see summary.md)"
            ax.set_title(f"{dimension.name}\nbest at the edge of its range in {where}", color="firebrick")
    extra = [
        matplotlib.lines.Line2D(
            [], [], marker="*", color="0.3", markersize=12, linestyle="", label="best trial"
        ),
        matplotlib.lines.Line2D([], [], marker="x", color="0.3", linestyle="", label="pruned (last value)"),
        matplotlib.lines.Line2D([], [], color="0.3", linestyle=":", label="ends of the searched range"),
    ]
    if not dead.empty and not alive.empty:
        _mark_dead(axes, dead, dimensions, conditions)
        extra.append(
            matplotlib.lines.Line2D(
                [], [], marker="v", color="0.3", linestyle="", label="under the scale: at most twice chance"
            )
        )
    _condition_legend(fig, conditions, extra)
    warned = "\n(a red title: a best value sits at the edge of its range; summary.md says where)"
    fig.suptitle(
        "What the search found: validation accuracy of complete trials against each searched dimension"
        + (warned if any(edges.values()) else "")
    )
    return fig


def _mark_dead(
    axes: list[plt.Axes], dead: pd.DataFrame, dimensions: list[Dimension], conditions: list[Condition]
) -> None:
    """Each trial under DEAD_ACCURACY as a triangle on its panel's lower edge, at its own x: its trial
    number in the history, its value of the dimension in the others (its choice's place in a choice
    panel). The panels keep the scale of the rest."""
    colour = {c.label: c.colour for c in conditions}
    complete = dead[dead.state == "complete"]
    for ax, dimension in zip(axes, [None, *dimensions], strict=True):
        low, high = ax.get_ylim()
        low -= 0.04 * (high - low)  # room for the triangles under the lowest live trial
        ax.set_ylim(low, high)
        if dimension is None:
            mine, xs = dead, dead.trial
        else:
            column = f"param:{dimension.name}"
            mine = complete[complete[column].notna()] if column in complete else complete.iloc[0:0]
            if dimension.numeric:
                xs = mine[column]
            else:  # a choice sits where its tick is; one no live trial made has no place
                ticks = dict(zip((t.get_text() for t in ax.get_xticklabels()), ax.get_xticks(), strict=True))
                xs = [ticks.get(str(v), np.nan) for v in mine[column]]
        if not mine.empty:
            ax.scatter(
                xs, [low] * len(mine), marker="v", s=44, clip_on=False, zorder=4,
                color=[colour[c] for c in mine.condition],
            )  # fmt: skip


def plot_search(conditions: list[Condition], out: Path) -> Path | None:
    """search.png: the optimization history and one panel per searched dimension (draw_search). None
    when nothing was searched (a study of fixed configurations, as `fraction`)."""
    if not searched_dimensions(conditions):
        return None
    return _save(draw_search(conditions), out / "search.png")


def _history_panel(history: plt.Axes, frame: pd.DataFrame, conditions: list[Condition]) -> None:
    for c in conditions:
        mine = frame[frame.condition == c.label].sort_values("trial")
        if mine.empty:
            continue
        done = mine[mine.state == "complete"]
        pruned = mine[mine.state == "pruned"]
        history.scatter(done.trial, done.value, color=c.colour, s=22)
        history.scatter(pruned.trial, pruned.value, color=c.colour, marker="x", s=22, alpha=0.6)
        if not done.empty:
            history.step(done.trial, done.value.cummax(), where="post", color=c.colour, linewidth=1.6)
    history.set_title("optimization history (line: best so far)")
    history.set_xlabel("trial number")
    history.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    history.set_ylabel(VALIDATION)


def _numeric_panel(
    ax: plt.Axes, done: pd.DataFrame, dimension: Dimension, conditions: list[Condition]
) -> None:
    column = f"param:{dimension.name}"
    drawn = [c for c in conditions if c.label in dimension.conditions] if column in done else []
    for c in drawn:
        mine = done[(done.condition == c.label) & done[column].notna()]
        ax.scatter(
            mine[column], mine.value, color=c.colour, s=26, alpha=0.8, edgecolor="white", linewidth=0.4
        )
        best = mine[mine.best]
        ax.scatter(best[column], best.value, color=c.colour, marker="*", s=190, edgecolor="0.15", zorder=3)
    for end in (dimension.low, dimension.high):
        ax.axvline(end, color="0.45", linestyle=":", linewidth=1.1)
    if dimension.log:
        ax.set_xscale("log")
        ax.set_xlim(dimension.low / 1.25, dimension.high * 1.25)
        # 1-2-5 ticks where the range is short; over more than two decades their labels would collide
        subs = (1.0, 2.0, 5.0) if dimension.high / dimension.low <= 100 else (1.0,)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        margin = 0.05 * (dimension.high - dimension.low)
        ax.set_xlim(dimension.low - margin, dimension.high + margin)
    if dimension.integer:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_title(dimension.name)
    ax.set_xlabel(f"{dimension.name}{' (log scale)' if dimension.log else ''}")
    ax.set_ylabel(VALIDATION)


def _choice_panel(
    ax: plt.Axes, done: pd.DataFrame, dimension: Dimension, conditions: list[Condition]
) -> None:
    column = f"param:{dimension.name}"
    mine = done[done[column].notna()] if column in done else done.iloc[0:0]
    if not mine.empty:
        values = sorted(mine[column].unique(), key=lambda v: (isinstance(v, str), v))
        mine = mine.assign(choice=mine[column].map(str))
        drawn = [c for c in conditions if c.label in set(mine.condition)]
        style = {
            "data": mine,
            "x": "choice",
            "y": "value",
            "hue": "condition",
            "order": [str(v) for v in values],
            "hue_order": [c.label for c in drawn],
            "palette": {c.label: c.colour for c in drawn},
            "ax": ax,
        }
        sns.boxplot(**style, showfliers=False, boxprops={"alpha": 0.35}, legend=False)
        sns.stripplot(**style, dodge=True, size=4, legend=False)
    ax.set_title(dimension.name)
    ax.set_xlabel(dimension.name)
    ax.set_ylabel(VALIDATION)


@dataclass(frozen=True)
class EdgeWarning:
    """A best value on the edge of its numeric search range (the tuning playbook's check)."""

    name: str
    value: float
    low: float
    high: float
    side: str  # "low" or "high"
    at_limit: bool  # the range already ends where the parameter's valid values end

    def text(self) -> str:
        searched = f"[{self.low:g}, {self.high:g}]"
        where = f"best {self.name} = {self.value:.3g} is at the {self.side} edge of its range {searched}"
        if self.at_limit:
            return f"{where}, which is as far as {self.name} goes"
        return f"{where}; widen it"


def edge_warnings(c: Condition) -> list[EdgeWarning]:
    """The best trial's numeric values (Float or Int) within EDGE_SHARE of an end of their range."""
    best = c.best
    if best is None:
        return []
    declared = parameters(TrainConfig)
    notes = []
    for name, dist in best.distributions.items():
        if isinstance(dist, CategoricalDistribution) or dist.high <= dist.low:
            continue
        value = best.params[name]
        scale = math.log if dist.log else float
        low, high, at = scale(dist.low), scale(dist.high), scale(value)
        sides = [
            side for side, gap in (("low", at - low), ("high", high - at)) if gap < EDGE_SHARE * (high - low)
        ]
        if not sides:
            continue
        side = sides[0]
        limit = getattr(declared.get(name), side, None)
        at_limit = limit is not None and (dist.low if side == "low" else dist.high) == limit
        notes.append(EdgeWarning(name, value, dist.low, dist.high, side, at_limit))
    return notes


def _x_of(budget: Budget, by_images: bool) -> float:
    return budget.labeled_images if by_images else budget.labeled_fraction


def _point(ax: plt.Axes, x: float, score: Score, colour: Any, marker: str) -> None:
    """Mean ± sd over confirmation seeds (filled, error bar), or a single run (hollow)."""
    if score.n > 1:
        ax.errorbar(x, score.mean, yerr=score.sd, fmt=marker, color=colour, markersize=8, capsize=4, zorder=3)
    else:
        ax.scatter(
            x,
            score.mean,
            marker=marker,
            s=64,
            facecolors="white",
            edgecolors=colour,
            linewidths=1.8,
            zorder=3,
        )


def _frame_the_bold(ax: plt.Axes, frame: pd.DataFrame, metric: str, lower_is_better: bool) -> None:
    """Keep a panel's scale for the curves worth reading: the bold best ones and the bulk of the rest.
    A dead or diverging trial (a loss flat at 2.3 nats, accuracy at chance) runs off the panel rather
    than squeezing every other curve into a sliver."""
    values = frame[metric].dropna()
    if values.empty:
        return
    bold = frame.loc[frame.best, metric].dropna()
    low, high = values.min(), values.max()
    if lower_is_better:  # the worst values are the high ones: cut the top
        high = max(values.quantile(0.9), bold.max() if not bold.empty else low)
    else:
        low = min(values.quantile(0.1), bold.min() if not bold.empty else high)
    if (low, high) != (values.min(), values.max()):
        pad = 0.05 * (high - low)
        ax.set_ylim(low - pad, high + pad)


def plot_fraction(conditions: list[Condition], out: Path) -> Path | None:
    """fraction.png: test accuracy against the label budget (log axis), labels-only and the best
    objective at each budget, full labels as a band. None with fewer than two scored budgets."""
    found = budgets(conditions)
    scored = {b.label for b in found if b.labels_only or b.objective}
    if len(scored) + any(b.full for b in found) < 2:
        return None
    by_images = all(b.labeled_images for b in found)
    if not by_images and not all(b.labeled_fraction for b in found):
        return None  # a budget of counts and a budget of fractions, neither with its images recorded
    series = list(dict.fromkeys(b.series for b in found))
    dark = dict(zip(series, sns.color_palette("dark", len(series)), strict=True))
    fig, ax = plt.subplots(figsize=(9.5, 5.8), constrained_layout=True)
    handles = []
    for name in series:
        mine = sorted((b for b in found if b.series == name), key=lambda b: _x_of(b, by_images))
        prefix = f"{name}: " if name else ""
        # One series: an objective's colour; several: a colour per series, the objective by its line.
        colours = (LABELS_ONLY_COLOUR, OBJECTIVE_COLOUR, "0.25") if len(series) == 1 else (dark[name],) * 3
        full = mine[0].full
        if full is not None:
            images = f" ({full.labeled_images:,} images)" if full.labeled_images else ""
            label = f"{prefix}full labels{images}, {full.score.text()}"
            handles.append(_full_band(ax, full.score, colours[2], label))
        for arm, colour, marker, dashes in (
            ("labels_only", colours[0], "o", "-"),
            ("objective", colours[1], "s", "--"),
        ):
            points = [(_x_of(b, by_images), getattr(b, arm)) for b in mine if getattr(b, arm)]
            if not points:
                continue
            ys = [c.score.mean for _, c in points]
            ax.plot([x for x, _ in points], ys, color=colour, linestyle=dashes, linewidth=1.4, zorder=2)
            for x, c in points:
                _point(ax, x, c.score, colour, marker)
                if arm == "objective":
                    ax.annotate(
                        c.arm,
                        (x, c.score.mean),
                        xytext=(7, -3),
                        textcoords="offset points",
                        fontsize=8,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"},
                    )
            what = "labels only (skip)" if arm == "labels_only" else "best unlabeled objective (named)"
            handles.append(
                matplotlib.lines.Line2D(
                    [], [], color=colour, marker=marker, linestyle=dashes, label=f"{prefix}{what}"
                )
            )
    handles += [
        matplotlib.lines.Line2D(
            [], [], color="0.3", marker="o", linestyle="", label="mean ± sd over confirmation seeds"
        ),
        matplotlib.lines.Line2D(
            [], [], color="0.3", marker="o", markerfacecolor="white", linestyle="", label="a single run"
        ),
    ]
    _budget_axis(ax, {_x_of(b, by_images) for b in found if b.labels_only or b.objective}, by_images)
    ax.set_ylabel(TEST_ACCURACY)
    # Under the axes, where no point can sit beneath it.
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    ax.set_title(
        "Test accuracy against the label budget\n(at each budget, the objective of best validation accuracy)",
        fontsize=11,
    )
    return _save(fig, out / "fraction.png")


def _budget_axis(ax: plt.Axes, xs: set[float], by_images: bool) -> None:
    """A log axis of label budgets, ticked at 1-2-5; one budget alone (full labels being the band) gets
    an axis of its own width, ticked at that budget, rather than decades with one point in them."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if len(xs) == 1:
        (x,) = xs
        ax.set_xlim(x / 2, x * 2)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([x]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    else:  # room right of the largest budget for its objective's name
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.6)
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}" if by_images else f"{x:g}")
    )
    ax.set_xlabel(
        "labeled images (log scale)" if by_images else "labeled fraction of the training pool (log scale)"
    )


def _full_band(ax: plt.Axes, score: Score, colour: Any, label: str) -> matplotlib.artist.Artist:
    """Full labels across the whole axis: its mean, and a band of ± sd where it was confirmed. The
    legend shows what was drawn: a band, or the dashed line of a single run."""
    line = ax.axhline(score.mean, color=colour, linewidth=1.2, linestyle="-" if score.n > 1 else "--")
    if score.n > 1:
        ax.axhspan(score.mean - score.sd, score.mean + score.sd, color=colour, alpha=0.15, linewidth=0)
        return matplotlib.patches.Patch(facecolor=colour, alpha=0.3, edgecolor=colour, label=label)
    line.set_label(label)
    return line


def plot_classes(conditions: list[Condition], out: Path) -> Path | None:
    """classes.png: per-class test recall at each hidden-label budget: full labels, labels alone and
    the best objective. None where no budget has full labels to compare with."""
    found = [b for b in budgets(conditions) if b.full and (b.labels_only or b.objective)]
    if not found:
        return None
    lowest = found[-1]  # every panel lists the classes in one order: by what the lowest budget loses
    lost = np.array(lowest.full.score.recall) - np.array(
        (lowest.labels_only or lowest.objective).score.recall
    )
    order = np.argsort(lost)  # the class that loses most at the top
    rows = np.arange(len(order))
    # One budget alone gets the width its two-line title needs, rather than a strip under it.
    fig, axes = _grid(len(found), ncols=3, width=5.6 if len(found) > 1 else 8.0, height=5.0, share=True)
    for ax, budget in zip(axes, found, strict=True):
        recall = {
            c.label: np.array(c.score.recall)[order]
            for c in (budget.full, budget.labels_only, budget.objective)
            if c is not None
        }
        low = budget.labels_only or budget.objective
        ax.hlines(rows, recall[low.label], recall[budget.full.label], color="0.82", linewidth=6, zorder=1)
        if budget.labels_only and budget.objective:
            for y, start, end in zip(rows, recall[low.label], recall[budget.objective.label], strict=True):
                ax.annotate(
                    "", (end, y), (start, y), arrowprops={"arrowstyle": "->", "color": OBJECTIVE_COLOUR}
                )
        for c, colour, what in (
            (budget.full, "black", "full labels"),
            (budget.labels_only, LABELS_ONLY_COLOUR, "labels alone"),
            (budget.objective, OBJECTIVE_COLOUR, f"with {budget.objective.arm}" if budget.objective else ""),
        ):
            if c is None:
                continue
            runs = f"mean of {c.score.n}" if c.score.n > 1 else "a single run"
            face = colour if c.score.n > 1 else "white"
            ax.scatter(
                recall[c.label],
                rows,
                facecolors=face,
                edgecolors=colour,
                linewidths=1.6,
                s=46,
                zorder=3,
                label=f"{what} ({runs})",
            )
        ax.set_yticks(rows, [lowest.full.score.classes[i] for i in order], fontsize=8)
        ax.set_xlabel("test recall of the class (fraction)")
        ax.xaxis.set_tick_params(labelbottom=True)  # a shared axis hides them above the bottom row
        prefix = f"{budget.series}, " if budget.series else ""
        images = f" ({budget.labeled_images:,} labeled images)" if budget.labeled_images else ""
        ax.set_title(f"{prefix}{budget.label}{images}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "Per-class test recall: what hiding labels costs each class (grey bar),\nand what the best "
        "objective wins back (arrow); classes ordered by what the lowest budget loses"
    )
    return _save(fig, out / "classes.png")


def importances(condition: Condition) -> dict[str, float] | None:
    """fANOVA importances for one condition (the share of the validation accuracy's variance each
    parameter explains), seeded so that a report redrawn from the same trials draws the same bars.
    Named, since Optuna 5's default evaluator is PED-ANOVA, which ranks what reaches the top 10% of
    trials, one or two trials in a 20-trial study. None with fewer than 2 complete trials or no spread."""
    complete = [t for t in condition.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or not any(t.params for t in complete):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            return optuna.importance.get_param_importances(condition.study, evaluator=evaluator)
    except (RuntimeError, ValueError, ZeroDivisionError):  # all params constant, or one param only
        return None


def plot_importance(conditions: list[Condition], out: Path) -> Path | None:
    found = [(c, imp) for c in conditions if (imp := importances(c))]
    if not found:
        return None
    fig, axes = _grid(len(found), ncols=4, width=4.6, height=3.4)
    for ax, (c, imp) in zip(axes, found, strict=True):
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color=c.colour)
        ax.set_title(c.label, fontsize=10)
        ax.set_xlabel("importance (fraction of variance, fANOVA)")
        ax.set_xlim(0, 1)
    fig.suptitle("Parameter importances per condition")
    return _save(fig, out / "importance.png")


def _confusion_conditions(conditions: list[Condition]) -> list[Condition]:
    """Full labels and the lowest budget's labels-only and best objective of each series, where labels
    were hidden; else every condition. Each with its best trial's own test score."""
    found = budgets(conditions)
    if not found:
        return [c for c in conditions if c.test]
    lowest = {b.series: b for b in found}.values()  # budgets come largest first
    picked = [c for b in lowest for c in (b.full, b.labels_only, b.objective) if c is not None and c.test]
    return list(dict.fromkeys(picked))


def plot_confusion(conditions: list[Condition], out: Path) -> Path | None:
    """confusion.png: the best trial's own test confusion (rows normalized) of each condition in
    _confusion_conditions. None where none was scored."""
    tested = _confusion_conditions(conditions)
    if not tested:
        return None
    fig, axes = _grid(len(tested), ncols=3, width=6.0, height=5.6)
    for ax, c in zip(axes, tested, strict=True):
        matrix = np.array(c.test.confusion, dtype=float)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        sns.heatmap(
            rates,
            annot=True,
            fmt=".2f",
            cmap="Blues",
            vmin=0,
            vmax=1,
            cbar=False,
            square=True,
            xticklabels=c.test.classes,
            yticklabels=c.test.classes,
            ax=ax,
            annot_kws={"fontsize": 7},
        )
        ax.set_title(
            f"{_named(c)}: best trial #{c.test.trial}, test accuracy {c.test.test_accuracy:.4f}", fontsize=10
        )
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.tick_params(axis="y", rotation=0, labelsize=8)
    fig.suptitle("Test-set confusion of the best trial, a single run each (rows: true class, normalized)")
    return _save(fig, out / "confusion.png")


def reproduce_command(c: Condition) -> str | None:
    """The `fmsearch train` command line that trains the best trial's configuration again; None
    where there is no best trial or its config is of another fmsearch version."""
    best = c.best
    if best is None or Attr.CONFIG not in best.user_attrs:
        return None
    try:
        flags = train_flags(best.user_attrs[Attr.CONFIG])
    except ConfigError:
        return None
    recorded = study_setting(c.study, "data", {})  # the data a study trained on, in its fingerprint
    for name in ("pool_limit", "val_size"):
        if recorded.get(name) is not None:
            flags += [flag(name), str(recorded[name])]
    return shlex.join(["fmsearch", "train", *flags])


def _overlap(a: Score, b: Score) -> bool:
    return a.mean - a.sd <= b.mean + b.sd and b.mean - b.sd <= a.mean + a.sd


def difference(what: str, a: Score, b: Score) -> str:
    """'distill against labels alone: +0.0178 (...; SE of the difference 0.0023): the ± spreads do not
    overlap', where the SE is sqrt(sd_a²/n_a + sd_b²/n_b); a single run has no spread to judge by."""
    delta = f"{what}: {a.mean - b.mean:+.4f} ({a.text()} against {b.text()}"
    if a.n < 2 or b.n < 2:
        return f"{delta}): a single run on at least one side, so no spread to judge the difference by"
    se = math.sqrt(a.sd**2 / a.n + b.sd**2 / b.n)
    if _overlap(a, b):
        return f"{delta}; SE of the difference {se:.4f}): the ± spreads overlap"
    return f"{delta}; SE of the difference {se:.4f}): the ± spreads do not overlap"


def answer_lines(conditions: list[Condition]) -> list[str]:
    """summary.md's opening: the test accuracy of full labels, labels alone and the best objective
    at each budget, the share of the lost accuracy won back, and the differences with their spread."""
    found = budgets(conditions)
    if not found:  # no labels hidden anywhere: each condition's score is the answer
        return [f"- {c.label}: test accuracy {c.score.text()}." for c in conditions if c.score]
    lines = []
    for b in found:
        prefix = f"{b.series}, " if b.series else ""
        images = f" ({b.labeled_images:,} labeled images)" if b.labeled_images else ""
        parts = [
            f"full labels {b.full.score.text()}" if b.full else _no_full(b, conditions),
            f"labels alone {b.labels_only.score.text()}" if b.labels_only else _no_labels_only(b, conditions),
        ]
        if b.objective:
            parts.append(f"with {b.objective.arm} {b.objective.score.text()}")
        line = f"- **{prefix}{b.label}**{images}: " + "; ".join(parts)
        if b.full and b.labels_only and b.objective:
            x, y, z = b.full.score.mean, b.labels_only.score.mean, b.objective.score.mean
            if x > y:
                share = (z - y) / (x - y)
                if share >= 0:
                    line += f"; the unlabeled images won back {share:.0%} of the accuracy lost without labels"
                else:
                    line += (
                        f"; {b.objective.arm} scored below labels alone: it won back nothing ({share:.0%})"
                    )
            else:
                line += (
                    "; labels alone lost nothing against full labels here, so there was nothing to win back"
                )
        lines.append(line + ".")
        if b.full and b.labels_only:
            lines.append(
                "  - " + difference("labels alone against full labels", b.labels_only.score, b.full.score)
            )
        if b.full and b.objective and not b.labels_only:
            what = f"{b.objective.arm} against full labels"
            lines.append("  - " + difference(what, b.objective.score, b.full.score))
        if b.labels_only and b.objective:
            what = f"{b.objective.arm} against labels alone"
            lines.append("  - " + difference(what, b.objective.score, b.labels_only.score))
    return lines


def _no_full(b: Budget, conditions: list[Condition]) -> str:
    if any(c.is_full and c.series == b.series for c in conditions):
        return "full labels: no score yet"
    return "no full-labels condition"


def _no_labels_only(b: Budget, conditions: list[Condition]) -> str:
    here = [c for c in conditions if c.series == b.series and c.budget == b.label]
    if any(c.arm == LABELS_ONLY for c in here):
        return "labels alone: no score yet"
    if any("unlabeled" in study_setting(c.study, "space", {}) for c in here):
        return "labels alone: not a condition of its own (unlabeled was searched, and lost to the objective)"
    return "no labels-only condition"


def _test_cell(c: Condition) -> str:
    if c.test:
        return f"| test accuracy | {c.test.test_accuracy:.4f} (trial #{c.test.trial}, a single run) |"
    if c.stale_test:
        return (
            f"| test accuracy | not scored for trial #{c.best.number}: the stored score is trial "
            f"#{c.stale_test.trial}'s; `fmsearch study {study_name_parts(c.study.study_name)[0]}` scores it |"
        )
    return "| test accuracy | not scored yet |"


def _epochs_spent(c: Condition) -> int:
    return sum(len(t.intermediate_values) for t in c.trials)


def _overview(conditions: list[Condition]) -> list[str]:
    lines = [
        "| condition | unlabeled objective | labeled images | best validation accuracy | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for c in conditions:
        best = c.best
        images = f"{c.labeled_images:,}" if c.labeled_images else "-"
        value = f"{best.value:.4f} (trial #{best.number})" if best else "-"
        score = c.score.text() if c.score else "not scored yet"
        lines.append(f"| {c.label} | {c.arm} | {images} | {value} | {score} |")
    return lines


def summary_markdown(name: str, conditions: list[Condition], images: list[Path], description: str) -> str:
    """summary.md: the answer first, then a table per condition, then the images."""
    lines = [f"# Study `{name}`", ""]
    if description:
        lines += [description, ""]
    answer = answer_lines(conditions)
    if answer:
        lines += [
            "**Test accuracy**: mean ± sd over the seeds the search never used where `fmsearch confirm` "
            "reran the best trial, else the best trial's own score, a single run. At each budget the "
            "objective shown is the one of best validation accuracy.",
            "",
            *answer,
            "",
        ]
    lines += [*_overview(conditions), ""]
    for c in conditions:
        states = {
            s: sum(t.state == s for t in c.trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        max_epochs = study_setting(c.study, Attr.MAX_EPOCHS, 0)
        spent, bound = _epochs_spent(c), len(c.finished) * max_epochs
        seconds = sum(t.user_attrs.get(Attr.SECONDS, 0.0) for t in c.trials)
        lines += [f"## {c.study.study_name}", ""]
        best = c.best
        if best is None:
            lines += [_no_best(c), ""]
            continue
        confirmed = c.score.text() if c.score and c.score.confirmed else "not yet (fmsearch confirm)"
        lines += ["| | |", "|---|---|"]
        for key, value in best.params.items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        lines += [
            f"| validation accuracy | {best.value:.4f} "
            f"(trial #{best.number}, epoch {best.user_attrs.get(Attr.BEST_EPOCH)}) |",
            _test_cell(c),
            f"| test accuracy, confirmed | {confirmed} |",
            f"| trials complete / pruned / failed | {states[TrialState.COMPLETE]} / "
            f"{states[TrialState.PRUNED]} / "
            f"{states[TrialState.FAIL]} |",
            f"| epochs spent / every trial to max epochs | {spent} / {bound}"
            + (f" ({1 - spent / bound:.0%} saved) |" if bound else " |"),
            f"| training wall time | {seconds / 60:.1f} min |",
            "",
        ]
        for note in edge_warnings(c):
            lines += [f"Note: {note.text()}", ""]
        command = reproduce_command(c)
        if command:
            lines += [
                f"Trial #{best.number}'s configuration, trained again:",
                "",
                "```sh",
                command,
                "```",
                "",
            ]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    lines += ["", "Every trial, with the confirmation reruns: [trials.csv](trials.csv)"]
    return "\n".join(lines) + "\n"


def _no_best(c: Condition) -> str:
    diverged = sum(t.user_attrs.get(Attr.STOP_REASON) == DIVERGED for t in c.finished)
    if c.finished and diverged == len(c.finished):
        return (
            f"All {diverged} finished trials diverged (the loss became NaN or inf): lower the top of the "
            "lr range in the study file, and run it under a new name (these trials stay as they are)."
        )
    return "No complete trial yet."


TRIAL_ATTRS = (Attr.BEST_EPOCH, Attr.STOP_REASON, Attr.LABELED_IMAGES, Attr.SECONDS)  # trials.csv keeps these


def trials_frame(conditions: list[Condition]) -> pd.DataFrame:
    """Every trial of every condition, then its confirmation reruns, one row each: the columns of
    Optuna's trials_dataframe (params_* for the searched values, a rerun's those of the trial it reruns;
    the duration in seconds) with the condition, the run ("search" or "confirmation"), the seed, the
    attributes the figures use (TRIAL_ATTRS) and the test score where one was taken."""
    searched = {d.name for d in searched_dimensions(conditions)}
    frames = []
    for c in conditions:
        best = c.best
        for run, study_name, trials in (
            ("search", c.study.study_name, c.trials),
            ("confirmation", confirm_name(c.study.study_name), c.reruns),
        ):
            if not trials:
                continue
            frame = pd.DataFrame([_trial_row(c, t, _params(c, t), searched) for t in trials])
            frame.insert(0, "run", run)
            frame.insert(0, "condition", c.label)
            frame.insert(0, "study", study_name)
            if run == "search":
                frame["best"] = [best is not None and t.number == best.number for t in trials]
                if c.test:
                    frame.loc[frame.number == c.test.trial, ["test_accuracy", "test_loss"]] = (
                        c.test.test_accuracy,
                        c.test.test_loss,
                    )
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _params(c: Condition, t: FrozenTrial) -> dict[str, Any]:
    """A trial's searched values; a confirmation rerun's are those of the search trial it reruns."""
    if Attr.SOURCE_TRIAL not in t.user_attrs:
        return t.params
    source = next((s for s in c.trials if s.number == t.user_attrs[Attr.SOURCE_TRIAL]), None)
    return source.params if source is not None else {}


def _trial_row(c: Condition, t: FrozenTrial, params: dict[str, Any], searched: set[str]) -> dict[str, Any]:
    config = t.user_attrs.get(Attr.CONFIG, {})
    test = t.user_attrs.get(Attr.TEST, {})
    duration = t.duration.total_seconds() if t.duration is not None else None
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "datetime_start": t.datetime_start,
        "datetime_complete": t.datetime_complete,
        "duration_seconds": duration,
        "unlabeled": c.arm if c.is_full else config.get("unlabeled", c.arm),
        "seed": config.get("seed"),
        "source_trial": t.user_attrs.get(Attr.SOURCE_TRIAL),
        **{f"params_{name}": params.get(name) for name in sorted(searched)},
        **{name: t.user_attrs.get(name) for name in TRIAL_ATTRS},
        "test_accuracy": test.get("test_accuracy"),
        "test_loss": test.get("test_loss"),
    }


def write_trials(conditions: list[Condition], out: Path) -> Path:
    """trials.csv beside summary.md (trials_frame), written atomically."""
    frame = trials_frame(conditions)
    path = out / "trials.csv"
    try:
        write_atomic(path, lambda partial: frame.to_csv(partial, index=False))
    except OSError as error:
        raise ReportError(
            f"cannot write {path} ({error.strerror}): free disk space or fix its permissions, then rerun "
            "`fmsearch report`; the storage is untouched"
        ) from None
    return path


def write_report(storage, name: str, results_dir: Path, artifact_store=None) -> tuple[Path, list[Path]]:
    """Draw every figure that the data supports, write summary.md and trials.csv; returns (summary
    path, images).

    With `artifact_store`, the images are uploaded as artifacts of each condition's study and
    summary.md becomes each study's dashboard note.
    """
    sns.set_theme(context="notebook", style="whitegrid")
    conditions = load_conditions(storage, name)
    if not any(c.finished for c in conditions):
        raise ReportError(f"study {name!r} has no finished trial yet: run `make study STUDY={name}` first")
    if not any(t.value is not None for c in conditions for t in c.finished):
        total = sum(len(c.finished) for c in conditions)
        raise ReportError(
            f"study {name!r}: all {total} finished trials diverged (the loss became NaN or inf), so there "
            "is nothing to draw; lower the top of the lr range in the study file and run it under a new name"
        )
    out = Path(results_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_curves(conditions, out)]
    images += [
        p
        for p in (
            plot_fraction(conditions, out),
            plot_search(conditions, out),
            plot_importance(conditions, out),
            plot_classes(conditions, out),
            plot_confusion(conditions, out),
        )
        if p
    ]
    for stale in set(FIGURES) - {p.name for p in images}:  # drawn by an earlier report, not by this one
        (out / stale).unlink(missing_ok=True)
    write_trials(conditions, out)
    description = conditions[0].study.user_attrs.get(Attr.DESCRIPTION, "")
    summary = out / "summary.md"
    text = summary_markdown(name, conditions, images, description)
    try:
        write_atomic(summary, lambda partial: partial.write_text(text))
    except OSError as error:
        raise ReportError(
            f"cannot write {summary} ({error.strerror}): free disk space or fix its permissions, then rerun "
            "`fmsearch report`; the storage is untouched"
        ) from None
    if artifact_store is not None:
        publish(conditions, images, text, artifact_store)
    return summary, images


def publish(conditions: list[Condition], images: list[Path], summary: str, artifact_store) -> None:
    """Upload each image as a study artifact once per content; save summary.md as each study's note.

    A figure whose content changed replaces its artifact's body in place, so the dashboard shows
    one curves.png per study however often the report runs.
    """
    from optuna.artifacts import get_all_artifact_meta, upload_artifact
    from optuna_dashboard import save_note

    kept = [line for line in summary.splitlines() if not line.startswith("![")]
    note = (
        "\n".join(kept)
        + "\nFigures: "
        + ", ".join(p.name for p in images)
        + " (this study's Artifacts tab)\n"
    )
    for c in conditions:
        save_note(c.study, note)
        # Check, then upload, as one step among every machine's reports (each ends a study with one).
        with Gate(artifact_store, c.study.study_name, purpose="figures"):
            uploaded = {meta.filename: meta.artifact_id for meta in get_all_artifact_meta(c.study)}
            for image in images:
                body = image.read_bytes()
                artifact_id = uploaded.get(image.name)
                if artifact_id is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        upload_artifact(
                            artifact_store=artifact_store, file_path=str(image), study_or_trial=c.study
                        )
                elif artifact_store.open_reader(artifact_id).read() != body:
                    artifact_store.write(artifact_id, io.BytesIO(body))
