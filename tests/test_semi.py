import inspect
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fmsearch import engine
from fmsearch.models import build_model
from fmsearch.semi import (
    HIDDEN,
    PseudoLabel,
    SemiBatchSampler,
    Skip,
    collate_marked,
    pseudo_label_accuracy,
    select_labeled,
    strong_augment,
    weak_augment,
)

CASES = [
    (n_l, n_u, bs, seed)
    for n_l, n_u, bs in [(10, 90, 8), (64, 576, 64), (7, 0, 3), (33, 100, 10), (1, 50, 4), (100, 1, 16)]
    for seed in range(5)
]


def batches_of(sampler):
    return [list(b) for b in sampler]


@pytest.mark.parametrize("n_labeled,n_unlabeled,batch_size,seed", CASES)
def test_every_batch_is_all_labeled_or_all_unlabeled_and_covers_each_index_once(
    n_labeled, n_unlabeled, batch_size, seed
):
    labeled, unlabeled = list(range(n_labeled)), list(range(1000, 1000 + n_unlabeled))
    sampler = SemiBatchSampler(labeled, unlabeled, batch_size, seed=seed)
    for _ in range(2):  # two epochs
        batches = batches_of(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            kinds = {i < 1000 for i in batch}
            assert len(kinds) == 1
            assert 1 <= len(batch) <= batch_size
        flat = sorted(i for b in batches for i in b)
        assert flat == sorted(labeled + unlabeled)


@pytest.mark.parametrize("n_labeled,n_unlabeled,batch_size,seed", CASES)
def test_drop_last_drops_only_the_short_batch_of_each_kind(n_labeled, n_unlabeled, batch_size, seed):
    sampler = SemiBatchSampler(
        range(n_labeled), range(1000, 1000 + n_unlabeled), batch_size, seed=seed, drop_last=True
    )
    batches = batches_of(sampler)
    assert len(batches) == len(sampler) == n_labeled // batch_size + n_unlabeled // batch_size
    assert all(len(b) == batch_size for b in batches)


def test_labeled_batches_are_spread_evenly_among_unlabeled_ones():
    sampler = SemiBatchSampler(range(500), range(1000, 5500), 50, seed=1)  # 10 labeled, 90 unlabeled batches
    for _ in range(3):
        positions = [i for i, b in enumerate(sampler) if b[0] < 1000]
        gaps = np.diff([-1, *positions, 100])
        assert len(positions) == 10
        assert gaps.max() <= math.ceil(100 / 10) + 1
        assert positions[0] < 11 and positions[-1] > 88


def test_order_is_reshuffled_each_epoch_and_deterministic_from_the_seed():
    first = SemiBatchSampler(range(40), range(100, 400), 16, seed=7)
    second = SemiBatchSampler(range(40), range(100, 400), 16, seed=7)
    other = SemiBatchSampler(range(40), range(100, 400), 16, seed=8)
    epoch1, epoch2 = batches_of(first), batches_of(first)
    assert epoch1 != epoch2
    assert batches_of(second) == epoch1 and batches_of(second) == epoch2
    assert batches_of(other) != epoch1
    second.set_epoch(1)
    assert batches_of(second) == epoch2


@pytest.mark.parametrize("n_labeled,n_unlabeled,batch_size,seed", CASES[::5])
def test_an_epoch_is_one_index_tensor_cut_into_the_same_batches(n_labeled, n_unlabeled, batch_size, seed):
    labeled, unlabeled = torch.arange(n_labeled), torch.arange(1000, 1000 + n_unlabeled)
    tensors = SemiBatchSampler(labeled, unlabeled, batch_size, seed=seed)
    lists = SemiBatchSampler(labeled, unlabeled, batch_size, seed=seed)
    for _ in range(2):
        flat, sizes, kinds = tensors.next_epoch()
        batches = batches_of(lists)
        assert flat.dtype == torch.int64 and sum(sizes) == len(flat)
        assert [chunk.tolist() for chunk in flat.split(sizes)] == batches
        assert kinds == [batch[0] < 1000 for batch in batches]


def test_works_unchanged_in_a_dataloader_and_marks_each_batch():
    images = torch.arange(300, dtype=torch.uint8).repeat_interleave(4).view(300, 2, 2)
    targets = torch.full((300,), HIDDEN)
    targets[:60] = torch.arange(60) % 10
    sampler = SemiBatchSampler(range(60), range(60, 300), 32, seed=0)
    loader = DataLoader(TensorDataset(images, targets), batch_sampler=sampler, collate_fn=collate_marked)
    seen = 0
    for _images, batch_targets, labeled in loader:
        assert labeled == bool((batch_targets != HIDDEN).all())
        assert labeled or bool((batch_targets == HIDDEN).all())
        seen += len(batch_targets)
    assert seen == 300


def test_labeled_subset_is_stratified_within_one_sample():
    labels = torch.tensor([c for c in range(10) for _ in range(100 + 13 * c)])
    for fraction in (0.01, 0.1, 0.37):
        subset = select_labeled(labels, fraction=fraction, seed=0)
        counts = torch.bincount(labels[subset.labeled], minlength=10).float()
        share = torch.bincount(labels, minlength=10).float() * len(subset.labeled) / len(labels)
        assert (counts - share).abs().max() <= 1.0
    assert len(select_labeled(labels, count=123, seed=0).labeled) == 123


def test_subset_is_deterministic_and_hides_unlabeled_targets():
    labels = torch.arange(1000) % 10
    a, b = select_labeled(labels, fraction=0.1, seed=1), select_labeled(labels, fraction=0.1, seed=1)
    c = select_labeled(labels, fraction=0.1, seed=2)
    assert torch.equal(a.labeled, b.labeled) and not torch.equal(a.labeled, c.labeled)
    assert (a.targets[a.unlabeled] == HIDDEN).all()
    assert torch.equal(a.targets[a.labeled], labels[a.labeled])
    full = select_labeled(labels, fraction=1.0, seed=0)
    assert len(full.unlabeled) == 0 and (full.targets != HIDDEN).all()


def test_bad_fraction_or_count_is_refused():
    labels = torch.arange(100) % 10
    with pytest.raises(ValueError, match="fraction"):
        select_labeled(labels, fraction=0.0)
    with pytest.raises(ValueError, match="count"):
        select_labeled(labels, count=101)


def test_augmentations_are_batched_shape_preserving_and_seeded():
    x = torch.rand(16, 1, 28, 28)
    for augment in (weak_augment, strong_augment):
        a = augment(x, torch.Generator().manual_seed(0))
        b = augment(x, torch.Generator().manual_seed(0))
        assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
        assert a.min() >= 0 and a.max() <= 1


def test_the_strong_view_cuts_no_holes():
    """A hole turns a sneaker into a sandal; the strong view warps and shades but never erases."""
    white = torch.ones(256, 1, 28, 28)
    views = strong_augment(white, torch.Generator().manual_seed(0))
    # Rotation, scale and a 3-pixel shift keep the centre covered; cutout would black out some of it.
    assert views[:, :, 9:19, 9:19].amin() > 0.5
    assert not torch.equal(views[0], views[1])


def _normalize(images):
    return images.unsqueeze(1).float() / 255.0 if images.dtype == torch.uint8 else images


def _pool_and_model(n=300):
    torch.manual_seed(0)
    pool = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    return pool, build_model("plain", 0.0)


def test_debias_counts_the_class_mix_of_confident_predictions_and_keeps_it_current():
    pool, model = _pool_and_model()
    unlabeled = torch.arange(50, 300)
    objective = PseudoLabel(tau=0.0, lambda_u=1.0)  # tau 0: every prediction counts
    objective.start(model, pool, unlabeled, _normalize)
    with torch.no_grad():
        model.eval()
        predicted = model(_normalize(pool[unlabeled])).argmax(dim=1)
        model.train()
    assert objective.counts[0] == 0
    assert objective.counts[1:].tolist() == torch.bincount(predicted, minlength=10).float().tolist()
    assert (objective.status[:50] == HIDDEN).all()  # labeled samples are not counted
    prior = objective.class_prior()
    assert prior.sum().item() == pytest.approx(1.0) and (prior > 0).all()

    objective.tau = 0.99  # now almost nothing is confident: the counts must follow each batch
    batch = unlabeled[:64]
    step = objective(model, batch, pool[batch], _normalize, torch.Generator().manual_seed(0))
    assert objective.counts.sum() == len(unlabeled)
    recount = torch.bincount(objective.status[unlabeled] + 1, minlength=11)
    assert objective.counts.tolist() == recount.float().tolist()
    assert torch.equal(objective.status[batch], step.pseudo_labels)


def test_debias_leaves_the_loss_alone_when_the_class_mix_is_even():
    pool, model = _pool_and_model()
    unlabeled = torch.arange(300)
    model.eval()  # no dropout: the two calls must see the same network
    losses = []
    for debias in (False, True):
        objective = PseudoLabel(tau=0.0, lambda_u=1.0, debias=debias)
        objective.start(model, pool, unlabeled, _normalize)
        if debias:
            objective.counts[1:] = 30.0  # an even mix
        step = objective(model, unlabeled[:64], pool[:64], _normalize, torch.Generator().manual_seed(1))
        losses.append(step.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_debias_stops_common_pseudo_labels_from_pushing_down_a_rare_class():
    """With 'shirt' (6) nearly absent from the confident pseudo-labels, plain cross-entropy on them
    lowers the shirt logit everywhere; the debiased loss must push it down less, or raise it."""
    pool, model = _pool_and_model()
    unlabeled = torch.arange(300)
    model.eval()
    grads = {}
    for debias in (False, True):
        objective = PseudoLabel(tau=0.0, lambda_u=1.0, debias=debias)
        objective.start(model, pool, unlabeled, _normalize)
        if debias:
            objective.counts[1:] = 100.0
            objective.counts[1 + 6] = 1.0
        model.zero_grad()
        step = objective(model, unlabeled[:128], pool[:128], _normalize, torch.Generator().manual_seed(2))
        step.loss.backward()
        grads[debias] = model.fc2.bias.grad[6].item()
    assert grads[True] < grads[False]  # gradient descent lowers the logit by lr * grad


def test_pseudo_label_accuracy_counts_only_kept_labels():
    record = torch.tensor([HIDDEN, 1, 2, 3, HIDDEN])
    hidden = torch.tensor([0, 1, 2, 0, 4])
    assert pseudo_label_accuracy(record, hidden) == (pytest.approx(2 / 3), 3)
    assert math.isnan(pseudo_label_accuracy(torch.full((3,), HIDDEN), hidden[:3])[0])


def test_scrambling_hidden_labels_leaves_training_bit_identical(tiny):
    splits = tiny.splits()
    subset = select_labeled(splits.train_labels, fraction=0.2, seed=0)
    scrambled_labels = splits.train_labels.clone()
    scrambled_labels[subset.unlabeled] = (scrambled_labels[subset.unlabeled] + 3) % 10
    scrambled_subset = replace(subset, hidden=scrambled_labels)
    scrambled_splits = replace(splits, train_labels=scrambled_labels)
    config = engine.TrainConfig(
        epochs=2, batch_size=32, labeled_fraction=0.2, unlabeled="pseudo", tau=0.5, patience=None
    )
    a = engine.fit(config, splits, subset=subset)
    b = engine.fit(config, scrambled_splits, subset=scrambled_subset)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "unlabeled_loss", "mask_rate"):
        assert [h[key] for h in a.history] == [h[key] for h in b.history]
    for name, tensor in a.best_state.items():
        assert torch.equal(tensor, b.best_state[name])
    # Only the after-the-fact report differs: it reads the (scrambled) hidden labels.
    assert a.history[-1]["pseudo_accuracy"] != b.history[-1]["pseudo_accuracy"]


def test_pseudo_labels_beat_skipping_on_a_small_learnable_task(textures):
    """50 labels of 400: after 6 labeled-only epochs, pseudo-labels must add at least 3 points.

    One optimizer step per labeled batch means 5 steps an epoch here, so the run needs 18
    semi-supervised epochs to take 90 steps; 8 (40 steps) were too few to show anything.
    """
    splits = textures.splits(pool_limit=400)
    results = {}
    for unlabeled in ("skip", "pseudo"):
        accuracies = []
        for seed in range(3):
            config = engine.TrainConfig(
                epochs=24,
                batch_size=10,
                lr=2e-3,
                schedule="cosine",
                labeled_count=50,
                unlabeled=unlabeled,
                tau=0.9,
                lambda_u=1.0,
                warmup_epochs=6,
                patience=None,
                seed=seed,
                monitor="val_accuracy",
            )
            accuracies.append(engine.fit(config, splits).best["val_accuracy"])
        results[unlabeled] = np.mean(accuracies)
    assert results["pseudo"] > results["skip"] + 0.03, results


@pytest.mark.parametrize("objective", [Skip, PseudoLabel])
def test_an_objective_is_built_from_the_config_fields_declared_for_it(objective):
    """Each objective's constructor takes exactly the TrainConfig fields that name it (params' objectives)."""
    name = {Skip: "skip", PseudoLabel: "pseudo"}[objective]
    config = engine.TrainConfig(labeled_fraction=0.5, unlabeled=name, tau=0.5, lambda_u=2.0, debias=False)
    settings = config.objective_settings()
    accepted = inspect.signature(objective).parameters
    required = {n for n, p in accepted.items() if p.default is p.empty}
    assert required <= set(settings) <= set(accepted)
    built = objective(**settings)
    assert all(getattr(built, key) == value for key, value in settings.items())
