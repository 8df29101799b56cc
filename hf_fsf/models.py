"""The models hf_fsf builds: the paper's baselines (a ReLU MLP and a ResNet, with the init / learning-rate scalings of
PAPER.md §6) and the small GPT-2 of the demo, the recipes and the tests (`small_gpt2`).

Layer indexing follows the paper. A network of depth L has L weight matrices W_1 .. W_L:

    MLP     h_1 = W_1 x,   h_ℓ = W_ℓ φ(h_{ℓ−1})                          (ℓ = 2 .. L−1),   out = W_L φ(h_{L−1})
    ResNet  f_1 = W_1 x,   f_ℓ = √(1−β²) f_{ℓ−1} + β W_ℓ φ(f_{ℓ−1})     (ℓ = 2 .. L−1),   out = W_L f_{L−1}

with φ = ReLU and no biases. The features f_ℓ of PAPER.md are the *pre-activations* h_ℓ of the MLP and the
residual stream of the ResNet. In the modules:

- `input_layer` (the stem) is W_1: its output is f_1;
- `blocks` is an `nn.ModuleList` of the L−2 hidden layers: `blocks[j]` is the paper's layer ℓ = j + 2 and returns
  f_ℓ, so `blocks[-1]` returns f_{L−1}, the last hidden layer where the paper measures θ_{L−1};
- `readout` (the head) is W_L.

They are registered in that order, so `hf_fsf.find_blocks` sees stem -> blocks -> head. With β = 1 the ResNet is
the MLP up to its readout (which reads f_{L−1} rather than φ(f_{L−1})).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from hf_fsf.formula import SCALINGS as TABLE_SCALINGS
from hf_fsf.formula import Scaling, scaling_table

BRANCH_RULES = ("1", "1/sqrt(L)", "1/L", "c/sqrt(L)")
PRESETS = ("standard", *TABLE_SCALINGS)


def branch_scale(rule: str | float, depth: int, c: float = 1.0) -> float:
    """β for a ResNet of depth L: "1", "1/sqrt(L)", "1/L", "c/sqrt(L)" (uses c), or a constant float.

    The skip connection is scaled by √(1−β²) so that the forward variance is preserved; this needs β ≤ 1.
    """
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        beta = float(rule)
    elif rule == "1":
        beta = 1.0
    elif rule == "1/sqrt(L)":
        beta = 1.0 / math.sqrt(depth)
    elif rule == "1/L":
        beta = 1.0 / depth
    elif rule == "c/sqrt(L)":
        beta = c / math.sqrt(depth)
    else:
        raise ValueError(
            f"unknown branch rule {rule!r}: choose one of {BRANCH_RULES} or pass a float β in (0, 1]"
        )
    if not 0.0 < beta <= 1.0:
        raise ValueError(
            f"branch scale β = {beta:g} (rule {rule!r}, depth {depth}, c = {c:g}) is outside (0, 1]: the skip "
            "weight √(1−β²) needs β ≤ 1. Use a smaller c or a larger depth."
        )
    return beta


def model_scaling(
    name: str, width: int, depth: int, input_dim: int, output_dim: int = 1, beta: float | None = None
) -> Scaling:
    """Init standard deviations and per-layer learning-rate multipliers η for a preset.

    - "ntk", "mfmup", "fsc": the paper's Table 1 (PAPER.md §6) for the MLP (beta=None).
    - For the ResNet (beta given), the branch multiplies hidden gradients by β, so the hidden η of the table is
      divided by β² (rule (8): η_ℓ ∝ 1/(L‖∇_ℓ‖²)). FSC for ResNets with β ≤ 1/√L uses σ_L = √k/m (cos θ = Θ(1),
      no depth factor); ‖b‖² is then L times smaller than in the MLP table, so η_1 and η_hid are L times larger.
      With β = 1/√L this is depth-μP: η_hid = 1. For larger β the depth factor q = β²L (≤ L) comes back into
      σ_L = √(kq)/m, and β = 1 gives the MLP's row (an interpolation of the paper's two regimes, not a theorem).
    - "standard": He init for the input and hidden layers (σ = 1/√d, √(2/m)), σ_L = 1/√m, and the same η = 1
      for every layer (what `torch.optim.SGD(model.parameters(), lr)` does).
    """
    m, L, d, k = float(width), float(depth), float(input_dim), float(output_dim)
    if name == "standard":
        return Scaling(1 / math.sqrt(d), math.sqrt(2 / m), 1 / math.sqrt(m), 1.0, 1.0, 1.0)
    if name not in TABLE_SCALINGS:
        raise ValueError(f"unknown scaling {name!r}: choose one of {PRESETS}")
    table = scaling_table(name, width, depth, input_dim, output_dim)
    if beta is None:
        return table
    if name == "fsc":
        # Rule (7) sets σ_L by cos θ_{L−1}: Θ(1/√L) for β = Θ(1) (the MLP's √L in σ_L), Θ(1) for β = O(1/√L).
        # q = max(1, β²L) interpolates: q = L at β = 1 gives the MLP row, q = 1 for β ≤ 1/√L gives σ_L = √k/m.
        q = max(1.0, beta**2 * L)
        table = replace(
            table,
            sigma_out=math.sqrt(k * q) / m,
            lr_in=table.lr_in * L / q,
            lr_hidden=table.lr_hidden * L / q,
        )
    return replace(table, lr_hidden=table.lr_hidden / beta**2)


class MLPBlock(nn.Module):
    """One hidden layer of the MLP: h_ℓ = W_ℓ φ(h_{ℓ−1}) (returns the pre-activation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(h))


class ResidualBlock(nn.Module):
    """One residual block: f_ℓ = √(1−β²) f_{ℓ−1} + β W_ℓ φ(f_{ℓ−1})."""

    def __init__(self, width: int, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.skip = math.sqrt(max(0.0, 1.0 - beta**2))
        self.linear = nn.Linear(width, width, bias=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.skip * f + self.beta * self.linear(torch.relu(f))

    def extra_repr(self) -> str:
        return f"beta={self.beta:.4g}"


class ReLUReadout(nn.Module):
    """The MLP's output layer: out = W_L φ(h_{L−1})."""

    def __init__(self, width: int, output_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, output_dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.relu(h))


class _ChainNet(nn.Module):
    """Shared body of the two baselines: input_layer -> blocks -> readout, init and per-layer learning rates."""

    input_layer: nn.Linear
    blocks: nn.ModuleList
    readout: nn.Module
    scaling: Scaling

    def _check(self, input_dim: int, width: int, depth: int, output_dim: int) -> None:
        for label, value, low in (
            ("input_dim", input_dim, 1),
            ("width", width, 1),
            ("output_dim", output_dim, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if int(depth) != depth or depth < 3:
            raise ValueError(
                f"depth L = {depth!r}: the paper's depth counts weight matrices (input, L−2 hidden, readout), "
                "so L must be an integer ≥ 3 to have at least one hidden block."
            )

    def _init(self, freeze_first_layer: bool) -> None:
        s = self.scaling
        with torch.no_grad():
            nn.init.normal_(self.input_layer.weight, std=s.sigma_in)
            for block in self.blocks:
                nn.init.normal_(block.linear.weight, std=s.sigma_hidden)
            nn.init.normal_(self._readout_linear().weight, std=s.sigma_out)
        self.input_layer.weight.requires_grad_(not freeze_first_layer)

    def _readout_linear(self) -> nn.Linear:
        return self.readout if isinstance(self.readout, nn.Linear) else self.readout.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.input_layer(x)
        for block in self.blocks:
            f = block(f)
        return self.readout(f)

    def param_groups(self, master_lr: float) -> list[dict]:
        """Optimizer parameter groups with lr = master_lr · η of the input, hidden and readout layers.

        Frozen parameters (requires_grad=False, e.g. a frozen first layer) are left out. Use as
        `torch.optim.SGD(model.param_groups(1e-3))`.
        """
        s = self.scaling
        groups = [
            ("input", [self.input_layer.weight], s.lr_in),
            ("hidden", [b.linear.weight for b in self.blocks], s.lr_hidden),
            ("readout", list(self.readout.parameters()), s.lr_out),
        ]
        out = []
        for name, params, eta in groups:
            params = [p for p in params if p.requires_grad]
            if params:
                out.append({"params": params, "lr": master_lr * eta, "name": name})
        return out


class ReLUMLP(_ChainNet):
    """ReLU MLP of depth L (L weight matrices, no biases); see the module docstring for the indexing.

    scaling: "standard", "ntk", "mfmup" or "fsc" (PAPER.md §6 Table 1), which sets the init std and the
    per-layer learning-rate multipliers used by `param_groups`. freeze_first_layer: W_1 gets requires_grad=False
    (the paper's setting for Fig. 1 and 2).
    """

    def __init__(
        self,
        input_dim: int,
        width: int,
        depth: int,
        output_dim: int = 1,
        scaling: str = "standard",
        freeze_first_layer: bool = False,
    ) -> None:
        super().__init__()
        self._check(input_dim, width, depth, output_dim)
        self.depth = depth
        self.scaling = model_scaling(scaling, width, depth, input_dim, output_dim)
        self.scaling_name = scaling
        self.input_layer = nn.Linear(input_dim, width, bias=False)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth - 2))
        self.readout = ReLUReadout(width, output_dim)
        self._init(freeze_first_layer)


class ResNet(_ChainNet):
    """ResNet f_ℓ = √(1−β²) f_{ℓ−1} + β W_ℓ φ(f_{ℓ−1}) of depth L (PAPER.md §5); see the module docstring.

    beta: a rule of `BRANCH_RULES` ("c/sqrt(L)" uses c) or a constant float, evaluated with L = depth.
    scaling / freeze_first_layer: as for `ReLUMLP`; the hidden learning rate is adapted to β
    (`model_scaling`).
    """

    def __init__(
        self,
        input_dim: int,
        width: int,
        depth: int,
        output_dim: int = 1,
        beta: str | float = "1/sqrt(L)",
        c: float = 1.0,
        scaling: str = "standard",
        freeze_first_layer: bool = False,
    ) -> None:
        super().__init__()
        self._check(input_dim, width, depth, output_dim)
        self.depth = depth
        self.beta = branch_scale(beta, depth, c)
        self.beta_rule = beta
        self.scaling = model_scaling(scaling, width, depth, input_dim, output_dim, beta=self.beta)
        self.scaling_name = scaling
        self.input_layer = nn.Linear(input_dim, width, bias=False)
        self.blocks = nn.ModuleList(ResidualBlock(width, self.beta) for _ in range(depth - 2))
        self.readout = nn.Linear(width, output_dim, bias=False)
        self._init(freeze_first_layer)


def dense_inputs(
    n: int, input_dim: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """n Gaussian inputs rescaled to ‖x‖ = √d each: the paper's dense setting, so that f_1 = W_1 x has rms 1."""
    x = torch.randn(n, input_dim, generator=generator, dtype=dtype)
    return x * math.sqrt(input_dim) / x.norm(dim=1, keepdim=True)


def small_gpt2(
    layers: int = 4,
    width: int = 128,
    *,
    heads: int | None = None,
    block_size: int = 128,
    vocab_size: int = 256,
    dropout: float = 0.0,
    seed: int | None = None,
    **config: object,
):
    """The small GPT-2 (byte vocabulary by default) that the demo, the recipes and the tests build.

    heads: None = one head per 32 channels. dropout: residual and embedding dropout (attention dropout stays 0
    unless `attn_pdrop=` is passed). seed: seeds torch before the weights are drawn (None: the current state).
    Other keyword arguments go to GPT2Config (e.g. attn_implementation="eager" for forward-mode AD).
    """
    from transformers import GPT2Config, GPT2LMHeadModel  # the paper's baselines above need only torch

    settings = dict(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=width,
        n_layer=layers,
        n_head=heads if heads is not None else max(1, width // 32),
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=0.0,
        # GPT-2's bos/eos id 50256 is outside a byte vocabulary; byte 0 never occurs in text.
        bos_token_id=0,
        eos_token_id=0,
    )
    settings.update(config)
    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**settings))
