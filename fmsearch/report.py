"""Figures and summary.md for a study, drawn from the Optuna storage alone (no retraining).

Writes results/<study>/{curves,fraction,search,importance,confusion}.png and summary.md, each
atomically, uploads each PNG as a study artifact once per content and saves summary.md as each
condition's dashboard note.
"""

from __future__ import annotations

import io
import itertools
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from fmsearch.errors import FmsearchError  # noqa: E402
from fmsearch.files import write_atomic  # noqa: E402
from fmsearch.spec import is_semi  # noqa: E402
from fmsearch.storage import (  # noqa: E402
    DIVERGED,
    Attr,
    BestTrialScore,
    Gate,
    best_trial,
    confirmed_scores,
    is_finished,
    study_name_parts,
    study_setting,
)

DPI = 160
CURVE_PANELS = (
    ("train_loss", "Train loss", "cross-entropy (nats)"),
    ("val_loss", "Validation loss", "cross-entropy (nats)"),
    ("train_accuracy", "Train accuracy", "accuracy (fraction)"),
    ("val_accuracy", "Validation accuracy", "accuracy (fraction)"),
)


class ReportError(FmsearchError):
    """Nothing to report (no such study, no finished trial); the message says what to run."""


@dataclass
class Condition:
    """One condition's study as the report sees it."""

    study: optuna.Study
    label: str  # "labels=10%", or the study name for a study without conditions
    labeled_fraction: float
    trials: list[optuna.trial.FrozenTrial]
    test: BestTrialScore | None = None  # the best trial's own test score, else None
    stale_test: BestTrialScore | None = None  # a stored score of another trial: never shown as this one's
    colour: Any = None
    finished: list[optuna.trial.FrozenTrial] = field(default_factory=list)

    @property
    def best(self) -> optuna.trial.FrozenTrial | None:
        return best_trial(self.trials)


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
        fixed = study_setting(study, Attr.FIXED, {})
        fraction = condition.get("labeled_fraction", fixed.get("labeled_fraction", 1.0))
        trials = study.get_trials(deepcopy=False)
        score, best = BestTrialScore.of(study), best_trial(trials)
        current = score is not None and best is not None and score.trial == best.number
        conditions.append(
            Condition(
                study=study,
                label=study_name_parts(study_name)[1] or study_name,
                labeled_fraction=fraction,
                trials=trials,
                test=score if current else None,
                stale_test=None if current else score,
                finished=[t for t in trials if is_finished(t)],
            )
        )
    conditions.sort(key=lambda c: (-c.labeled_fraction, c.label))
    palette = sns.color_palette("colorblind", len(conditions))
    for condition, colour in zip(conditions, palette, strict=True):
        condition.colour = colour
    return conditions


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
        ax.set_title(title)
        ax.set_xlabel("epoch" if ax in axes[1] else "")  # the shared axis is labeled under the bottom row
        ax.set_ylabel(unit)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    fig.suptitle("Learning curves: best trial per condition (bold), other finished trials (faint)")
    return _save(fig, out / "curves.png")


def _trial_frame(conditions: list[Condition]) -> pd.DataFrame:
    rows = []
    for c in conditions:
        for t in c.finished:
            if t.value is None:  # diverged: no value to place
                continue
            config = t.user_attrs.get(Attr.CONFIG, {})
            unlabeled = config.get("unlabeled", "skip") if is_semi(config) else "none (full labels)"
            rows.append(
                {
                    "condition": c.label,
                    "labeled_fraction": c.labeled_fraction,
                    "trial": t.number,
                    "state": t.state.name.lower(),
                    "value": t.value,
                    "arch": config.get("arch"),
                    "lr": config.get("lr"),
                    "dropout": config.get("dropout"),
                    "unlabeled": unlabeled,
                }
            )
    return pd.DataFrame(rows)


def plot_fraction(conditions: list[Condition], out: Path) -> Path | None:
    """Best validation and test accuracy against labeled fraction (log axis). None if one fraction."""
    if len({c.labeled_fraction for c in conditions}) < 2:
        return None
    frame = _trial_frame(conditions)
    frame = frame[frame.state == "complete"]
    best = frame.loc[frame.groupby(["labeled_fraction", "arch", "unlabeled"]).value.idxmax()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    sns.lineplot(
        data=best,
        x="labeled_fraction",
        y="value",
        hue="arch",
        style="unlabeled",
        markers=True,
        dashes=True,
        ax=left,
        palette="dark",
    )
    full = [c for c in conditions if c.labeled_fraction == 1.0 and c.best is not None]
    tested = [c for c in conditions if c.test]
    right.plot(
        [c.labeled_fraction for c in tested],
        [c.test.test_accuracy for c in tested],
        color="0.35",
        linewidth=1.2,
        zorder=1,
    )
    for c in tested:
        right.scatter(c.labeled_fraction, c.test.test_accuracy, color=c.colour, s=70, zorder=2, label=c.label)
    for ax, title, reference in (
        (
            left,
            "Best validation accuracy by architecture and unlabeled objective",
            full[0].best.value if full else None,
        ),
        (
            right,
            "Test accuracy of each condition's best trial",
            full[0].test.test_accuracy if full and full[0].test else None,
        ),
    ):
        if reference is not None:
            ax.axhline(reference, color="0.4", linestyle=":", linewidth=1.2, label="full labels")
        ax.set_xscale("log")
        ax.set_xlabel("labeled fraction of the training pool (log scale)")
        ax.set_ylabel("accuracy (fraction)")
        ax.set_title(title, fontsize=11)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy against label budget")
    return _save(fig, out / "fraction.png")


def plot_search(conditions: list[Condition], out: Path) -> Path:
    """Optimization history with best-so-far, lr against dropout, and value by architecture."""
    frame = _trial_frame(conditions)
    fig, (history, scatter, by_arch) = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    _history_panel(history, frame, conditions)
    done = frame[frame.state == "complete"]
    _lr_dropout_panel(fig, scatter, done, conditions)
    _arch_panel(by_arch, done, conditions)
    fig.get_layout_engine().set(wspace=0.06)  # room between the colour bar's label and the next panel
    fig.suptitle("What the search found")
    return _save(fig, out / "search.png")


def _history_panel(history: plt.Axes, frame: pd.DataFrame, conditions: list[Condition]) -> None:
    for c in conditions:
        mine = frame[frame.condition == c.label].sort_values("trial")
        if mine.empty:
            continue
        done = mine[mine.state == "complete"]
        pruned = mine[mine.state == "pruned"]
        history.scatter(done.trial, done.value, color=c.colour, s=22, label=f"{c.label} complete")
        history.scatter(
            pruned.trial,
            pruned.value,
            color=c.colour,
            marker="x",
            s=22,
            alpha=0.6,
            label=f"{c.label} pruned (last value)",
        )
        if not done.empty:
            history.step(done.trial, done.value.cummax(), where="post", color=c.colour, linewidth=1.6)
    history.set_title("Optimization history (line: best so far)")
    history.set_xlabel("trial number")
    history.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    history.set_ylabel("validation accuracy (fraction)")
    history.legend(fontsize=7, loc="lower right")


def _lr_dropout_panel(fig, scatter: plt.Axes, done: pd.DataFrame, conditions: list[Condition]) -> None:
    markers = dict(zip([c.label for c in conditions], itertools.cycle("osD^vP*X")))
    points = None
    for c in conditions:
        mine = done[done.condition == c.label]
        points = scatter.scatter(
            mine.lr,
            mine.dropout,
            c=mine.value,
            cmap="viridis",
            marker=markers[c.label],
            vmin=done.value.min(),
            vmax=done.value.max(),
            edgecolor="0.2",
            s=40,
            linewidth=0.4,
            label=c.label,
        )
    scatter.set_xscale("log")
    _span_searched_range(scatter, conditions)
    scatter.set_title("Learning rate against dropout (complete trials)")
    scatter.set_xlabel("learning rate (log scale)")
    scatter.set_ylabel("dropout probability")
    if points is not None and not done.empty:
        fig.colorbar(points, ax=scatter, label="validation accuracy (fraction)")
        shapes = [  # the marker shape names the condition; colour is the value
            matplotlib.lines.Line2D([], [], marker=markers[c.label], color="0.5", linestyle="", label=c.label)
            for c in conditions
        ]
        scatter.legend(handles=shapes, fontsize=7, loc="best")


def _arch_panel(by_arch: plt.Axes, done: pd.DataFrame, conditions: list[Condition]) -> None:
    if not done.empty:
        palette = {c.label: c.colour for c in conditions}
        axes_and_data = {
            "data": done,
            "x": "arch",
            "y": "value",
            "hue": "condition",
            "palette": palette,
            "ax": by_arch,
        }
        sns.boxplot(**axes_and_data, showfliers=False, boxprops={"alpha": 0.35})
        sns.stripplot(**axes_and_data, dodge=True, size=4, legend=False)
        by_arch.legend(fontsize=7, title=None, loc="lower right")
    by_arch.set_title("Validation accuracy by architecture")
    by_arch.set_xlabel("architecture")
    by_arch.set_ylabel("validation accuracy (fraction)")


def _span_searched_range(ax: plt.Axes, conditions: list[Condition]) -> None:
    """Set the lr (log) and dropout axes to the ranges the study searched, with readable ticks."""
    for name, set_limits in (("lr", ax.set_xlim), ("dropout", ax.set_ylim)):
        ranges = [
            t.distributions[name]
            for c in conditions
            for t in c.trials
            if isinstance(t.distributions.get(name), optuna.distributions.FloatDistribution)
        ]  # a categorical lr or dropout (a list in [space]) keeps matplotlib's own limits
        if ranges:
            set_limits(min(r.low for r in ranges), max(r.high for r in ranges))
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def importances(condition: Condition) -> dict[str, float] | None:
    """optuna.importance for one condition; None with fewer than 2 complete trials or no spread."""
    complete = [t for t in condition.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or not any(t.params for t in complete):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(condition.study)
    except (RuntimeError, ValueError, ZeroDivisionError):  # all params constant, or one param only
        return None


def plot_importance(conditions: list[Condition], out: Path) -> Path | None:
    found = [(c, imp) for c in conditions if (imp := importances(c))]
    if not found:
        return None
    fig, axes = plt.subplots(
        1, len(found), figsize=(4.8 * len(found), 3.6), constrained_layout=True, squeeze=False
    )
    for ax, (c, imp) in zip(axes[0], found, strict=True):
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color=c.colour)
        ax.set_title(c.label)
        ax.set_xlabel("importance (fraction of variance, fANOVA)")
        ax.set_xlim(0, 1)
    fig.suptitle("Parameter importances per condition")
    return _save(fig, out / "importance.png")


def plot_confusion(conditions: list[Condition], out: Path) -> Path | None:
    tested = [c for c in conditions if c.test]
    if not tested:
        return None
    classes = tested[0].test.classes
    fig, axes = plt.subplots(
        1, len(tested) + 1, figsize=(6.2 * len(tested) + 6, 5.6), constrained_layout=True
    )
    per_class = []
    for ax, c in zip(axes[: len(tested)], tested, strict=True):
        matrix = np.array(c.test.confusion, dtype=float)
        rates = matrix / matrix.sum(axis=1, keepdims=True)
        sns.heatmap(
            rates,
            annot=True,
            fmt=".2f",
            cmap="Blues",
            vmin=0,
            vmax=1,
            cbar=False,
            square=True,
            xticklabels=classes,
            yticklabels=classes,
            ax=ax,
            annot_kws={"fontsize": 7},
        )
        ax.set_title(
            f"{c.label}: best trial #{c.test.trial}, test accuracy {c.test.test_accuracy:.4f}",
            fontsize=10,
        )
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.tick_params(axis="y", rotation=0, labelsize=8)
        per_class += [
            {"class": name, "accuracy": rates[i, i], "condition": c.label} for i, name in enumerate(classes)
        ]
    bars = axes[-1]
    sns.barplot(
        data=pd.DataFrame(per_class),
        y="class",
        x="accuracy",
        hue="condition",
        palette={c.label: c.colour for c in tested},
        ax=bars,
    )
    bars.set_title("Per-class test accuracy", fontsize=10)
    bars.set_xlabel("accuracy (fraction)")
    bars.set_ylabel("")
    bars.set_xlim(0, 1)
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(tested), frameon=False)
    fig.suptitle("Test-set confusion of each condition's best trial (rows: true class, normalized)")
    return _save(fig, out / "confusion.png")


def _test_cell(c: Condition) -> str:
    if c.test:
        return f"| test accuracy | {c.test.test_accuracy:.4f} (trial #{c.test.trial}) |"
    if c.stale_test:
        return (
            f"| test accuracy | not scored for trial #{c.best.number}: the stored score is trial "
            f"#{c.stale_test.trial}'s; `fmsearch study {study_name_parts(c.study.study_name)[0]}` scores it |"
        )
    return "| test accuracy | not scored yet |"


def _epochs_spent(c: Condition) -> int:
    return sum(len(t.intermediate_values) for t in c.trials)


def summary_markdown(name: str, conditions: list[Condition], images: list[Path], description: str) -> str:
    """summary.md: the answer first, then a table per condition, then the images."""
    lines = [f"# Study `{name}`", ""]
    if description:
        lines += [description, ""]
    confirmed = {c.study.study_name: _confirmed(c) for c in conditions}
    answer = [
        f"{c.label}: test accuracy {confirmed[c.study.study_name]}"
        if confirmed[c.study.study_name]
        else f"{c.label}: test accuracy {c.test.test_accuracy:.4f} (trial #{c.test.trial}, a single run)"
        for c in conditions
        if c.test or confirmed[c.study.study_name]
    ]
    if answer:
        lines += [
            "**" + "; ".join(answer) + "** (the best trial of each condition, trained again on seeds the "
            "search never used where it was confirmed, each run scored once on the test set)",
            "",
        ]
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
        lines += ["| | |", "|---|---|"]
        for key, value in best.params.items():
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        lines += [
            f"| validation accuracy | {best.value:.4f} "
            f"(trial #{best.number}, epoch {best.user_attrs.get(Attr.BEST_EPOCH)}) |",
            _test_cell(c),
            f"| test accuracy, confirmed | {confirmed[c.study.study_name] or 'not yet (fmsearch confirm)'} |",
            f"| trials complete / pruned / failed | {states[TrialState.COMPLETE]} / "
            f"{states[TrialState.PRUNED]} / "
            f"{states[TrialState.FAIL]} |",
            f"| epochs spent / every trial to max epochs | {spent} / {bound}"
            + (f" ({1 - spent / bound:.0%} saved) |" if bound else " |"),
            f"| training wall time | {seconds / 60:.1f} min |",
            "",
        ]
        edge = _edge_warnings(c)
        if edge:
            lines += [f"Note: {edge}", ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def _confirmed(c: Condition) -> str:
    """'0.8123 ± 0.0021 (n=3, trial #7 on new seeds)', or '' where the best trial has no confirmation."""
    if c.best is None:
        return ""
    scores = list(confirmed_scores(c.study, c.best.number).values())
    if not scores:
        return ""
    sd = f"{statistics.stdev(scores):.4f}" if len(scores) > 1 else "-"
    return f"{statistics.mean(scores):.4f} ± {sd} (n={len(scores)}, trial #{c.best.number} on new seeds)"


def _no_best(c: Condition) -> str:
    diverged = sum(t.user_attrs.get(Attr.STOP_REASON) == DIVERGED for t in c.finished)
    if c.finished and diverged == len(c.finished):
        return (
            f"All {diverged} finished trials diverged (the loss became NaN or inf): lower the top of the "
            "lr range in the study file, and run it under a new name (these trials stay as they are)."
        )
    return "No complete trial yet."


def _edge_warnings(c: Condition) -> str:
    """The tuning playbook's check: a best value on the edge of a numeric search range."""
    best = c.best
    notes = []
    for name, dist in best.distributions.items():
        if isinstance(dist, optuna.distributions.FloatDistribution):
            low, high, value = dist.low, dist.high, best.params[name]
            if dist.log:
                low, high, value = math.log(low), math.log(high), math.log(value)
            if min(value - low, high - value) < 0.05 * (high - low):
                notes.append(f"best {name} = {best.params[name]:.3g} is at the edge of its range; widen it")
    return "; ".join(notes)


def write_report(storage, name: str, results_dir: Path, artifact_store=None) -> tuple[Path, list[Path]]:
    """Draw every figure that the data supports, write summary.md; returns (summary path, images).

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
            plot_confusion(conditions, out),
        )
        if p
    ]
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
