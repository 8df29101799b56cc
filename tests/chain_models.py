"""Small float64 chain models for exactness tests.

Each model has the usual `forward` (what the probe sees) and `features(...)`, the same computation written out so
that tests can take f_ℓ, b_ℓ and Jacobian-vector products without the probe's hooks.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(h))


class ResBlock(nn.Module):
    def __init__(self, width: int, beta: float, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.beta = beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (1 - self.beta**2) ** 0.5 * h + self.beta * self.drop(self.linear(torch.relu(h)))


class RegressionChain(nn.Module):
    """Input layer -> blocks -> readout, squared loss. kind: 'mlp' or 'resnet'."""

    def __init__(self, kind: str = "mlp", d: int = 6, width: int = 24, depth: int = 4, dropout: float = 0.0):
        super().__init__()
        self.inp = nn.Linear(d, width)
        if kind == "mlp":
            self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        else:
            self.blocks = nn.ModuleList(ResBlock(width, depth**-0.5, dropout) for _ in range(depth))
        self.out = nn.Linear(width, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.inp(x)
        feats = []
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return self.out(torch.relu(h)), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]

    @staticmethod
    def loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((output - y) ** 2).mean()


class TiedLM(nn.Module):
    """Token embedding shared with the readout (as in GPT-2), residual blocks with dropout, cross-entropy."""

    def __init__(self, vocab: int = 30, width: int = 16, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(8, width))
        self.blocks = nn.ModuleList(ResBlock(width, depth**-0.5, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab, bias=False)
        self.readout.weight = self.embed.weight

    def features(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        feats = []
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return self.readout(self.norm(h)), feats

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.features(ids)[0]

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


class ConvBlock(nn.Module):
    def __init__(self, channels: int, length: int):
        super().__init__()
        self.norm = nn.LayerNorm(length)
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * self.conv(torch.tanh(self.norm(h)))


class ConvClassifier(nn.Module):
    """1-D convolutional residual blocks with LayerNorm, dropout before the readout, cross-entropy."""

    def __init__(self, channels: int = 8, length: int = 12, classes: int = 3, depth: int = 3):
        super().__init__()
        self.inp = nn.Conv1d(2, channels, 1)
        self.layers = nn.ModuleList(ConvBlock(channels, length) for _ in range(depth))
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(channels * length, classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.inp(x)
        feats = []
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        return self.out(self.drop(h).flatten(1)), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)


def make_case(name: str, seed: int = 0):
    """(model, inputs, targets) in float64 for one of: mlp, resnet, tied, dropout, conv."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "conv":
        x = torch.randn(10, 2, 12, generator=g, dtype=torch.float64)
        return ConvClassifier().double(), x, torch.randint(0, 3, (10,), generator=g)
    if name == "tied":
        model = TiedLM().double()
        ids = torch.randint(0, 30, (4, 8), generator=g)
        return model, ids, torch.roll(ids, -1, dims=1)
    kind = "mlp" if name == "mlp" else "resnet"
    model = RegressionChain(kind, dropout=0.1 if name == "dropout" else 0.0).double()
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randn(16, 1, generator=g, dtype=torch.float64)
    return model, x, y
