import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fmsearch import engine
from fmsearch.semi import (
    HIDDEN,
    SemiBatchSampler,
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
    """50 labels of 1,000: after 6 labeled-only epochs, pseudo-labels must add at least 3 points."""
    splits = textures.splits()
    results = {}
    for unlabeled in ("skip", "pseudo"):
        accuracies = []
        for seed in range(3):
            config = engine.TrainConfig(
                epochs=14,
                batch_size=10,
                lr=2e-3,
                schedule="cosine",
                labeled_count=50,
                unlabeled=unlabeled,
                tau=0.9,
                lambda_u=0.25,
                warmup_epochs=6,
                patience=None,
                seed=seed,
                monitor="val_accuracy",
            )
            accuracies.append(engine.fit(config, splits).best["val_accuracy"])
        results[unlabeled] = np.mean(accuracies)
    assert results["pseudo"] > results["skip"] + 0.03, results
