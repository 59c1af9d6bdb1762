"""The assignment's two CNNs and a name -> constructor registry."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fmsearch.errors import ConfigError


class PlainCNN(nn.Module):
    """conv32-ReLU-maxpool, conv64-ReLU-maxpool, fc128-ReLU, dropout, fc10.

    The seed defined the pooling layer but never applied it; here it is applied.
    """

    def __init__(self, dropout: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


class AdaptiveCNN(nn.Module):
    """The assignment's variant: AdaptiveAvgPool2d to 14x14 after conv1 and to 7x7 after conv2."""

    def __init__(self, dropout: float = 0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.pool1 = nn.AdaptiveAvgPool2d((14, 14))
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool2 = nn.AdaptiveAvgPool2d((7, 7))
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


# config.ARCHITECTURE_NAMES lists these names for the command line, which loads no torch.
ARCHITECTURES: dict[str, Callable[[float], nn.Module]] = {
    "plain": PlainCNN,
    "adaptive": AdaptiveCNN,
}


def build_model(arch: str, dropout: float) -> nn.Module:
    """Construct an architecture by name; raises ConfigError listing the known names."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](dropout)
