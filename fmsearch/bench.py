"""make bench: fmsearch's training epoch against a plain DataLoader loop, same device, same run.

The baseline is the seed's loop: torchvision's FashionMNIST with ToTensor and Normalize, a
shuffled DataLoader over the same training pool, a host->device copy and `.item()` per batch.
Both train the same model with Adam at the same batch size for one epoch per repeat; the runs
alternate so that drift in the machine hits both. Validation is left out of both timings.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import FashionMNIST

from fmsearch import data, engine
from fmsearch.models import build_model


@dataclass(frozen=True)
class BenchConfig:
    arch: str = "plain"
    batch_size: int = 64  # the assignment's
    repeats: int = 3  # epochs timed per contender; the median is reported
    pool_limit: int | None = None  # images per epoch; None: the whole 50,000-image pool
    num_workers: int = 0  # the baseline DataLoader's worker processes (the seed used 0)


@dataclass
class BenchResult:
    name: str
    images_per_second: list[float]  # one per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_second)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dataloader_epoch(config: BenchConfig, root, pool: torch.Tensor, mean: float, std: float, device) -> float:
    """One epoch of the plain loop; returns images per second."""
    dataset = FashionMNIST(
        str(root),
        train=True,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))]),
    )
    loader = DataLoader(
        Subset(dataset, pool.tolist()),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(0)
    model = build_model(config.arch, 0.25).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    _sync(device)
    started = time.perf_counter()
    running_loss = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # as the seed does: a sync per batch
    _sync(device)
    return len(pool) / (time.perf_counter() - started)


def fmsearch_epoch(config: BenchConfig, splits: data.Splits, train: engine.TrainConfig) -> float:
    """One epoch of engine.fit's training loop (its own timer excludes validation)."""
    result = engine.fit(replace(train, epochs=1, patience=None), splits)
    return result.history[0]["images_per_second"]


def run(
    config: BenchConfig, device: torch.device, data_config: data.DataConfig | None = None
) -> list[BenchResult]:
    """Time the baseline and fmsearch (and, on CUDA, its bf16/channels_last/compile options)."""
    data_config = replace(data_config or data.DataConfig(), pool_limit=config.pool_limit)
    arrays = data.load(data_config.root, data_config.checksums)
    splits = data.make_splits(arrays, data_config, device)
    pool = torch.from_numpy(
        data.split_indices(arrays.train_labels, data_config)[0]
    )  # the images fit trains on
    root = data_config.root or data.data_root()

    base = engine.TrainConfig(arch=config.arch, batch_size=config.batch_size)
    contenders: dict[str, callable] = {
        "DataLoader loop": lambda: dataloader_epoch(config, root, pool, splits.mean, splits.std, device),
        "fmsearch": lambda: fmsearch_epoch(config, splits, base),
    }
    if device.type == "cuda":
        contenders["fmsearch +bf16"] = lambda: fmsearch_epoch(config, splits, replace(base, amp=True))
        contenders["fmsearch +bf16 +channels_last"] = lambda: fmsearch_epoch(
            config, splits, replace(base, amp=True, channels_last=True)
        )
        contenders["fmsearch +compile"] = lambda: fmsearch_epoch(config, splits, replace(base, compile=True))
    for measure in contenders.values():  # warm-up: allocator, cuDNN autotune, compile
        measure()
    results = {name: BenchResult(name, []) for name in contenders}
    for _ in range(config.repeats):
        for name, measure in contenders.items():
            results[name].images_per_second.append(measure())
    return list(results.values())
