import json

import pytest
import torch

from fmsearch import bench, speed

CPU = torch.device("cpu")


def test_bench_times_the_assignment_loop_and_fmsearch_in_one_run(tiny, tmp_path):
    config = bench.BenchConfig(
        repeats=2, pool_limit=600, options=("channels_last",), threads=(1,), eval_batch_sizes=(64, 500)
    )
    report = bench.run(config, CPU, tiny.config())
    names = [t.name for t in report.training]
    assert names == ["assignment loop", "fmsearch defaults", "fmsearch float32", "fmsearch +channels_last"]
    size = report.chosen.eval_batch_size
    assert [t.name for t in report.evaluation] == [
        "assignment evaluation",
        f"evaluate defaults (batch {size})",
        f"evaluate float32 batch {size}",
        "evaluate defaults, batch 64",
        "evaluate defaults, batch 500",
    ]
    for timings in (report.training, report.evaluation):
        reference = timings[0]
        for timing in timings:
            assert timing.threads == 1 and len(timing.images_per_second) == 2
            assert all(speed > 0 for speed in timing.images_per_second)
            assert timing.ratio == pytest.approx(timing.median / reference.median)
            assert 0.0 <= timing.accuracy <= 1.0 and timing.spread >= 0.0
        assert reference.ratio == 1.0
    assert report.training[1].flops_per_second == pytest.approx(
        report.flops_per_image["plain"]["train_step"] * report.training[1].median
    )
    assert report.matmul_flops_per_second[1] > 0 and report.bf16_matmul_flops_per_second[1] > 0

    record = report.as_json()
    assert record["cpu_flags"] == speed.cpu_flags() and record["chosen"] == report.chosen.record()
    path = bench.save(record, tmp_path / "bench", "run")
    assert list(path.parent.iterdir()) == [path]  # written by rename: no temporary file is left
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))


def test_both_loops_train_and_evaluate_on_the_same_images(tiny):
    work = bench.load(bench.BenchConfig(pool_limit=500), CPU, tiny.config())
    reference = work.reference.dataset
    assert torch.equal(reference.data[work.reference.indices], work.splits.train_images)
    assert torch.equal(reference.targets[work.reference.indices], work.splits.train_labels)
    assert torch.equal(reference.data[work.reference_val.indices], work.splits.val_images)


@pytest.mark.parametrize("arch", ["plain", "adaptive"])
def test_flops_per_image_match_the_layers_counted_by_hand(arch):
    # A multiply-add is 2 FLOPs; both CNNs run conv2 on 14x14 maps: conv1, conv2, fc1, fc2.
    by_hand = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 64 * 7 * 7 * 128 + 128 * 10)
    flops = bench.flops_per_image(arch)
    assert flops["forward"] == by_hand
    assert 2 * by_hand < flops["train_step"] <= 3 * by_hand  # backward: twice the forward, less conv1's input
