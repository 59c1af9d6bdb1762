import torch

from fmsearch import bench


def test_bench_times_both_loops_on_the_same_device_in_one_run(tiny):
    config = bench.BenchConfig(repeats=2, pool_limit=600)
    results = bench.run(config, torch.device("cpu"), tiny.config())
    assert [r.name for r in results] == ["DataLoader loop", "fmsearch"]
    for result in results:
        assert len(result.images_per_second) == 2
        assert all(speed > 0 for speed in result.images_per_second)
        assert result.median > 0
