import pytest
import torch
from torch import nn

from fmsearch.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_output_is_batch_by_ten_for_every_batch_size(arch, batch):
    model = build_model(arch, dropout=0.25).eval()
    assert model(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_pools_twice_so_the_classifier_sees_64x7x7_per_image(arch):
    # The seed defined its pooling but never applied it, so 64 images became 1,024 rows.
    model = build_model(arch, 0.0)
    seen = []
    pools = [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d))]
    for module in [*pools, model.fc1]:
        module.register_forward_hook(lambda module, inputs, output: seen.append((module, output.shape)))
    model(torch.zeros(2, 1, 28, 28))
    shapes = [shape for module, shape in seen if module is not model.fc1]
    assert shapes == [(2, 32, 14, 14), (2, 64, 7, 7)]
    assert model.fc1.in_features == 64 * 7 * 7 and [s for m, s in seen if m is model.fc1] == [(2, 128)]


def test_dropout_is_a_parameter():
    assert build_model("adaptive", 0.4).dropout.p == 0.4


def test_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*adaptive.*plain"):
        build_model("resnet", 0.1)


def test_the_command_line_knows_every_architecture_and_only_those():
    from fmsearch.config import ARCHITECTURE_NAMES

    assert sorted(ARCHITECTURE_NAMES) == sorted(ARCHITECTURES)
