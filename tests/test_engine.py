import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

from fmsearch import data, engine
from fmsearch.errors import ConfigError
from fmsearch.models import build_model
from fmsearch.semi import HIDDEN, SemiBatchSampler, collate_marked, select_labeled
from tests.conftest import needs_real_data

FAST = engine.TrainConfig(epochs=3, batch_size=32, patience=None)


def test_loss_falls_and_accuracy_beats_chance_on_a_learnable_task(tiny_splits):
    result = engine.fit(replace(FAST, epochs=4), tiny_splits)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best["val_accuracy"] > 0.5  # chance is 0.1
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "epoch_seconds",
        "images_per_second",
    ):
        assert all(key in h for h in result.history)


def test_early_stopping_stops_at_patience_and_restores_the_best_weights(tiny_splits):
    config = replace(FAST, epochs=30, patience=2, monitor="val_accuracy", lr=3e-3)
    result = engine.fit(config, tiny_splits)
    assert result.stop_reason == "early-stopped"
    assert len(result.history) == result.best_epoch + 2
    accuracies = [h["val_accuracy"] for h in result.history]
    assert result.best["val_accuracy"] == max(accuracies)
    assert accuracies.index(max(accuracies)) + 1 == result.best_epoch  # the first epoch that reached it
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, result.best_state[name])
    scored = engine.evaluate(
        result.model, tiny_splits.val_images, tiny_splits.val_labels, tiny_splits.normalize
    )
    assert scored.accuracy == pytest.approx(result.best["val_accuracy"])


def test_early_stopping_counts_epochs_without_a_lower_validation_loss():
    stopper = engine.EarlyStopping(patience=3)
    reasons = [
        stopper(epoch, {"val_loss": loss})
        for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.72], 1)
    ]
    assert reasons == [None, None, None, None, None, None, "early-stopped"]


def test_a_dead_network_stops_at_chance_and_a_slow_learner_does_not():
    uniform = math.log(10)
    dead = engine.AtChance(10, epochs=3)
    assert [dead(e, {"val_loss": uniform * 1.002, "val_accuracy": 0.1}) for e in (1, 2, 3)] == [
        None,
        None,
        "at-chance",
    ]
    slow = engine.AtChance(10, epochs=3)  # one epoch out of the band: alive for good
    metrics = [(uniform, 0.1), (uniform * 0.97, 0.16), (uniform, 0.1), (uniform, 0.1)]
    assert [slow(e, {"val_loss": v, "val_accuracy": a}) for e, (v, a) in enumerate(metrics, 1)] == [None] * 4


def test_fit_stops_a_network_that_cannot_learn_at_chance(tiny_splits):
    """All-zero weights: every ReLU is 0 and passes no gradient, so the outputs stay uniform for good."""
    zero = {k: torch.zeros_like(v) for k, v in build_model("plain", 0.0).state_dict().items()}
    result = engine.fit(replace(FAST, epochs=8), tiny_splits, initial_state=zero)
    assert result.stop_reason == "at-chance" and len(result.history) == 5


def test_an_epoch_hook_can_stop_training_with_its_reason(tiny_splits):
    seen = []

    def stop_after_two(epoch, metrics):
        seen.append(metrics["val_accuracy"])
        return "pruned" if epoch == 2 else None

    result = engine.fit(replace(FAST, epochs=5), tiny_splits, hooks=[stop_after_two])
    assert result.stop_reason == "pruned" and len(result.history) == 2 and len(seen) == 2


def test_a_nan_loss_raises_divergence_at_once(tiny_splits):
    broken = replace(tiny_splits, std=0.0)  # every normalized pixel becomes inf or NaN
    with pytest.raises(engine.DivergenceError, match="NaN or inf in epoch 1.*lower the learning rate"):
        engine.fit(FAST, broken)


def test_same_seed_gives_identical_metrics_on_cpu(tiny_splits):
    config = replace(FAST, epochs=2, augment=True)
    first, second = engine.fit(config, tiny_splits), engine.fit(config, tiny_splits)
    other = engine.fit(replace(config, seed=1), tiny_splits)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert [[h[k] for k in keys] for h in first.history] == [[h[k] for k in keys] for h in second.history]
    assert [h["train_loss"] for h in first.history] != [h["train_loss"] for h in other.history]


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_dataloader_and_device_loader_yield_the_same_batches(tiny_splits, fraction):
    subset = select_labeled(tiny_splits.train_labels, fraction=fraction, seed=0)
    sampler = SemiBatchSampler(subset.labeled, subset.unlabeled, 48, seed=5)
    dataset = TensorDataset(tiny_splits.train_images, subset.targets)
    plain = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_marked)
    fast = engine.DeviceLoader(tiny_splits.train_images, subset.targets, sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected = list(plain)
        sampler.set_epoch(epoch)
        got = list(fast)
        assert len(got) == len(expected) == len(sampler)
        for (images, targets, labeled), batch in zip(expected, got, strict=True):
            assert batch.labeled == labeled
            assert torch.equal(batch.images, images)
            if labeled:
                assert torch.equal(batch.targets, targets)
            else:
                assert batch.targets is None and bool((targets == HIDDEN).all())


def test_device_loader_does_not_gather_skipped_unlabeled_batches(tiny_splits):
    subset = select_labeled(tiny_splits.train_labels, fraction=0.2, seed=0)
    sampler = SemiBatchSampler(subset.labeled, subset.unlabeled, 32, seed=0)
    loader = engine.DeviceLoader(tiny_splits.train_images, subset.targets, sampler, gather_unlabeled=False)
    batches = list(loader)
    assert all(b.images is None for b in batches if not b.labeled)
    assert sum(len(b.indices) for b in batches if b.labeled) == len(subset.labeled)


def test_pseudo_takes_one_optimizer_step_per_labeled_batch(tiny_splits):
    """Unlabeled batches add their gradients to the next labeled step (FixMatch's combined step)."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        config = replace(FAST, epochs=2, labeled_fraction=0.2, unlabeled="pseudo", tau=0.0)
        result = engine.fit(config, tiny_splits)
    finally:
        handle.remove()
    subset = select_labeled(tiny_splits.train_labels, fraction=0.2, seed=0)
    sampler = SemiBatchSampler(subset.labeled, subset.unlabeled, FAST.batch_size)
    assert sampler.unlabeled_batches > 2 * sampler.labeled_batches
    assert len(steps) == 2 * sampler.labeled_batches
    assert result.history[-1]["mask_rate"] == 1.0  # tau 0: every unlabeled sample was used


@pytest.mark.parametrize("unlabeled,alone", [("distill", True), ("vat", False)])
def test_distill_steps_on_every_batch_and_vat_adds_to_the_labeled_step(tiny_splits, unlabeled, alone):
    """A student learns the teachers' targets as it would labels; vat is a term of the labeled step."""
    steps = []
    probs = torch.full((len(tiny_splits.train_labels), 10), 0.1)
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        config = replace(FAST, epochs=2, labeled_fraction=0.2, unlabeled=unlabeled)
        engine.fit(config, tiny_splits, teacher_probs=probs)
    finally:
        handle.remove()
    subset = select_labeled(tiny_splits.train_labels, fraction=0.2, seed=0)
    sampler = SemiBatchSampler(subset.labeled, subset.unlabeled, FAST.batch_size)
    assert len(steps) == 2 * (len(sampler) if alone else sampler.labeled_batches)


def test_distill_without_targets_is_refused(tiny_splits):
    with pytest.raises(ValueError, match="teachers"):
        engine.fit(replace(FAST, labeled_fraction=0.2, unlabeled="distill"), tiny_splits)


def test_both_monitors_keep_their_best_epoch_and_ema_is_scored(tiny_splits):
    config = replace(FAST, epochs=4, patience=None, ema=0.9, optimizer="sgd", nesterov=True, lr=0.05)
    result = engine.fit(config, tiny_splits)
    losses = [h["val_loss"] for h in result.history]
    accuracies = [h["val_accuracy"] for h in result.history]
    assert result.best_by["val_loss"][0] == 1 + losses.index(min(losses))
    assert result.best_by["val_accuracy"][0] == 1 + accuracies.index(max(accuracies))
    assert all("ema_val_accuracy" in h for h in result.history)
    scores = engine.score_by_monitor(result, tiny_splits, config)
    assert set(scores) == {"val_loss", "val_accuracy", "ema_last"}
    assert all(0.0 <= s["test_accuracy"] <= 1.0 and len(s["test_recall"]) == 10 for s in scores.values())
    live = dict(result.model.named_parameters())
    assert any(not torch.equal(p, live[n]) for n, p in result.ema_model.named_parameters())


def test_the_moving_average_records_no_autograd_history(tiny_splits):
    result = engine.fit(replace(FAST, epochs=1, ema=0.9), tiny_splits)
    assert all(p.grad_fn is None and not p.requires_grad for p in result.ema_model.parameters())


def test_keep_ema_validates_picks_and_returns_the_moving_average(tiny_splits):
    config = replace(FAST, epochs=3, ema=0.9, keep_ema=True, optimizer="sgd", lr=0.05)
    result = engine.fit(config, tiny_splits)
    assert result.ema_model is None  # the average is the model
    assert all({"live_val_loss", "live_val_accuracy"} <= set(h) for h in result.history)
    assert not any("ema_val_accuracy" in h for h in result.history)
    best = result.best
    scored = engine.evaluate(
        result.model, tiny_splits.val_images, tiny_splits.val_labels, tiny_splits.normalize
    )
    assert scored.accuracy == best["val_accuracy"] and math.isclose(
        scored.loss, best["val_loss"], rel_tol=1e-5
    )
    # The live weights of the same run score differently: what was kept is the average.
    live = replace(config, keep_ema=False)
    assert [h["val_loss"] for h in engine.fit(live, tiny_splits).history] == [
        h["live_val_loss"] for h in result.history
    ]


def test_keep_ema_without_an_average_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="set ema too, e.g. 0.999"):
        engine.TrainConfig(keep_ema=True)


def test_a_warm_start_begins_from_the_weights_it_is_given(tiny_splits):
    first = engine.fit(replace(FAST, epochs=2), tiny_splits)
    state = {k: v.clone() for k, v in first.model.state_dict().items()}
    frozen = replace(FAST, epochs=1, lr=1e-12, optimizer="sgd")  # a step this small changes nothing
    warm = engine.fit(frozen, tiny_splits, initial_state=state)
    cold = engine.fit(frozen, tiny_splits)
    assert math.isclose(warm.best["val_loss"], first.best["val_loss"], rel_tol=1e-4)
    assert warm.best["val_loss"] != cold.best["val_loss"]


def test_distill_on_the_labeled_images_never_reads_an_unlabeled_target(tiny_splits):
    """The ablation: soft-target batches over the labeled images, one per labeled batch."""
    subset = select_labeled(tiny_splits.train_labels, fraction=0.2, seed=0)
    probs = torch.full((len(tiny_splits.train_labels), 10), 0.1)
    probs[subset.unlabeled] = float("nan")  # any read of an unlabeled image's target diverges
    config = replace(FAST, epochs=2, labeled_fraction=0.2, unlabeled="distill")
    with pytest.raises(engine.DivergenceError):
        engine.fit(config, tiny_splits, teacher_probs=probs)
    steps = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        result = engine.fit(replace(config, distill_on="labeled"), tiny_splits, teacher_probs=probs)
    finally:
        handle.remove()
    assert all(math.isfinite(h["unlabeled_loss"]) for h in result.history)
    sampler = SemiBatchSampler(subset.labeled, subset.unlabeled, FAST.batch_size)
    assert len(steps) == 2 * 2 * sampler.labeled_batches  # 2 epochs of labeled and soft-target batches


def test_early_stopping_waits_for_the_end_of_the_warm_up(tiny_splits):
    # At this rate the weights never change, so validation loss never improves after epoch 1.
    frozen = replace(FAST, epochs=6, patience=1, lr=1e-12, labeled_fraction=0.5)
    assert len(engine.fit(frozen, tiny_splits).history) == 2
    warm = replace(frozen, unlabeled="pseudo", warmup_epochs=3)
    assert len(engine.fit(warm, tiny_splits).history) == 5  # 3 warm-up epochs, then patience 1


def test_step_schedule_divides_the_rate_by_ten_after_epochs_3_and_7(tiny_splits):
    config = replace(FAST, epochs=8, schedule="step", optimizer="sgd", lr=0.01, batch_size=250)
    rates = [h["lr"] for h in engine.fit(config, tiny_splits).history]
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.001, 0.001, 0.0001, 0.0001])


def test_best_weights_load_back_with_weights_only(tiny_splits, tmp_path):
    result = engine.fit(replace(FAST, epochs=1), tiny_splits)
    torch.save(result.best_state, tmp_path / "best.pt")
    model = build_model("plain", 0.25)
    model.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True))
    before = engine.evaluate(
        result.model, tiny_splits.test_images, tiny_splits.test_labels, tiny_splits.normalize
    )
    after = engine.evaluate(model, tiny_splits.test_images, tiny_splits.test_labels, tiny_splits.normalize)
    assert after.accuracy == before.accuracy and torch.equal(after.predictions, before.predictions)
    assert after.predictions.shape == tiny_splits.test_labels.shape


def _fit_watching_convolutions(config, splits):
    """Fit `config`, recording (input, output) of every Conv2d call in training mode."""
    seen = []

    def watch(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.training:
            seen.append((inputs[0], output))

    handle = register_module_forward_hook(watch)
    try:
        result = engine.fit(config, splits)
    finally:
        handle.remove()
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history)
    return result, seen


def test_bf16_autocast_runs_on_the_cpu(tiny_splits):
    result, seen = _fit_watching_convolutions(replace(FAST, epochs=1, amp=True), tiny_splits)
    assert seen and all(output.dtype == torch.bfloat16 for _, output in seen)
    assert result.best["val_accuracy"] > 0.3  # chance is 0.1


def test_channels_last_runs_on_the_cpu(tiny_splits):
    result, seen = _fit_watching_convolutions(replace(FAST, epochs=1, channels_last=True), tiny_splits)
    wide_inputs = [x for x, _ in seen if x.shape[1] > 1]  # one channel is laid out the same either way
    assert wide_inputs and all(x.is_contiguous(memory_format=torch.channels_last) for x in wide_inputs)
    assert not any(x.is_contiguous() for x in wide_inputs)
    assert result.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert result.best["val_accuracy"] > 0.3


@pytest.mark.slow  # compiling takes 30-50 s on 2 CPU cores
def test_torch_compile_runs_on_the_cpu(tiny_splits):
    from torch._dynamo.utils import counters  # torch's own count of the graphs it compiled

    torch._dynamo.reset()
    counters.clear()
    # One graph: batches of 40 divide the 1,000-image pool, so no short last batch recompiles it, and
    # float32 whatever this machine chose (compiling bf16 autocast took 87 s in the suite on an Intel
    # Xeon with AMX, 2026-12-02).
    assert len(tiny_splits.train_labels) % 40 == 0
    config = replace(FAST, epochs=1, batch_size=40, compile=True, amp=False, channels_last=False)
    result = engine.fit(config, tiny_splits)
    assert counters["stats"]["unique_graphs"] >= 1
    eager = engine.fit(replace(config, compile=False), tiny_splits)
    # Fused kernels round differently, so 32 steps drift a little; a broken graph would not be this close.
    assert result.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=0.02)


def test_bad_configuration_is_refused_by_name():
    with pytest.raises(ValueError, match="dropout must be in"):
        engine.TrainConfig(dropout=1.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        engine.TrainConfig(optimizer="rmsprop")
    for name in ("lr", "weight_decay", "lambda_u", "temperature", "vat_eps", "vat_xi", "entropy_weight"):
        for value in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                engine.TrainConfig(**{name: value})


def test_asking_for_an_absent_gpu_says_how_to_fix_it():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
        engine.resolve_device("cuda")


@needs_real_data
@pytest.mark.slow
def test_a_short_run_on_real_fashion_mnist_learns(tmp_path):
    splits = data.load_splits(data.DataConfig(pool_limit=6000), torch.device("cpu"))
    result = engine.fit(engine.TrainConfig(epochs=1, patience=None), splits)
    assert result.best["val_accuracy"] > 0.7


def test_the_confusion_counts_match_scikit_learns():
    from sklearn.metrics import confusion_matrix

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=generator)
    guesses = torch.randint(0, 10, (500,), generator=generator)
    predictions = torch.where(torch.rand(500, generator=generator) < 0.7, labels, guesses)
    evaluation = engine.Evaluation(loss=0.0, accuracy=0.0, predictions=predictions)
    expected = confusion_matrix(labels.numpy(), predictions.numpy(), labels=list(range(10))).tolist()
    assert engine.confusion(evaluation, labels) == expected
