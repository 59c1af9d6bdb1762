import pytest
import torch

from fmsearch.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_output_is_batch_by_ten_for_every_batch_size(arch, batch):
    model = build_model(arch, dropout=0.25).eval()
    assert model(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


def test_plain_cnn_applies_its_pooling():
    # The seed forgot the pooling, so 64 images became 1,024 rows; here the features are 64*7*7 per image.
    model = build_model("plain", 0.0)
    features = model.pool(
        torch.relu(model.conv2(model.pool(torch.relu(model.conv1(torch.zeros(2, 1, 28, 28))))))
    )
    assert features.shape == (2, 64, 7, 7)


def test_dropout_is_a_parameter():
    assert build_model("adaptive", 0.4).dropout.p == 0.4


def test_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*adaptive.*plain"):
        build_model("resnet", 0.1)
