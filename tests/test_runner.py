"""runner.py: `fmsearch train` and a study trial run a configuration through the same function."""

import json
import os
import subprocess
import sys

import optuna
import pytest

from fmsearch import data, runner
from fmsearch.errors import StudyError
from tests.conftest import REAL_ROOT, needs_real_data, run_tiny_study, study_text

TIMING = {"train_seconds", "epoch_seconds", "images_per_second"}  # the only numbers a rerun may change


def _comparable(record: dict) -> dict:
    """A run's record without its clock readings and without where its settings were read from."""
    kept = {k: v for k, v in record.items() if k not in TIMING | {"seconds", "worker"}}
    kept["history"] = [{k: v for k, v in h.items() if k not in TIMING} for h in record["history"]]
    kept["execution"] = {k: v for k, v in record["execution"].items() if k != "source"}
    return kept


@needs_real_data
def test_the_train_command_repeats_a_study_trial_record_for_record(tmp_path, tiny):
    fixed = "optimizer = 'adam'\nlr = 0.002\ndropout = 0.1\nseed = 3"
    text = study_text(trials=1, max_epochs=2, patience=5, fixed=fixed, space="arch = ['plain']")
    text = text.replace("batch_size = 32", "batch_size = 32\npool_limit = 400")
    real = data.DataConfig(root=REAL_ROOT)
    run = run_tiny_study(tmp_path / "study", tiny, text, name="same", data_config=real)
    (trial,) = optuna.load_study(study_name="same/labels=100%", storage=run.storage).trials

    flags = "--arch plain --lr 0.002 --dropout 0.1 --seed 3 --epochs 2 --patience 5 --batch-size 32"
    command = [sys.executable, "-m", "fmsearch.cli", "train", *flags.split(), "--monitor", "val_accuracy"]
    result = subprocess.run(
        [*command, "--pool-limit", "400", "--device", "cpu", "--json", "run.json"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "FMSEARCH_DATA": str(REAL_ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    train = json.loads((tmp_path / "run.json").read_text())
    assert train["config"] == trial.user_attrs["config"]  # the same configuration, flag for flag
    recorded = {key: trial.user_attrs[key] for key in train if key in trial.user_attrs}
    assert set(recorded) >= {"config", "history", "stop_reason", "best_epoch", "execution", "labeled_images"}
    assert _comparable(recorded) == _comparable({key: train[key] for key in recorded})


def test_a_recorded_config_of_another_shape_is_one_line_naming_the_trial():
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"config": {"arch": "plain", "colour": 1}})
    with pytest.raises(StudyError, match=r"semi/labels=10% #-1: its recorded config cannot be read .*colour"):
        runner.stored_config("semi/labels=10%", trial)
    assert runner.stored_config("x", optuna.trial.create_trial(value=0.5, user_attrs={"config": {}})).arch
