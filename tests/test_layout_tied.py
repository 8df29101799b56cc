"""Input and output embeddings tied without a module call: the head computes `h @ embed.weight.T` (or
`F.linear(h, embed.weight)`), as research language models do.

The embedding's gradient mixes the stem's path and the head's; only the stem's counts in ΔL_{≤ℓ} (PAPER.md §2).
With example inputs, the layout's trace sees the head's direct use of the weight and makes it a tied parameter, so
the probe measures the stem's share at the embedding's output. The independent side here takes the stem path's
gradient from the embedding output's gradient b_0, scattered back to the rows of the tokens that read them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_fsf import FeatureSpeedProbe, find_blocks

VOCAB, WIDTH, DEPTH = 13, 8, 3


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class ResearchLM(nn.Module):
    """embedding -> residual MLP blocks -> final norm -> logits from the embedding weight, without a module call.

    head: 'matmul' (h @ W.T), 'linear' (F.linear(h, W)), or 'early_transpose' (W.T taken before the blocks and
    used after them)."""

    def __init__(self, head: str = "matmul"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(ResidualMLP() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = head

    def run(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, [f_ℓ]) from the embedding output h."""
        weight_t = self.embed.weight.T if self.head == "early_transpose" else None
        feats = []
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        h = self.norm(h)
        if self.head == "linear":
            return F.linear(h, self.embed.weight), feats
        return h @ (weight_t if weight_t is not None else self.embed.weight.T), feats

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(self.embed(ids))[0]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def make(head: str) -> tuple[ResearchLM, torch.Tensor]:
    torch.manual_seed(0)
    return ResearchLM(head).double(), torch.randint(0, VOCAB, (4, 7))


def independent(model: ResearchLM, before: ResearchLM, ids: torch.Tensor) -> dict:
    """The applied step's −⟨∇L, δw⟩ in total, for the stem's path of the embedding, for the head's, and for each
    block. The embedding output is a leaf here, so the embedding weight's gradient is its head path alone."""
    embedded = before.embed(ids).detach().requires_grad_(True)
    logits, _ = before.run(embedded)
    params = dict(before.named_parameters())
    grads = torch.autograd.grad(lm_loss(logits, ids), [embedded, *params.values()])
    b0, other_paths = grads[0], dict(zip(params, grads[1:]))
    after = dict(model.named_parameters())
    delta = {n: (after[n] - params[n]).detach() for n in params}
    # The stem path's gradient of the embedding: each token's row receives b_0 at that token's positions.
    stem_grad = torch.zeros_like(params["embed.weight"]).index_add_(0, ids.flatten(), b0.flatten(0, 1))
    stem = -float((stem_grad * delta["embed.weight"]).sum())
    full = torch.autograd.grad(lm_loss(before(ids), ids), list(params.values()))
    return {
        "total": -sum(float((g * delta[n]).sum()) for n, g in zip(params, full)),
        "split_total": stem - sum(float((other_paths[n] * delta[n]).sum()) for n in params),
        "stem": stem,
        "head_path": -float((other_paths["embed.weight"] * delta["embed.weight"]).sum()),
        "blocks": [
            -sum(float((other_paths[n] * delta[n]).sum()) for n in params if n.startswith(f"blocks.{i}."))
            for i in range(DEPTH)
        ],
        "head": -sum(float((other_paths[n] * delta[n]).sum()) for n in params if n.startswith("norm.")),
    }


def measure(head: str):
    model, ids = make(head)
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    with FeatureSpeedProbe(model, example_inputs=ids) as probe:
        stats = probe.measure_step(lambda: lm_loss(model(ids), ids), opt, angle=True)
    return stats, independent(model, before, ids), probe.layout


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("head", ["matmul", "linear", "early_transpose"])
def test_direct_head_use_of_the_embedding_is_a_tied_parameter(head):
    model, ids = make(head)
    layout = find_blocks(model, example_inputs=ids)
    assert layout.traced and layout.stem_params == []
    assert [(t.stem_name, t.head_name, t.stem_module_name) for t in layout.tied] == [
        ("embed.weight", "embed.weight", "embed")
    ]
    assert layout.tied[0].stem_module is model.embed
    assert [n for n, _ in layout.head_params] == ["norm.weight", "norm.bias"]


@pytest.mark.parametrize("head", ["matmul", "linear", "early_transpose"])
def test_stem_share_of_a_directly_tied_embedding_is_exact(head):
    stats, ref, _ = measure(head)
    assert stats.valid and stats.angle
    assert abs(ref["head_path"]) > 0.1 * abs(ref["stem"])  # the head's share is not negligible
    assert rel(ref["split_total"], ref["total"]) < 1e-10  # the paths add up to the full gradient
    measured = stats.stem_contribution + sum(b.contribution for b in stats.blocks) + stats.head_contribution
    assert abs(measured - ref["total"]) <= 1e-8 * abs(ref["total"])
    assert rel(stats.total_loss_decrease, ref["total"]) < 1e-8
    assert rel(stats.stem_contribution, ref["stem"]) < 1e-8
    assert rel(stats.head_contribution, ref["head"] + ref["head_path"]) < 1e-8
    decrease = ref["stem"]
    for block, contribution in zip(stats.blocks, ref["blocks"]):
        decrease += contribution
        assert rel(block.contribution, contribution) < 1e-8, block.name
        assert rel(block.loss_decrease, decrease) < 1e-8, block.name
        assert abs(block.fsf_ratio - 1) < 1e-4, (block.name, block.fsf_ratio)


class RawStemLM(ResearchLM):
    """The stem reads the tied weight outside a module call too: no module output carries its stem share."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(self.embed(ids) + 0.1 * self.embed.weight.mean(0))[0]


class ParameterOnlyLM(ResearchLM):
    """The tied weight is a bare parameter of the model, read with F.embedding: there is no stem module to re-run."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, WIDTH))
        del self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.table)
        for block in self.blocks:
            h = block(h)
        return self.norm(h) @ self.table.T


class BetweenBlocksLM(ResearchLM):
    """The embedding weight is read between blocks: it reaches the loss around f_ℓ."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h) + self.embed.weight[0]
        return self.norm(h) @ self.embed.weight.T


@pytest.mark.parametrize(
    ("model_class", "message"),
    [
        (RawStemLM, "op outside its module uses it before the blocks"),
        (ParameterOnlyLM, "op outside its module uses it before the blocks"),
        (BetweenBlocksLM, "by an op outside their module while the blocks run"),
    ],
)
def test_direct_uses_the_probe_cannot_split_are_refused(model_class, message):
    model = model_class().double()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=message):
        FeatureSpeedProbe(model, example_inputs=ids)


def test_a_tied_stem_module_with_other_parameters_is_refused():
    class BiasedEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(VOCAB, WIDTH))
            self.bias = nn.Parameter(torch.zeros(WIDTH))

        def forward(self, ids):
            return F.embedding(ids, self.weight) + self.bias

    model = ResearchLM().double()
    model.embed = BiasedEmbedding().double()
    with pytest.raises(ValueError, match=r"also owns \['bias'\]"):
        find_blocks(model, example_inputs=torch.randint(0, VOCAB, (2, 5)))


def test_a_tied_stem_module_called_twice_before_the_blocks_is_refused():
    class TwiceLM(ResearchLM):
        def forward(self, ids):
            return self.run(self.embed(ids) + self.embed(ids.flip(1)))[0]

    with pytest.raises(ValueError, match="runs 2 times before the blocks"):
        find_blocks(TwiceLM().double(), example_inputs=torch.randint(0, VOCAB, (2, 5)))


def test_parameters_of_the_model_itself_are_placed_by_when_they_are_used():
    """A bare parameter of the model used after the blocks (a learned logit scale) is head; registration order
    puts a module's own parameters before its children's, in the stem."""

    class LogitScale(ResearchLM):
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.ones(()))

        def forward(self, ids):
            return self.run(self.embed(ids))[0] * self.logit_scale

    model = LogitScale().double()
    ids = torch.randint(0, VOCAB, (2, 5))
    assert [n for n, _ in find_blocks(model, trace=False).stem_params][:1] == ["logit_scale"]
    layout = find_blocks(model, example_inputs=ids)
    assert [n for n, _ in layout.head_params] == ["logit_scale", "norm.weight", "norm.bias"]
