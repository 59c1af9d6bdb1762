import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from fmsearch import confirm, data, engine, lineage, spec
from tests.conftest import TINY_STUDY

STUDIES = sorted(Path("studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_file_is_valid(path):
    parsed = spec.parse(path)
    assert parsed.name == path.stem and parsed.trials >= 1 and parsed.description


def test_shipped_studies_are_the_ones_the_readme_names():
    section = Path("README.md").read_text().split("## What a study is", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))  # the first cell of each table row
    assert named == {p.stem for p in STUDIES} and len(named) >= 4


def test_semi_makes_the_labeled_fraction_and_the_objective_conditions_not_dimensions():
    semi = spec.parse(Path("studies/semi.toml"))
    assert semi.conditions["labeled_fraction"] == (1.0, 0.1)
    assert not {"labeled_fraction", "unlabeled"} & set(semi.space)
    assert [semi.study_name(c) for c in semi.condition_list()] == [
        "semi/labels=100%",
        "semi/labels=10%,unlabeled=skip",
        "semi/labels=10%,unlabeled=distill",
    ]


def test_fraction_study_spans_the_label_budgets_from_one_percent_to_full_labels_each_its_own_study():
    fraction = spec.parse(Path("studies/fraction.toml"))
    budgets = fraction.conditions["labeled_fraction"]
    assert (
        min(budgets) <= 0.01 and 0.1 in budgets and max(budgets) == 1.0 and list(budgets) == sorted(budgets)
    )
    assert fraction.conditions["unlabeled"] == ("skip", "distill") and not fraction.space
    names = [fraction.study_name(c) for c in fraction.condition_list()]
    assert len(set(names)) == 2 * len(budgets) - 1  # under full labels the objective means nothing
    assert names[-1] == "fraction/labels=100%" and "fraction/labels=1%,unlabeled=distill" in names


def test_fraction_runs_on_seeds_the_semi_search_and_its_confirmation_never_used():
    """fraction takes semi's tuned recipes: a run on a seed semi picked them on would be optimistic."""
    semi, fraction = (spec.parse(Path(f"studies/{name}.toml")) for name in ("semi", "fraction"))
    trial = optuna.trial.FixedTrial({})

    def used(study: spec.StudySpec, config_seed: int) -> set[int]:
        return {config_seed, *confirm.seeds(config_seed, study.confirm.seeds)}

    semi_seed = spec.suggest(optuna.trial.FixedTrial({"arch": "plain", "lr": 1e-3, "dropout": 0.1}), semi,
                             semi.condition_list()[0]).seed  # fmt: skip
    for condition in fraction.condition_list():
        config = spec.suggest(trial, fraction, condition)
        assert not used(semi, semi_seed) & used(fraction, config.seed), fraction.study_name(condition)


BAD = [
    ("colour = 1", "colour: unknown key"),
    ("[space]\nwidth = [1, 2]", "space.width: unknown parameter"),
    ("[space]\nlr = { low = 1e-2, high = 1e-4 }", "space.lr: low 0.01 is not below high 0.0001; swap them"),
    ("[space]\nlr = { low = 0.0, high = 1.0, log = true }", "space.lr: a log range needs low > 0"),
    (
        "[space]\narch = ['plain', 'resnet']",
        "space.arch: unknown value 'resnet'; choose from ['adaptive', 'plain']",
    ),
    ("[space]\narch = []", "space.arch: empty list; list at least one value"),
    ("[space]\ndropout = { low = 0.1 }", "space.dropout: a range needs both low and high"),
    ("[fixed]\nlr = 'fast'", "fixed.lr: 'fast' is not a float"),
    ("trials = 0", "trials: 0 is not a positive integer"),
    ("trials = 'ten'", "trials: 'ten' is not a positive integer"),
    ("[pruner]\nname = 'asha'", "pruner.name: unknown pruner 'asha'"),
    ("[pruner]\nwarmup = 2", "pruner.warmup: unknown key"),
    ("[conditions]\nlabeled_fraction = []", "conditions.labeled_fraction: must be a non-empty list"),
    ("[fixed]\ndropout = 1.5", "fixed.dropout: 1.5 is out of range; dropout must be in [0, 1)"),
    ("[fixed]\nlr = 1e-3\n[space]\nlr = [1e-3]", "space.lr: also set in [fixed]"),
    ("trials = [", "not valid TOML"),
    ("val_size = 5", "val_size: 5 is out of range; hold out between 10 and 50000 images"),
    ("[fixed]\nlr = nan", "fixed.lr: nan is not a finite number"),
    ("[fixed]\nlambda_u = inf", "fixed.lambda_u: inf is not a finite number"),
    ("[space]\nlr = { low = 1e-4, high = inf }", "space.lr.high: inf is not a finite number"),
    ("[space]\nlr = [nan, nan]", "space.lr: nan is not a finite number"),
    (
        "[conditions]\nlabeled_fraction = [0.1, 0.1000001]",
        "conditions: {'labeled_fraction': 0.1} and {'labeled_fraction': 0.1000001} are both named",
    ),
]
# Every value, whether fixed, a condition, a choice or a range's end, meets TrainConfig's own rule.
OUT_OF_RANGE = [
    ("[space]\ndropout = [1.5]", "space.dropout: 1.5 is out of range; dropout must be in [0, 1)"),
    ("[space]\ndropout = { low = 0.0, high = 1.0 }", "space.dropout.high: 1.0 is out of range"),
    ("[space]\nlabeled_fraction = [2.0]", "space.labeled_fraction: 2.0 is out of range"),
    ("[conditions]\nlabeled_fraction = [1.0, 2.0]", "conditions.labeled_fraction: 2.0 is out of range"),
    ("[space]\nlr = { low = -1, high = 1 }", "space.lr.low: -1.0 is out of range; lr must be positive"),
    (
        "[space]\ntau = { low = 0.5, high = 1.5 }",
        "space.tau.high: 1.5 is out of range; tau must be in [0, 1]",
    ),
    ("[fixed]\ntau = 1.2", "fixed.tau: 1.2 is out of range; tau must be in [0, 1]"),
    (
        "[space]\nlambda_u = [-1.0, 1.0]",
        "space.lambda_u: -1.0 is out of range; lambda_u must be non-negative",
    ),
    (
        "[space]\nlabeled_count = [0, 100]",
        "space.labeled_count: 0 is out of range; labeled_count must be at least 1",
    ),
    (
        "[fixed]\nwarmup_epochs = -1",
        "fixed.warmup_epochs: -1 is out of range; warmup_epochs must be non-negative",
    ),
    ("[fixed]\nweight_decay = -0.1", "fixed.weight_decay: -0.1 is out of range"),
    ("[space]\nseed = [0, -3]", "space.seed: -3 is out of range; seed must be in [0, 4294967295]"),
    ("[fixed]\nseed = 1.5", "fixed.seed: 1.5 is not an int; write an int"),
    (
        "[pruner]\nname = 'percentile'\npercentile = 200",
        "pruner.percentile: 200.0 is out of range; percentile must be in [0, 100]",
    ),
    ("[sampler]\nstartup_trials = -1", "sampler.startup_trials: -1 is out of range"),
]
REPEATED_OR_IDENTICAL = [
    ("[conditions]\nlabeled_fraction = [0.1, 0.1]", "conditions.labeled_fraction: 0.1 is listed twice"),
    ("[conditions]\nlabeled_fraction = [1, 1.0]", "conditions.labeled_fraction: 1.0 is listed twice"),
    ("[space]\narch = ['plain', 'plain']", "space.arch: 'plain' is listed twice; list each value once"),
    (
        "trials = 3",
        "space: empty, so all 3 trials would be identical; add a dimension to [space] or set trials = 1",
    ),
    (
        "trials = 3\n[conditions]\nlabeled_fraction = [1.0, 0.1]\n[space]\ntau = [0.9, 0.95]",
        "space: no dimension applies in bad/labels=100%, so its 3 trials would be identical",
    ),
]
BAD += OUT_OF_RANGE + REPEATED_OR_IDENTICAL


@pytest.mark.parametrize("text,message", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_a_bad_study_file_gets_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(spec.SpecError) as caught:
        spec.parse(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_one_trial_needs_no_search_space(tmp_path):
    path = tmp_path / "single.toml"
    path.write_text("trials = 1\n[fixed]\nlr = 1e-3\n")
    assert spec.parse(path).space == {}


def test_a_file_that_is_not_utf8_is_named_with_the_fix(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(spec.SpecError) as caught:
        spec.parse(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 18); save the file as UTF-8"


def test_cli_refuses_a_bad_study_file_in_one_line_before_training(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[space]\narch = ['plain', 'vgg']\n")
    result = subprocess.run(
        [sys.executable, "-m", "fmsearch.cli", "study", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "space.arch: unknown value 'vgg'" in result.stderr
    assert not (tmp_path / "s.db").exists()  # nothing was created, let alone trained


def test_an_unknown_study_name_lists_the_known_ones():
    with pytest.raises(spec.SpecError, match=r"no such study file; choose one of \[.*'semi'.*'smoke'"):
        spec.find("sem", Path("studies"))


def test_conditional_dimensions_are_suggested_only_where_they_apply(tmp_path):
    tiny = spec.parse(tmp_path.joinpath("tiny.toml"), TINY_STUDY)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    full, half = tiny.condition_list()
    for condition in [full] * 5 + [half] * 20:
        trial = study.ask()
        config = spec.suggest(trial, tiny, condition)
        assert config.labeled_fraction == condition["labeled_fraction"]
        names = set(trial.params)
        assert names >= {"arch", "lr", "dropout"}
        assert ("unlabeled" in names) == (condition["labeled_fraction"] < 1)
        assert ("tau" in names) == (trial.params.get("unlabeled") == "pseudo")
        study.tell(trial, 0.5)


def test_suggest_uses_the_spec_names_and_the_run_limits(tmp_path):
    tiny = spec.parse(tmp_path.joinpath("tiny.toml"), TINY_STUDY)
    trial = optuna.create_study().ask()
    config = spec.suggest(trial, tiny.overridden(max_epochs=7), {"labeled_fraction": 1.0})
    assert (config.epochs, config.batch_size, config.patience) == (7, 32, 2)
    assert config.lr == trial.params["lr"] and config.arch == trial.params["arch"]


def test_trials_from_the_command_line_are_checked_as_the_files_own_are(tmp_path):
    """A file that fixes everything may run one trial; `--trials 3` would run three identical ones."""
    single = spec.parse(tmp_path / "one.toml", 'description = "one run"\ntrials = 1\n\n[fixed]\nlr = 1e-3\n')
    assert single.overridden(max_epochs=2).max_epochs == 2
    with pytest.raises(spec.SpecError, match=r"all 3 trials would be identical; drop --trials"):
        single.overridden(trials=3)
    with pytest.raises(spec.SpecError, match=r"--epochs 0: give a whole number of at least 1"):
        single.overridden(max_epochs=0)


def test_a_study_file_that_leaves_out_the_run_level_keys_gets_train_configs_defaults(tmp_path):
    bare = spec.parse(tmp_path / "bare.toml", 'description = "defaults"\ntrials = 1\n')
    defaults = engine.TrainConfig()
    assert (bare.max_epochs, bare.batch_size, bare.patience) == (
        defaults.epochs,
        defaults.batch_size,
        defaults.patience,
    )


OBJECTIVES_AS_CONDITIONS = """trials = 2
max_epochs = 6
patience = 2

[conditions]
labeled_fraction = [1.0, 0.1]
unlabeled = ["skip", "distill"]

[space]
lr = { low = 1e-4, high = 1e-2, log = true }

[[override]]
when = { unlabeled = "distill" }
max_epochs = 20
patience = 8
"""


def test_an_objective_as_a_condition_gives_full_labels_one_study_and_each_objective_its_own(tmp_path):
    """The tuning playbook's scientific parameter: each arm gets the study's whole search, and
    `unlabeled`, meaningless under full labels, does not split that condition in two."""
    semi = spec.parse(tmp_path / "semi.toml", OBJECTIVES_AS_CONDITIONS)
    assert [semi.study_name(c) for c in semi.condition_list()] == [
        "semi/labels=100%",
        "semi/labels=10%,unlabeled=skip",
        "semi/labels=10%,unlabeled=distill",
    ]
    trial = optuna.create_study().ask()
    full, skip, distill = (spec.suggest(trial, semi, c) for c in semi.condition_list())
    assert (full.unlabeled, skip.unlabeled, distill.unlabeled) == ("skip", "skip", "distill")
    assert [(c.epochs, c.patience) for c in (full, skip, distill)] == [(6, 2), (6, 2), (20, 8)]
    # --epochs caps every condition, the overridden ones too; their own patience stays.
    capped = [spec.suggest(trial, semi.overridden(max_epochs=3), c) for c in semi.condition_list()]
    assert [(c.epochs, c.patience) for c in capped] == [(3, 2), (3, 2), (3, 8)]


def test_an_override_fixes_training_parameters_for_its_conditions_over_the_files(tmp_path):
    """fraction.toml: each arm at the recipe `semi` tuned for it; the file's [fixed] elsewhere."""
    text = OBJECTIVES_AS_CONDITIONS.replace("[space]\nlr = { low = 1e-4, high = 1e-2, log = true }\n", "")
    text = text.replace("trials = 2", "trials = 1") + 'fixed = { arch = "adaptive", lr = 0.0009 }\n'
    text = text.replace("[conditions]", '[fixed]\narch = "plain"\nlr = 0.002\ndropout = 0.1\n\n[conditions]')
    fixed = spec.parse(tmp_path / "fixed.toml", text)
    full, skip, distill = fixed.condition_list()
    assert fixed.fixed_for(skip) == {"arch": "plain", "lr": 0.002, "dropout": 0.1}
    assert fixed.fixed_for(distill) == {"arch": "adaptive", "lr": 0.0009, "dropout": 0.1}
    trial = optuna.trial.FixedTrial({})
    configs = [spec.suggest(trial, fixed, c) for c in (full, skip, distill)]
    assert [(c.arch, c.lr, c.dropout, c.epochs) for c in configs] == [
        ("plain", 0.002, 0.1, 6), ("plain", 0.002, 0.1, 6), ("adaptive", 0.0009, 0.1, 20)
    ]  # fmt: skip
    # what the trials of a condition mean: its own fixed values, in its fingerprint
    config = data.DataConfig()
    assert lineage.fingerprint(fixed, distill, config)["fixed"]["lr"] == 0.0009
    assert lineage.fingerprint(fixed, skip, config)["fixed"]["lr"] == 0.002


def test_a_labeled_count_condition_is_named_by_its_count(tmp_path):
    text = "trials = 1\n[conditions]\nlabeled_count = [500, 5000]\n"
    counts = spec.parse(tmp_path / "counts.toml", text)
    assert [counts.study_name(c) for c in counts.condition_list()] == [
        "counts/labels=500",
        "counts/labels=5000",
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ('when = { unlabeled = "vat" }\npatience = 3', r"override\[0\]\.when\.unlabeled: 'vat' is not one"),
        ('when = { arch = "plain" }\npatience = 3', r"override\[0\]\.when\.arch: not a condition"),
        (
            'when = { unlabeled = "skip" }\nlr = 0.1',
            r"override\[0\]\.lr: unknown key; use when, fixed and max_epochs",
        ),
        (
            'when = { unlabeled = "skip" }',
            r"override\[0\]: sets nothing; give it max_epochs, patience or a fixed",
        ),
        (
            'when = { unlabeled = "skip" }\nfixed = 3',
            r"override\[0\]\.fixed: must be a table; write fixed = \{",
        ),
        (
            'when = { unlabeled = "skip" }\nfixed = { lrr = 0.1 }',
            r"override\[0\]\.fixed\.lrr: unknown parameter",
        ),
        (
            'when = { unlabeled = "skip" }\nfixed = { lr = 0.1 }',
            r"override\[0\]\.fixed\.lr: is searched in \[space\]",
        ),
        (
            'when = { unlabeled = "skip" }\nfixed = { dropout = 2.0 }',
            r"override\[0\]\.fixed\.dropout: 2\.0 is out of",
        ),
        (
            'when = { unlabeled = "skip" }\nfixed = { unlabeled = "distill" }',
            r"override\[0\]\.fixed\.unlabeled: decides what the conditions are",
        ),
        (
            'when = { labeled_fraction = 0.1 }\nfixed = { arch = "plain" }\n[[override]]\n'
            'when = { unlabeled = "skip" }\nfixed = { arch = "adaptive" }',
            r"override\[1\]: sets fixed\.arch for semi/labels=10%,unlabeled=skip as an earlier",
        ),
        ('when = { unlabeled = "skip" }\npatience = 0', r"override\[0\]\.patience: 0 is out of range"),
        (
            'when = { labeled_fraction = 0.1 }\npatience = 3\n[[override]]\nwhen = { unlabeled = "skip" }\n'
            "patience = 4",
            r"override\[1\]: sets patience for semi/labels=10%,unlabeled=skip as an earlier",
        ),
    ],
)
def test_a_bad_override_is_one_line_naming_it(tmp_path, override, message):
    text = OBJECTIVES_AS_CONDITIONS.split("[[override]]")[0] + "[[override]]\n" + override + "\n"
    with pytest.raises(spec.SpecError, match=message):
        spec.parse(tmp_path / "semi.toml", text)
