"""make bench: fmsearch's training epoch against the assignment's own loop, same device, same run.

The reference is the assignment's loop: torchvision's FashionMNIST with ToTensor and Normalize,
DataLoader(batch_size=64, shuffle=True), a host->device copy and two `.item()` calls per batch (the
running loss and the correct count, as its `training()` does; its tqdm bar is left out, which only
flatters the reference). Both train the same model with Adam on the same images (data.split_indices)
for one epoch per repeat; every repeat runs each contender once, so drift in the machine hits all of
them. A warm-up run of each keeps allocation and compile time out. Validation is not in the training
timings: evaluation is timed on its own, against the assignment's evaluation loop.

fmsearch runs as a study does: with the settings chosen for this machine (speed.choose), and as
float32 with every speed setting off, so the report shows what the choice is worth.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from torchvision.datasets import FashionMNIST

from fmsearch import data, engine, files, speed
from fmsearch.config import SWITCHES as OPTIONS  # each timed alone on float32
from fmsearch.models import ARCHITECTURES, build_model
from fmsearch.speed import sync

FLOAT32 = dict.fromkeys(OPTIONS, False)  # every speed switch off


@dataclass(frozen=True)
class BenchConfig:
    arch: str = "plain"
    batch_size: int = 64  # the assignment's
    repeats: int = 3  # timed epochs per contender; the median and the spread are reported
    pool_limit: int | None = None  # images per epoch; None: the whole 50,000-image pool
    options: tuple[str, ...] = ()  # fmsearch float32 is also timed with each of these forced on
    threads: tuple[int, ...] = ()  # torch CPU thread counts to time every contender at; (): the chosen
    eval_batch_sizes: tuple[int, ...] = ()  # engine.evaluate batch sizes to time besides the chosen one


@dataclass
class Timing:
    name: str
    threads: int
    flops_per_image: float  # of the work timed: a training step, or a forward pass for evaluation
    images_per_second: list[float] = field(default_factory=list)  # one per repeat
    accuracy: float = float("nan")  # train (or evaluation) accuracy of the last repeat, a fraction
    ratio: float = float("nan")  # median over the reference's median at the same thread count

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_second)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats, a fraction."""
        return (max(self.images_per_second) - min(self.images_per_second)) / self.median

    @property
    def flops_per_second(self) -> float:
        """Achieved: FLOPs per image times the median images per second."""
        return self.flops_per_image * self.median


@dataclass
class BenchReport:
    device: str
    torch_version: str
    config: BenchConfig
    training: list[Timing]  # the reference first, at each thread count
    evaluation: list[Timing]
    flops_per_image: dict[str, dict[str, float]]  # arch -> {"forward", "train_step"}
    matmul_flops_per_second: dict[int, float]  # threads -> measured float32 matmul rate, a ceiling
    bf16_matmul_flops_per_second: dict[int, float]  # threads -> the same in bf16
    chosen: speed.Execution  # what fmsearch's defaults are on this machine

    def as_json(self) -> dict:
        def rows(timings: list[Timing]) -> list[dict]:
            return [
                {
                    **asdict(t),
                    "median": t.median,
                    "spread": t.spread,
                    "flops_per_second": t.flops_per_second,
                    "share_of_matmul_rate": t.flops_per_second / self.matmul_flops_per_second[t.threads],
                    "share_of_bf16_matmul_rate": t.flops_per_second
                    / self.bf16_matmul_flops_per_second[t.threads],
                }
                for t in timings
            ]

        return {
            "device": self.device,
            "cpu": speed.cpu_name(),
            "cpu_flags": speed.cpu_flags(),
            "cores": os.cpu_count(),
            "torch": self.torch_version,
            "chosen": self.chosen.record(),
            "config": asdict(self.config),
            "training": rows(self.training),
            "evaluation": rows(self.evaluation),
            "flops_per_image": self.flops_per_image,
            "matmul_flops_per_second": self.matmul_flops_per_second,
            "bf16_matmul_flops_per_second": self.bf16_matmul_flops_per_second,
        }


@dataclass
class Workload:
    splits: data.Splits  # what fmsearch trains and validates on
    reference: Subset  # the same pool images, as the assignment's torchvision dataset
    reference_val: Subset  # the same validation images, likewise


def cpu_name() -> str:
    """'AMD EPYC, 2 cores': the CPU's model name and core count."""
    return f"{speed.cpu_name()}, {os.cpu_count()} cores"


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load(config: BenchConfig, device: torch.device, data_config: data.DataConfig | None = None) -> Workload:
    """The pool fmsearch trains on, on the device, and the same images as a torchvision dataset."""
    data_config = replace(data_config or data.DataConfig(), pool_limit=config.pool_limit)
    arrays = data.load(data_config.root, data_config.checksums)
    splits = data.make_splits(arrays, data_config, device)
    pool, val = data.split_indices(arrays.train_labels, data_config)
    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((splits.mean,), (splits.std,))]
    )
    dataset = FashionMNIST(str(data_config.root or data.data_root()), train=True, transform=to_tensor)
    return Workload(splits, Subset(dataset, pool.tolist()), Subset(dataset, val.tolist()))


def assignment_epoch(config: BenchConfig, dataset: Subset, device: torch.device) -> tuple[float, float]:
    """One epoch of the assignment's training loop; returns (images per second, train accuracy)."""
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    torch.manual_seed(0)
    model = build_model(config.arch, 0.25).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()
    train_loss, correct = 0.0, 0
    sync(device)
    started = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        outputs = model(images)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_loss += loss.item()  # the assignment's two host syncs per batch
        correct += (outputs.argmax(dim=1) == labels).sum().item()
    sync(device)
    return len(dataset) / (time.perf_counter() - started), correct / len(dataset)


def fmsearch_epoch(splits: data.Splits, train: engine.TrainConfig) -> tuple[float, float]:
    """One epoch of engine.fit (its own timer leaves validation out); (images per second, train accuracy)."""
    epoch = engine.fit(replace(train, epochs=1, patience=None), splits).history[0]
    return epoch["images_per_second"], epoch["train_accuracy"]


def assignment_evaluation(arch: str, dataset: Subset, device: torch.device) -> tuple[float, float]:
    """The assignment's evaluation loop (batch 64, `.item()` per batch); (images per second, accuracy)."""
    model = build_model(arch, 0.25).to(device).eval()
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    loss_sum, correct = 0.0, 0
    sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            loss_sum += F.cross_entropy(outputs, labels).item()
            correct += (outputs.argmax(dim=1) == labels).sum().item()
    sync(device)
    return len(dataset) / (time.perf_counter() - started), correct / len(dataset)


def fmsearch_evaluation(arch: str, splits: data.Splits, execution: speed.Execution) -> tuple[float, float]:
    """engine.evaluate over the validation split, as `execution` runs it; (images per second, accuracy)."""
    model = build_model(arch, 0.25).to(splits.val_images.device)
    sync(splits.val_images.device)
    started = time.perf_counter()
    scored = engine.evaluate(model, splits.val_images, splits.val_labels, splits.normalize, execution)
    return len(splits.val_labels) / (time.perf_counter() - started), scored.accuracy


def flops_per_image(arch: str, batch: int = 64) -> dict[str, float]:
    """FLOPs of one image through `arch` (a multiply-add counts 2), by torch's FlopCounterMode.

    'forward' is inference; 'train_step' adds the backward pass. Only convolutions and matrix
    products are counted: ReLU, pooling and the optimizer add well under 1%.
    """
    model = build_model(arch, 0.25)
    images, labels = torch.zeros(batch, 1, 28, 28), torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as forward:
        model(images)
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(model(images), labels).backward()
    return {"forward": forward.get_total_flops() / batch, "train_step": step.get_total_flops() / batch}


def matmul_flops_per_second(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5
) -> float:
    """Measured matrix-multiply rate in `dtype`: a practical ceiling for this device and thread count.

    Repeats the product for about `seconds` after a warm-up call. A dtype this slow at it is timed by
    that one call: an emulated bf16 product took 2.6 s here (AMD EPYC, AVX2 only, 2026-12-02).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    started = time.perf_counter()
    a @ b
    sync(device)
    warm_up = time.perf_counter() - started
    if warm_up >= seconds:
        return 2 * size**3 / warm_up
    repeats = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        sync(device)
        repeats += 1
    return 2 * size**3 * repeats / elapsed


Measure = Callable[[], tuple[float, float]]  # -> (images per second, accuracy)


def _time(contenders: dict[tuple[str, int, float], Measure], repeats: int) -> list[Timing]:
    """Warm each contender up once, then run `repeats` rounds of all; the first at each thread
    count is the reference its ratio is taken against."""
    timings = {key: Timing(*key) for key in contenders}
    for round_ in range(repeats + 1):
        for key, measure in contenders.items():
            with _threads(key[1]):
                speed, accuracy = measure()
            if round_ > 0:
                timings[key].images_per_second.append(speed)
                timings[key].accuracy = accuracy
    references: dict[int, Timing] = {}
    for timing in timings.values():
        timing.ratio = timing.median / references.setdefault(timing.threads, timing).median
    return list(timings.values())


def run(config: BenchConfig, device: torch.device, data_config: data.DataConfig | None = None) -> BenchReport:
    """Time the reference, fmsearch's defaults, fmsearch float32 and each option, at each thread count."""
    work = load(config, device, data_config)
    chosen = speed.choose(str(device))
    base = engine.TrainConfig(arch=config.arch, batch_size=config.batch_size)
    flops = {arch: flops_per_image(arch) for arch in sorted(ARCHITECTURES)}
    step, forward = flops[config.arch]["train_step"], flops[config.arch]["forward"]
    training: dict[tuple[str, int, float], Measure] = {}
    evaluation: dict[tuple[str, int, float], Measure] = {}
    for threads in config.threads or (chosen.threads,):
        # A thread count asked for is forced on fmsearch too; otherwise it runs at the chosen count.
        defaults = replace(base, threads=threads) if config.threads else base
        float32 = replace(defaults, **FLOAT32)
        variants = {"fmsearch defaults": defaults, "fmsearch float32": float32} | {
            f"fmsearch +{option}": replace(float32, **{option: True}) for option in config.options
        }
        training["assignment loop", threads, step] = lambda: assignment_epoch(config, work.reference, device)
        for name, variant in variants.items():
            training[name, threads, step] = lambda v=variant: fmsearch_epoch(work.splits, v)
        evaluation["assignment evaluation", threads, forward] = lambda: assignment_evaluation(
            config.arch, work.reference_val, device
        )
        settled = speed.settle(defaults, device)
        runs = {f"evaluate defaults (batch {settled.eval_batch_size})": settled}
        runs |= {f"evaluate float32 batch {settled.eval_batch_size}": speed.settle(float32, device)}
        runs |= {
            f"evaluate defaults, batch {size}": replace(settled, eval_batch_size=size)
            for size in config.eval_batch_sizes
        }
        for name, execution in runs.items():
            evaluation[name, threads, forward] = lambda e=execution: fmsearch_evaluation(
                config.arch, work.splits, e
            )
    matmul, bf16_matmul = {}, {}
    for threads in config.threads or (chosen.threads,):
        with _threads(threads):
            matmul[threads] = matmul_flops_per_second(device)
            bf16_matmul[threads] = matmul_flops_per_second(device, torch.bfloat16)
    return BenchReport(
        device=str(device),
        torch_version=torch.__version__,
        config=config,
        training=_time(training, config.repeats),
        evaluation=_time(evaluation, config.repeats),
        flops_per_image=flops,
        matmul_flops_per_second=matmul,
        bf16_matmul_flops_per_second=bf16_matmul,
        chosen=chosen,
    )


def save(record: dict, folder: Path, stem: str) -> Path:
    """Write `record` as folder/STEM.json atomically (a temporary file, then a rename)."""
    return files.write_json(Path(folder) / f"{stem}.json", record)
