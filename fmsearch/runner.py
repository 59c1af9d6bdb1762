"""One configuration, end to end: its labeled subset, the teachers distill asks for, and the fit.

`fmsearch train` and every study trial run a configuration through `run`, and record what it
returns (`Run.record`) under the same names, so a trial can be repeated on the command line and the
two compared. A study trial adds only what Optuna needs: the suggestion, report and prune, storage.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from fmsearch import engine, speed, teachers
from fmsearch.config import TrainConfig
from fmsearch.data import Splits
from fmsearch.errors import StudyError
from fmsearch.storage import Attr


@dataclass
class Run:
    config: TrainConfig
    result: engine.FitResult
    team: teachers.Teachers | None = None  # distill's teachers, or a warm start's control

    def record(self) -> dict[str, Any]:
        """What a finished run records, keyed by the storage contract's names (storage.Attr)."""
        result = self.result
        record = {
            Attr.CONFIG: asdict(self.config),
            Attr.HISTORY: result.history,
            Attr.STOP_REASON: result.stop_reason,
            Attr.BEST_EPOCH: result.best_epoch,
            Attr.SECONDS: result.seconds,
            Attr.EXECUTION: result.execution.record(),
            Attr.IMAGES_PER_SECOND: statistics.median(h["images_per_second"] for h in result.history),
            Attr.LABELED_IMAGES: result.labeled_images,
        }
        if self.team is not None:
            record[Attr.TEACHER_TEAM] = teachers_record(self.team)
        return record


def teachers_record(team: teachers.Teachers) -> dict[str, Any]:
    """What distill's teachers cost and how good they are (test accuracy for the report only)."""
    return {
        "count": len(team.members),
        "seconds": team.seconds,
        "epochs": team.epochs,
        "val_accuracy": team.val_accuracy,
        "test_accuracy": team.test_accuracy,
        "target_accuracy": team.target_accuracy,
        "members": team.members,  # per teacher: its seed, epochs, seconds and scores
        "rounds": team.rounds,  # Noisy Student's earlier students, in order
    }


def provenance(device: torch.device) -> dict[str, str]:
    """Where and with what a run ran: the device (a GPU by its name), the code, torch and Optuna, and
    the machine and process."""
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "git_revision": GIT_REVISION,
        "torch_version": torch.__version__,
        "optuna_version": optuna.__version__,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


def _git_revision() -> str:
    """The revision of the fmsearch code that runs (not of the folder it runs in), else 'unknown'.
    Read once, as the code is imported: a commit made while a run trains is not the code it runs."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


GIT_REVISION = _git_revision()


def teachers_dir(results_dir: Path) -> Path:
    """Where trained teachers are cached, shared by every run and study under `results_dir`."""
    return Path(results_dir) / "teachers"


def run(
    config: TrainConfig,
    splits: Splits,
    results_dir: Path,
    hooks: Sequence[engine.EpochHook] = (),
    progress: engine.Progress | None = None,
    execution: speed.Execution | None = None,
    on_teachers: Callable[[teachers.Teachers], None] = lambda team: None,
    log: Callable[[str], None] = lambda line: None,
) -> Run:
    """Pick the labeled subset, build the teachers distill or a warm start asks for (`on_teachers`
    hears of them before training starts), then fit. `execution` defaults to this machine's choice."""
    subset = engine.make_subset(config, splits)
    execution = execution or speed.settle(config, splits.train_images.device)
    team, targets, initial_state = None, None, None
    if teachers.count(config):
        team = teachers.build(config, splits, subset, teachers_dir(results_dir), log, execution)
        on_teachers(team)
        initial_state = team.control_state
    if config.unlabeled == "distill":
        targets = team.probs
        for round in range(1, config.rounds):  # Noisy Student: each student teaches the next one
            log(f"student round {round} of {config.rounds}: training, then relabelling the pool")
            student = engine.fit(config, splits, subset=subset, teacher_probs=targets, execution=execution)
            targets = teachers.student_targets(student.model, config, splits, subset, execution)
            team.rounds.append(_round_record(student, splits, execution, targets, subset))
    result = engine.fit(
        config,
        splits,
        subset=subset,
        teacher_probs=targets,
        hooks=hooks,
        progress=progress,
        execution=execution,
        initial_state=initial_state,
    )
    return Run(config, result, team)


def _round_record(
    student: engine.FitResult, splits: Splits, run: speed.Execution, targets, subset
) -> dict[str, Any]:
    """An earlier round's student: its epochs and scores, and how right the targets it made are."""
    test = engine.evaluate(student.model, splits.test_images, splits.test_labels, splits.normalize, run)
    return {
        "epochs": len(student.history),
        "best_epoch": student.best_epoch,
        "seconds": student.seconds,
        "val_accuracy": student.best["val_accuracy"],
        "test_accuracy": test.accuracy,  # for the report only, never for selection
        "target_accuracy": teachers.target_accuracy(targets, subset),
    }


def stored_config(study_name: str, trial: FrozenTrial) -> TrainConfig:
    """The configuration a trial recorded, checked: another machine or version may have written it."""
    try:
        return TrainConfig(**trial.user_attrs[Attr.CONFIG])
    except (KeyError, TypeError, ValueError) as error:
        raise StudyError(
            f"{study_name} #{trial.number}: its recorded config cannot be read ({error}): it was "
            "written by another fmsearch version; run that version, or archive the study with "
            "--archive-changed"
        ) from None
