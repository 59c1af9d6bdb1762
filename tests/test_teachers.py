from dataclasses import replace

import torch

from fmsearch import engine, teachers
from fmsearch.models import build_model

CONFIG = engine.TrainConfig(
    batch_size=32, labeled_fraction=0.2, unlabeled="distill", teachers=2, teacher_epochs=2, patience=None
)


def build(splits, cache, config=CONFIG):
    lines = []
    subset = engine.make_subset(config, splits)
    team = teachers.build(config, splits, subset, cache, log=lines.append)
    return team, lines


def test_teachers_are_trained_once_then_read_from_the_cache(tiny_splits, tmp_path):
    first, trained = build(tiny_splits, tmp_path)
    second, loaded = build(tiny_splits, tmp_path)
    assert all("training" in line for line in trained) and len(trained) == 2
    assert all("from the cache" in line for line in loaded) and len(loaded) == 2
    assert torch.equal(first.probs, second.probs)
    assert first.seconds == second.seconds > 0 and first.epochs == second.epochs == 4


def test_a_changed_key_trains_new_teachers(tiny, tiny_splits, tmp_path):
    build(tiny_splits, tmp_path)
    changes = {
        "teacher epochs": (replace(CONFIG, teacher_epochs=3), tiny_splits),
        "labeled subset (seed)": (replace(CONFIG, seed=1), tiny_splits),
        "labeled fraction": (replace(CONFIG, labeled_fraction=0.3), tiny_splits),
        "architecture": (replace(CONFIG, arch="adaptive"), tiny_splits),
        "pool slice": (CONFIG, tiny.splits(pool_limit=800)),
        "split seed": (CONFIG, tiny.splits(split_seed=1)),
    }
    for what, (config, splits) in changes.items():
        _, lines = build(splits, tmp_path, config)
        assert lines and all("training" in line for line in lines), what
    # More teachers reuse the ones already trained and train only the new one.
    _, lines = build(tiny_splits, tmp_path, replace(CONFIG, teachers=3))
    assert [("cache" in line) for line in lines] == [True, True, False]


def test_targets_are_probabilities_aligned_to_an_even_class_mix(tiny_splits, tmp_path):
    team, _ = build(tiny_splits, tmp_path)
    subset = engine.make_subset(CONFIG, tiny_splits)
    assert torch.allclose(team.probs.sum(1), torch.ones(len(team.probs)))
    mix = team.probs[subset.unlabeled].mean(0)
    assert (mix - 0.1).abs().max() < 0.02
    unaligned, _ = build(tiny_splits, tmp_path, replace(CONFIG, align=False))
    assert (unaligned.probs[subset.unlabeled].mean(0) - 0.1).abs().max() > (mix - 0.1).abs().max()


def test_teacher_zero_is_the_labels_only_control_of_the_same_seed(tiny_splits):
    student = replace(CONFIG, seed=2, arch="plain")
    teacher = teachers.recipe(student, 0)
    assert teacher.seed == student.seed and teacher.unlabeled == "skip" and teacher.arch == student.arch
    assert engine.make_subset(teacher, tiny_splits).labeled.equal(
        engine.make_subset(student, tiny_splits).labeled
    )
    assert len({teachers.recipe(student, k).seed for k in range(4)}) == 4  # each teacher its own seed


def test_the_mirror_is_averaged_in_only_for_teachers_that_trained_on_flips(tiny_splits, tmp_path):
    plain = replace(CONFIG, arch="plain")  # the plain recipe augments with flips
    adaptive = replace(CONFIG, arch="adaptive")  # the adaptive recipe does not
    with_mirror, _ = build(tiny_splits, tmp_path, plain)
    without, _ = build(tiny_splits, tmp_path, replace(plain, tta=False))
    assert not torch.equal(with_mirror.probs, without.probs)
    with_mirror, _ = build(tiny_splits, tmp_path, adaptive)
    without, _ = build(tiny_splits, tmp_path, replace(adaptive, tta=False))
    assert torch.equal(with_mirror.probs, without.probs)


def test_a_damaged_cache_entry_is_named_and_trained_again(tiny_splits, tmp_path):
    """A logits file cut to nothing (a crash before fsync) and a record cut short: each is retrained."""
    first, _ = build(tiny_splits, tmp_path)
    logits = sorted(tmp_path.glob("*-logits.pt"))
    records = sorted(p for p in tmp_path.glob("*.json"))
    logits[0].write_bytes(b"")
    records[1].write_text(records[1].read_text()[:20])
    again, lines = build(tiny_splits, tmp_path)
    damaged = [line for line in lines if "cache entry" in line]
    assert len(damaged) == 2 and all(line.endswith("): training it again") for line in damaged)
    assert f"cache entry {records[0].name} is unreadable (" in damaged[0]
    assert f"cache entry {records[1].name} is unreadable (JSONDecodeError)" in damaged[1]
    assert torch.equal(first.probs, again.probs)  # the same recipe and seed train the same teachers
    _, lines = build(tiny_splits, tmp_path)
    assert all("from the cache" in line for line in lines)


def test_each_noisy_student_round_is_taught_by_the_student_before_it(tiny_splits, tmp_path):
    """rounds = 2: a first student learns the teachers' targets, relabels the pool, and the student
    that is returned learns those; the first student's scores are recorded beside the teachers'."""
    from fmsearch import runner

    config = replace(CONFIG, epochs=2, rounds=2)
    lines = []
    two = runner.run(config, tiny_splits, tmp_path, log=lines.append)
    one = runner.run(replace(config, rounds=1), tiny_splits, tmp_path)
    assert sum("student round 1 of 2" in line for line in lines) == 1
    (first,) = two.team.rounds
    assert first["epochs"] == 2 and 0 < first["val_accuracy"] <= 1 and 0 < first["target_accuracy"] <= 1
    assert runner.teachers_record(two.team)["rounds"] == [first] and one.team.rounds == []
    # The first round is rounds = 1's student itself, so the returned students differ only by targets.
    assert first["val_accuracy"] == one.result.best["val_accuracy"]
    assert two.result.history != one.result.history


def test_a_student_relabels_the_pool_with_its_aligned_mirror_averaged_predictions(tiny_splits, tmp_path):
    subset = engine.make_subset(CONFIG, tiny_splits)
    student = engine.fit(replace(CONFIG, unlabeled="skip", epochs=1), tiny_splits, subset=subset)
    run = student.execution
    targets = teachers.student_targets(student.model, CONFIG, tiny_splits, subset, run)
    assert targets.shape == (len(tiny_splits.train_labels), 10)
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    assert (targets[subset.unlabeled].mean(0) - 0.1).abs().max() < 0.02  # aligned
    logits = engine.logits_of(student.model, tiny_splits.train_images, tiny_splits.normalize, run)
    mirrored = engine.logits_of(
        student.model, tiny_splits.train_images, lambda x: tiny_splits.normalize(x).flip(-1), run
    )
    raw = (logits.softmax(1) + mirrored.softmax(1)) / 2
    unaligned = teachers.student_targets(
        student.model, replace(CONFIG, align=False), tiny_splits, subset, run
    )
    assert torch.allclose(unaligned, raw, atol=1e-6)


def test_a_field_only_an_unlabeled_objective_reads_leaves_the_teachers_key_alone(tiny_splits):
    teacher = teachers.recipe(CONFIG, 0)
    subset = engine.make_subset(CONFIG, tiny_splits)
    key = teachers.cache_key(teacher, tiny_splits, subset)
    for noise in ({"mixup": 0.5}, {"student_view": "strong"}, {"rounds": 3}, {"amp": True}):
        assert teachers.cache_key(replace(teacher, **noise), tiny_splits, subset) == key, noise
    assert teachers.cache_key(replace(teacher, lr=0.01), tiny_splits, subset) != key


def test_a_field_added_since_the_keys_were_made_leaves_them_alone_at_its_default(tiny_splits):
    teacher = teachers.recipe(CONFIG, 0)
    subset = engine.make_subset(CONFIG, tiny_splits)
    key = teachers.cache_key(teacher, tiny_splits, subset)
    for new in ({"warm_start": True}, {"distill_on": "labeled"}, {"keep_ema": False}):
        assert teachers.cache_key(replace(teacher, **new), tiny_splits, subset) == key, new
    assert teachers.cache_key(replace(teacher, ema=0.9, keep_ema=True), tiny_splits, subset) != key


WARM = replace(CONFIG, unlabeled="pseudo", warm_start=True, teachers=5)


def test_a_warm_start_asks_for_teacher_zero_alone():
    assert teachers.count(CONFIG) == 2 and teachers.count(WARM) == 1
    assert teachers.count(replace(WARM, warm_start=False)) == 0
    assert teachers.count(replace(CONFIG, unlabeled="skip")) == 0


def test_a_warm_start_gets_distills_teacher_zero_and_its_weights_from_the_cache(tiny_splits, tmp_path):
    distill, _ = build(tiny_splits, tmp_path)  # trains teachers 0 and 1
    warm, lines = build(tiny_splits, tmp_path, WARM)
    assert lines == [line for line in lines if "from the cache" in line] and len(lines) == 1
    assert warm.members == distill.members[:1]
    model = build_model(CONFIG.arch, CONFIG.dropout)
    model.load_state_dict(warm.control_state)
    accuracy = engine.evaluate(model, tiny_splits.val_images, tiny_splits.val_labels, tiny_splits.normalize)
    assert accuracy.accuracy == warm.members[0]["val_accuracy"]
    assert distill.control_state is None  # distill never reads the weights


def test_unreadable_weights_are_named_and_the_control_trained_again(tiny_splits, tmp_path):
    first, _ = build(tiny_splits, tmp_path, WARM)
    (state,) = [p for p in tmp_path.glob("*.pt") if not p.name.endswith("-logits.pt")]
    state.write_bytes(b"cut")
    again, lines = build(tiny_splits, tmp_path, WARM)
    assert len(lines) == 2 and "has unreadable weights (" in lines[0] and "training up to" in lines[1]
    assert all(torch.equal(v, again.control_state[k]) for k, v in first.control_state.items())


def test_a_warm_started_pseudo_run_begins_where_the_control_ended(tiny_splits, tmp_path):
    from fmsearch import runner

    control, _ = build(tiny_splits, runner.teachers_dir(tmp_path), WARM)
    frozen = replace(WARM, epochs=1, lr=1e-12, optimizer="sgd", tau=1.0)  # steps too small to move
    run = runner.run(frozen, tiny_splits, tmp_path)
    assert run.team.members == control.members
    assert run.result.history[0]["val_accuracy"] == control.members[0]["val_accuracy"]
    cold = runner.run(replace(frozen, warm_start=False), tiny_splits, tmp_path)
    assert cold.team is None
    assert cold.result.history[0]["val_accuracy"] != run.result.history[0]["val_accuracy"]


def test_under_the_student_recipe_teacher_zero_is_the_labels_only_run_of_the_same_configuration():
    student = replace(CONFIG, arch="adaptive", lr=3e-3, dropout=0.1, weight_decay=1e-4, augment=True)
    control = teachers.recipe(student, 0)
    assert (control.lr, control.dropout, control.weight_decay, control.augment) == (1e-3, 0.25, 0.0, False)
    own = teachers.recipe(replace(student, teacher_recipe="student"), 0)
    assert (own.lr, own.dropout, own.weight_decay, own.augment) == (3e-3, 0.1, 1e-4, True)
    assert (own.unlabeled, own.epochs, own.patience, own.seed) == ("skip", 2, 5, student.seed)
    # A student at the control's own settings gets the control's teachers under either recipe, and
    # so reads the same cache entries.
    default = replace(CONFIG, arch="plain", augment=True, schedule="cosine")
    assert teachers.recipe(replace(default, teacher_recipe="student"), 1) == teachers.recipe(default, 1)
