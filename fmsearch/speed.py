"""How fast a run goes on this machine: bf16 autocast, channels_last, threads and the evaluation batch.

None of these decides what a run learns, only how fast it gets there, and the fastest mix depends on
the machine. bf16 autocast was 1.2x faster on an AMD EPYC with AVX512-BF16 (2026-11) and 6x slower
on an AMD EPYC without it (AVX2 only, 2026-12-02), where the CPU emulates bf16 arithmetic. So the
mix is chosen on the machine that runs the work, by timing a few real training steps and evaluation
batches of each candidate (`measure`), once per machine (the CPU's name and flags, or the GPU's
name, and the torch version), and kept in a cache file. Every run reuses that file, so the same
command with the same seed on the same machine gives the same numbers. A TrainConfig field that is
set (a flag such as `--no-amp`, or a study file's `[fixed]` key) overrides the choice (`settle`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fmsearch import files
from fmsearch.config import SETTINGS
from fmsearch.models import build_model

SCHEMA = 3  # bump when what `measure` compares changes: older cache files are then measured again
# A candidate replaces the plainer one only when this much faster. Paired medians of channels_last's
# speed-up ranged 1.06-1.15 over three measurements here (AMD EPYC, AVX2, 2026-12-02).
MIN_GAIN = 1.03
# Evaluation batches to time: on this CPU 64-128 ran fastest and 512 up fell out of its caches
# (6,800 against 2,900 images/s at 512, AMD EPYC AVX2, 2026-12-02); a GPU wants large ones.
EVAL_BATCH_SIZES = {"cpu": (64, 128, 256, 512), "cuda": (512, 1024, 2048, 4096)}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 and AMX, ARM's BF16 extension
TRAIN_BATCH = 64  # the assignment's batch size, which the steps are timed at
# torch's thread count as the process started ($OMP_NUM_THREADS, else the cores): part of the machine,
# so that a run limited to one thread keeps a choice of its own.
STARTING_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class Execution:
    """How a run executes on its device; never what it learns."""

    device: str  # 'cpu', 'cuda:0', ...
    amp: bool = False  # bf16 autocast, in training and evaluation
    channels_last: bool = False  # the model's and its inputs' memory format
    compile: bool = False  # torch.compile the training model
    eval_batch_size: int = 256  # images per forward pass when scoring
    threads: int = 1  # torch's intra-op threads on the CPU
    source: str = "default"  # 'measured <date>', 'cache <file>', or with ' + forced <fields>'

    def record(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict, for a trial's user attributes and `train --json`."""
        return asdict(self)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            device_type=torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.amp
        )

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, C, H, W) in the memory format the model expects."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this memory format (in place); its weights' values are unchanged."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    @contextlib.contextmanager
    def threaded(self) -> Iterator[None]:
        """Run the block with this many torch threads on the CPU, then restore the count."""
        if torch.device(self.device).type != "cpu" or self.threads == torch.get_num_threads():
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...), sorted; empty where unknown."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return sorted(set(line.split(":", 1)[1].split()))
    return []


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def machine(device: torch.device) -> dict[str, Any]:
    """What the choice depends on: the device, the CPU (name, flags, cores, threads) or GPU, and torch."""
    found = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": STARTING_THREADS,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def cache_dir() -> Path:
    """$FMSEARCH_CACHE, else $XDG_CACHE_HOME/fmsearch, else ~/.cache/fmsearch."""
    if "FMSEARCH_CACHE" in os.environ:
        return Path(os.environ["FMSEARCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmsearch"


def cache_path(device: torch.device) -> Path:
    key = json.dumps({"schema": SCHEMA, **machine(device)}, sort_keys=True)
    return cache_dir() / f"execution-{device.type}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@functools.cache
def choose(device_name: str) -> Execution:
    """This machine's fastest settings for `device_name`: from the cache file, else measured and kept.

    Measuring takes about 20 s once per machine. An unreadable cache file is measured again, and so
    is a choice measured while the CPU was busy with other work, once the CPU is quiet.
    """
    device = torch.device(device_name)
    path = cache_path(device)
    try:
        record = json.loads(path.read_text())
        if (
            record["schema"] == SCHEMA
            and record["machine"] == machine(device)
            and not (record["busy"] and not busy())
        ):
            return replace(Execution(**record["choice"]), device=device_name, source=f"cache {path}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    was_busy = busy()
    choice, timings = measure(device)
    record = {
        "schema": SCHEMA,
        "machine": machine(device),
        "busy": was_busy or busy(),  # the timings shared the CPU: measure again when it is quiet
        "choice": asdict(choice),
        "timings": timings,
    }
    with contextlib.suppress(OSError):  # a read-only home: the choice holds for this process only
        files.write_json(path, record)
    return replace(choice, device=device_name)


def busy(seconds: float = 0.25) -> bool:
    """Whether other work keeps the CPU busy: more than half of it in use while this process sleeps.

    Under load, one thread timed faster than two here (AMD EPYC, 2 cores, 2026-12-02); on a quiet
    CPU two were 1.4x faster. Where /proc/stat is missing, the CPU counts as quiet.
    """
    try:
        before = _cpu_ticks()
        time.sleep(seconds)
        after = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return False
    total, idle = after[0] - before[0], after[1] - before[1]
    return total > 0 and (total - idle) / total > 0.5


def _cpu_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks since boot, from /proc/stat's first line; iowait counts as idle."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


def settle(config: Any, device: torch.device, thread_cap: int | None = None) -> Execution:
    """The settings a run uses: this machine's choice, with every field that `config` sets forced.

    `config` is anything with the SETTINGS fields (engine.TrainConfig); None means "choose".
    `thread_cap` bounds the threads when several workers share the CPU.
    """
    chosen = choose(str(device))
    forced = {name: getattr(config, name) for name in SETTINGS if getattr(config, name) is not None}
    settled = replace(chosen, **forced)
    if thread_cap is not None and config.threads is None:
        settled = replace(settled, threads=min(settled.threads, thread_cap))
    if forced:
        settled = replace(settled, source=f"{chosen.source} + forced {','.join(sorted(forced))}")
    return settled


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads what it did (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(device: torch.device, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
    return images.to(device), torch.randint(0, 10, (count,), generator=generator).to(device)


def _normalized(images: torch.Tensor, execution: Execution) -> torch.Tensor:
    return execution.layout((images.unsqueeze(1).float() / 255.0 - 0.286) / 0.353)


class _Steps:
    """The plain CNN and its Adam optimizer set up as `execution` runs them, to time training steps."""

    def __init__(self, execution: Execution, device: torch.device, steps: int):
        self.execution, self.device, self.steps = execution, device, steps
        self.images, self.labels = _images(device, TRAIN_BATCH * steps)
        with execution.threaded():
            self.model = execution.prepare(build_model("plain", 0.25).to(device))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.seconds()  # warm-up: allocation and the first calls' kernel choices

    def seconds(self) -> float:
        """Wall seconds of `steps` training steps at batch 64."""
        run = self.execution
        with run.threaded():
            sync(self.device)
            started = time.perf_counter()
            for chunk in torch.arange(len(self.labels), device=self.device).split(TRAIN_BATCH):
                with run.autocast():
                    loss = F.cross_entropy(
                        self.model(_normalized(self.images[chunk], run)).float(), self.labels[chunk]
                    )
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            sync(self.device)
            return time.perf_counter() - started


def speedup(
    incumbent: Execution, candidate: Execution, device: torch.device, rounds: int = 5, steps: int = 8
) -> float:
    """How many times faster `candidate` trains than `incumbent`: the median over `rounds` of the
    ratio of their times for the same steps, run alternately so that the machine's drift hits both.

    Stops early once the candidate is more than twice as slow over two rounds or more: it has lost
    (one round alone can be a busy moment of the machine's).
    """
    a, b = _Steps(incumbent, device, steps), _Steps(candidate, device, steps)
    ratios = []
    for round_ in range(rounds):
        if round_ % 2:  # alternate which goes first
            candidate_seconds, incumbent_seconds = b.seconds(), a.seconds()
        else:
            incumbent_seconds, candidate_seconds = a.seconds(), b.seconds()
        ratios.append(incumbent_seconds / candidate_seconds)
        if len(ratios) > 1 and statistics.median(ratios) < 0.5:
            break
    return statistics.median(ratios)


def native_bf16(device: torch.device) -> bool:
    """Whether the device has bf16 arithmetic of its own; a CPU without emulates it, slowly."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def eval_rates(
    execution: Execution, device: torch.device, sizes: tuple[int, ...], count: int = 1024, rounds: int = 5
) -> dict[int, float]:
    """Images per second of inference at each batch size: the median of `rounds`, the sizes interleaved."""
    images, _ = _images(device, count)
    with execution.threaded(), torch.inference_mode(), execution.autocast():
        model = execution.prepare(build_model("plain", 0.25).to(device)).eval()
        rates: dict[int, list[float]] = {size: [] for size in sizes}
        for round_ in range(rounds + 1):
            for size in sizes:
                sync(device)
                started = time.perf_counter()
                for start in range(0, count, size):
                    model(_normalized(images[start : start + size], execution)).argmax(1)
                sync(device)
                if round_:  # round 0 warms up
                    rates[size].append(count / (time.perf_counter() - started))
    return {size: statistics.median(r) for size, r in rates.items()}


def measure(device: torch.device) -> tuple[Execution, dict[str, float]]:
    """Time the candidates on `device` and return the fastest settings and every timing taken.

    Greedy, each step keeping the incumbent unless a candidate trains MIN_GAIN times faster
    (speedup): channels_last, then bf16 autocast, then half the threads; then the evaluation batch.
    bf16 is timed only where the device has bf16 arithmetic of its own (native_bf16): emulated, it
    trained 6x slower (198 against 1,451 images/s, AMD EPYC with AVX2 only, 2026-12-02).
    compile is not timed: compiling costs more than a short trial saves (0.76x for a 1-epoch run on
    an AMD EPYC, 2026-11); `--compile` forces it.
    """
    cores = STARTING_THREADS
    best = Execution(str(device), threads=cores, source=f"measured {time.strftime('%Y-%m-%d')}")
    timings: dict[str, float] = {}
    for name, change in (
        ("channels_last", {"channels_last": True}),
        *([("bf16", {"amp": True})] if native_bf16(device) else []),
        *([(f"{cores // 2} threads", {"threads": cores // 2})] if cores > 1 else []),
    ):
        candidate = replace(best, **change)
        gain = timings[f"train speedup of {name}"] = speedup(best, candidate, device)
        if gain >= MIN_GAIN:
            best = candidate
    rates = eval_rates(best, device, EVAL_BATCH_SIZES.get(device.type, EVAL_BATCH_SIZES["cpu"]))
    timings |= {f"eval batch {size}": rate for size, rate in rates.items()}
    fastest = max(rates.values())
    # The smallest batch within MIN_GAIN of the fastest: as fast, and the least memory.
    best = replace(best, eval_batch_size=min(s for s, r in rates.items() if r * MIN_GAIN >= fastest))
    return best, timings
