"""Recipe: FSCOptimizer's defaults on a network and bases the tests do not use (issue 12's checks).

A 5-block tanh chain (no residual connections, float64, full batch): with RMSprop and every default, the worst
20-step window of steps 20-60 against the group shares; with SGD-momentum at rate=3.0, whether the loss blows up
silently or the divergence guard backs off and warns.

    python recipes/check_fsc_defaults.py
"""

import warnings

import torch
from torch import nn

from hf_fsf.fsc import FSCOptimizer


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 24)
        self.layers = nn.ModuleList(nn.Sequential(nn.Tanh(), nn.Linear(24, 24)) for _ in range(5))
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def train(opt, model, x, y, steps=60):
    losses, contributions = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
        contributions.append(opt.last_contributions)
    return losses, contributions


def main():
    torch.manual_seed(1)
    x = torch.randn(256, 6, dtype=torch.float64)
    y = torch.sin(x[:, :3] * 2)
    blocks = [f"layers.{i}" for i in range(5)]
    model = Chain().double()
    opt = FSCOptimizer(model, base=torch.optim.RMSprop, lr=1e-3, blocks=blocks)
    losses, contributions = train(opt, model, x, y)
    shares, worst = opt.group_shares, 1.0
    for start in range(20, 41):
        window = {n: sum(c[n] for c in contributions[start : start + 20]) for n in shares}
        total = sum(window.values())
        worst = max(
            worst, *[max(window[n] / total / shares[n], shares[n] * total / window[n]) for n in shares]
        )
    print(
        f"RMSprop, defaults: worst 20-step window / shares {worst:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    model = Chain().double()
    opt = FSCOptimizer(model, base=torch.optim.SGD, lr=0.01, momentum=0.9, rate=3.0, blocks=blocks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, _ = train(opt, model, x, y)
    warned = any("backing off" in str(w.message) for w in caught)
    print(
        f"SGD-momentum, rate 3: loss first {losses[0]:.3f}, max {max(losses):.3f}, last {losses[-1]:.3f}; "
        f"warned {warned}; trust factor {opt.trust.factor:.3f}"
    )


if __name__ == "__main__":
    main()
