import json
from dataclasses import replace

import pytest
import torch

from fmsearch import engine, speed

CPU = torch.device("cpu")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty cache folder, and no choice remembered by this process."""
    monkeypatch.setenv("FMSEARCH_CACHE", str(tmp_path))
    speed.choose.cache_clear()
    yield tmp_path
    speed.choose.cache_clear()


def test_the_choice_is_measured_once_per_machine_then_read_from_its_file():
    speed.choose.cache_clear()  # a new process, with the suite's cache folder
    first = speed.choose("cpu")
    path = speed.cache_path(CPU)
    record = json.loads(path.read_text())
    assert record["machine"] == speed.machine(CPU) and record["machine"]["cpu_flags"] == speed.cpu_flags()
    assert "train speedup of channels_last" in record["timings"]
    assert ("train speedup of bf16" in record["timings"]) == speed.native_bf16(CPU)
    assert all(f"eval batch {size}" in record["timings"] for size in speed.EVAL_BATCH_SIZES["cpu"])
    measured = speed.Execution(**record["choice"])
    assert (
        measured.source.startswith("measured") and measured.eval_batch_size in speed.EVAL_BATCH_SIZES["cpu"]
    )
    assert 1 <= measured.threads <= torch.get_num_threads() and not measured.compile

    speed.choose.cache_clear()
    again = speed.choose("cpu")
    assert again.source == f"cache {path}"
    assert replace(again, source="") == replace(first, source="") == replace(measured, source="")


def test_another_machine_or_torch_is_measured_again(own_cache, monkeypatch):
    first = speed.cache_path(CPU)
    machine = speed.machine
    monkeypatch.setattr(speed, "machine", lambda device: {**machine(device), "torch": "9.9.9"})
    assert speed.cache_path(CPU) != first


def test_an_unreadable_cache_file_is_measured_again(own_cache, monkeypatch):
    path = speed.cache_path(CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ half a file")
    measured = speed.Execution("cpu", channels_last=True, eval_batch_size=64, threads=1, source="measured")
    monkeypatch.setattr(speed, "measure", lambda device: (measured, {"train speedup of channels_last": 1.2}))
    assert speed.choose("cpu") == measured
    record = json.loads(path.read_text())
    assert record["schema"] == speed.SCHEMA and record["choice"] == measured.record()


def test_a_choice_measured_on_a_busy_cpu_is_measured_again_once_it_is_quiet(own_cache, monkeypatch):
    first = speed.Execution("cpu", threads=1, source="measured")
    second = speed.Execution("cpu", channels_last=True, threads=2, source="measured")
    choices = iter([first, second])
    monkeypatch.setattr(speed, "measure", lambda device: (next(choices), {}))
    monkeypatch.setattr(speed, "busy", lambda: True)
    assert speed.choose("cpu") == first
    assert json.loads(speed.cache_path(CPU).read_text())["busy"]
    speed.choose.cache_clear()
    assert speed.choose("cpu").source.startswith("cache")  # still busy: the busy choice is kept
    speed.choose.cache_clear()
    monkeypatch.setattr(speed, "busy", lambda: False)
    assert speed.choose("cpu") == second
    speed.choose.cache_clear()
    assert speed.choose("cpu").source.startswith("cache")  # a quiet choice is kept for good


def test_a_setting_the_config_gives_is_forced_over_the_choice():
    config = engine.TrainConfig(amp=True, channels_last=False, eval_batch_size=77, threads=1)
    settled = speed.settle(config, CPU)
    assert (settled.amp, settled.channels_last, settled.eval_batch_size, settled.threads) == (
        True,
        False,
        77,
        1,
    )
    assert settled.source.endswith("forced amp,channels_last,eval_batch_size,threads")
    unforced = speed.settle(engine.TrainConfig(), CPU)
    assert unforced == speed.choose("cpu") and "forced" not in unforced.source


def test_workers_sharing_a_cpu_cap_the_chosen_threads_but_not_a_forced_count():
    assert speed.settle(engine.TrainConfig(), CPU, thread_cap=1).threads == 1
    assert speed.settle(engine.TrainConfig(threads=2), CPU, thread_cap=1).threads == 2


def test_the_greedy_choice_keeps_the_plainer_candidate_unless_it_is_clearly_faster(monkeypatch):
    # Speed-ups a machine like an AVX2 CPU gives: channels_last pays, bf16 is emulated and slow, one
    # thread is only a little faster; evaluation is fastest at 256 and nearly so at 128.
    gains = {"channels_last": 1.2, "amp": 0.15, "threads": 1.01}
    evaluation = {64: 5000.0, 128: 7500.0, 256: 7700.0, 512: 4100.0}
    tried = []

    def speedup(incumbent, candidate, device):
        (changed,) = [k for k in gains if getattr(candidate, k) != getattr(incumbent, k)]
        tried.append((changed, incumbent))
        return gains[changed]

    monkeypatch.setattr(speed, "STARTING_THREADS", 2)
    monkeypatch.setattr(speed, "native_bf16", lambda device: True)
    monkeypatch.setattr(speed, "speedup", speedup)
    monkeypatch.setattr(speed, "eval_rates", lambda e, d, sizes: {s: evaluation[s] for s in sizes})
    chosen, timings = speed.measure(CPU)
    assert (chosen.channels_last, chosen.amp, chosen.threads) == (True, False, 2)  # 1 thread: < MIN_GAIN
    assert [incumbent.channels_last for _, incumbent in tried] == [
        False,
        True,
        True,
    ]  # each builds on the last
    assert chosen.eval_batch_size == 128  # within MIN_GAIN of the fastest, and smaller
    assert timings["train speedup of bf16"] == 0.15 and timings["eval batch 512"] == 4100.0

    monkeypatch.setattr(speed, "native_bf16", lambda device: False)  # emulated bf16 is not even timed
    assert "train speedup of bf16" not in speed.measure(CPU)[1]


def test_a_speedup_is_measured_on_the_same_steps_run_alternately():
    plain = speed.Execution("cpu", threads=torch.get_num_threads())
    assert 0.7 < speed.speedup(plain, plain, CPU, rounds=3, steps=4) < 1.4  # a candidate against itself


def test_training_runs_with_the_settings_it_records(tiny_splits):
    config = engine.TrainConfig(epochs=1, batch_size=32, patience=None, channels_last=True, threads=1)
    result = engine.fit(config, tiny_splits)
    assert result.execution == speed.settle(config, CPU)
    assert result.execution.channels_last and result.execution.threads == 1
    assert result.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
