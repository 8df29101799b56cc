"""apply_branch_scaling on tiny float64 models of every supported family, built from configs (no download)."""

import copy

import pytest
import torch
import transformers as tf
from torch import nn

from hf_fsf.layout import block_input, block_output
from hf_fsf.residual import BranchMultiplier, apply_branch_scaling, get_branch_scaling

V = 100  # vocabulary size
COMMON = {"attn_implementation": "eager", "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
DECODER = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16}
LLAMA_LIKE = ["self_attn.o_proj", "mlp.down_proj"]
# Sandwich norm (h + norm(branch(h))): the branch ends at the norm applied to the attention / MLP output.
POST_NORMS = ["post_attention_layernorm", "post_feedforward_layernorm"]
GEMMA3_TEXT = {**DECODER, **HEADS, "head_dim": 16}
GEMMA3_VISION = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 8,
    "patch_size": 4,
}  # fmt: skip

# family -> (model class, config, expected branch output modules per block, written out by hand)
FAMILIES = {
    "gpt2": (
        tf.GPT2LMHeadModel,
        lambda: tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=16, **COMMON),
        {"transformer.h.*": ["attn.c_proj", "mlp.c_proj"]},
    ),
    "gpt_neox_parallel": (
        tf.GPTNeoXForCausalLM,
        lambda: tf.GPTNeoXConfig(**DECODER, num_attention_heads=2, use_parallel_residual=True, **COMMON),
        {"gpt_neox.layers.*": ["attention.dense", "mlp.dense_4h_to_h"]},
    ),
    "gpt_neox_sequential": (
        tf.GPTNeoXForCausalLM,
        lambda: tf.GPTNeoXConfig(**DECODER, num_attention_heads=2, use_parallel_residual=False, **COMMON),
        {"gpt_neox.layers.*": ["attention.dense", "mlp.dense_4h_to_h"]},
    ),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**DECODER, **HEADS, **COMMON), {"model.layers.*": LLAMA_LIKE}),
    "mistral": (
        tf.MistralForCausalLM,
        lambda: tf.MistralConfig(**DECODER, **HEADS, **COMMON),
        {"model.layers.*": LLAMA_LIKE},
    ),
    "mixtral": (
        tf.MixtralForCausalLM,
        # grouped_mm (the default experts kernel) has no float64 on CPU; the eager loop computes the same thing
        lambda: tf.MixtralConfig(
            **DECODER, **HEADS, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager", **COMMON
        ),
        {"model.layers.*": ["self_attn.o_proj", "mlp.experts"]},
    ),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**DECODER, **HEADS, **COMMON), {"model.layers.*": LLAMA_LIKE}),
    "gemma": (
        tf.GemmaForCausalLM,
        lambda: tf.GemmaConfig(**DECODER, **HEADS, head_dim=16, **COMMON),
        {"model.layers.*": LLAMA_LIKE},
    ),
    "phi": (
        tf.PhiForCausalLM,
        lambda: tf.PhiConfig(**DECODER, num_attention_heads=2, max_position_embeddings=16, **COMMON),
        {"model.layers.*": ["self_attn.dense", "mlp.fc2"]},
    ),
    "vit": (
        tf.ViTModel,
        lambda: tf.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=8,
            patch_size=4, attn_implementation="eager",
        ),
        {"layers.*": ["attention.o_proj", "mlp.fc2"]},
    ),
    "t5": (
        tf.T5ForConditionalGeneration,
        lambda: tf.T5Config(
            vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=2,
            decoder_start_token_id=0, **COMMON,
        ),
        {
            "encoder.block.*": ["layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo"],
            "decoder.block.*": ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wo"],
        },
    ),
    "olmo2": (
        tf.Olmo2ForCausalLM, lambda: tf.Olmo2Config(**DECODER, **HEADS, **COMMON), {"model.layers.*": POST_NORMS},
    ),
    "olmo3": (
        tf.Olmo3ForCausalLM, lambda: tf.Olmo3Config(**DECODER, **HEADS, **COMMON), {"model.layers.*": POST_NORMS},
    ),
    "glm4": (
        tf.Glm4ForCausalLM,
        lambda: tf.Glm4Config(**DECODER, **HEADS, head_dim=16, **COMMON),
        {"model.layers.*": ["post_self_attn_layernorm", "post_mlp_layernorm"]},
    ),
    "gemma2": (
        tf.Gemma2ForCausalLM,
        lambda: tf.Gemma2Config(**DECODER, **HEADS, head_dim=16, **COMMON),
        {"model.layers.*": POST_NORMS},
    ),
    "gemma3_text": (
        tf.Gemma3ForCausalLM, lambda: tf.Gemma3TextConfig(**GEMMA3_TEXT, **COMMON), {"model.layers.*": POST_NORMS},
    ),
    "gemma3": (  # multimodal: the blocks are the language model's; text-only inputs
        tf.Gemma3ForConditionalGeneration,
        lambda: tf.Gemma3Config(
            text_config=GEMMA3_TEXT, vision_config=GEMMA3_VISION, mm_tokens_per_image=4, **COMMON
        ),
        {"model.language_model.layers.*": POST_NORMS},
    ),
}  # fmt: skip

SANDWICH = [
    f for f, (_, _, branches) in FAMILIES.items() if next(iter(branches.values()))[0].endswith("layernorm")
]
# Gemma's RMSNorm multiplies by 1 + weight (modeling_gemma2.py, modeling_gemma3.py): 1/β goes into 1 + weight.
GAIN_OFFSET = {"gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}
# Gemma's RMSNorm computes in float32 whatever the model's dtype (x.float(), weight.float()), so a gain rescaled
# by 1/β is rounded to float32 there: a float64 model agrees to float32 precision only, relative to the largest
# entry of a gradient (a wrong factor β would be off by > 40%).
FLOAT32_NORMS = set(GAIN_OFFSET)


# Parameters that receive 1/β: weight and bias of a projection, the down projection of fused experts.
ABSORBING = ("weight", "bias", "down_proj", "down_proj_bias")


def absorbing_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if n in ABSORBING]


def load(family: str, path) -> nn.Module:
    extra = {"experts_implementation": "eager"} if family == "mixtral" else {}
    return FAMILIES[family][0].from_pretrained(path, dtype=torch.float64, **extra).eval()


def build(family: str) -> nn.Module:
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config()).double().eval()
    with (
        torch.no_grad()
    ):  # HF initializes biases to 0 and gains to 1 (Gemma: 0), which would hide a missed 1/β
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
        for module in model.modules():
            if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter):
                module.weight.add_(torch.randn_like(module.weight), alpha=0.1)
    return model


def absorbed(original: torch.Tensor, module: nn.Module, pname: str, beta: float, family: str) -> torch.Tensor:
    """The parameter after 1/β went into it: the gain c + weight of a norm is divided by β, c from the code."""
    offset = GAIN_OFFSET.get(family, 0.0) if pname == "weight" and "Norm" in type(module).__name__ else 0.0
    return (original + offset) / beta - offset


def inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)}
    ids = torch.randint(1, V, (2, 6), generator=generator)
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, V, (2, 4), generator=generator)}
    return {"input_ids": ids}


def output(model: nn.Module, family: str) -> torch.Tensor:
    out = model(**inputs(family))
    return out.last_hidden_state if family == "vit" else out.logits


def expected_branches(model: nn.Module, family: str) -> dict[str, list[str]]:
    names = [n for n, _ in model.named_modules()]
    expected = {}
    for pattern, rels in FAMILIES[family][2].items():
        stack = pattern.removesuffix(".*")
        for name in names:
            if name.startswith(stack + ".") and name.count(".") == stack.count(".") + 1:
                expected[name] = rels
    return expected


def varying_beta(index: int, n_blocks: int) -> float:
    return 0.3 + 0.25 * index / n_blocks  # a different β per layer, to catch a mix-up of layers


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_the_branches_beta_one_changes_nothing_and_beta_half_does(family):
    model = build(family)
    reference = output(model, family)
    record = apply_branch_scaling(model, beta=1.0)
    assert record.branches == expected_branches(model, family)
    hooks = [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, BranchMultiplier)]
    assert len(hooks) == sum(len(v) for v in record.branches.values())
    assert torch.equal(output(model, family), reference)
    apply_branch_scaling(model, beta=0.5)
    assert not torch.allclose(output(model, family), reference, atol=1e-3)


def block_in_out(model: nn.Module, family: str, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    named = dict(model.named_modules())
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, out):
            captured[name] = (block_input(args, kwargs), block_output(out))

        return hook

    handles = [named[n].register_forward_hook(capture(n), with_kwargs=True) for n in names]
    with torch.no_grad():
        model(**inputs(family))
    for h in handles:
        h.remove()
    return [captured[n] for n in names]


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_zero_makes_every_block_the_identity(family):
    model = build(family)
    names = list(expected_branches(model, family))
    assert not any(torch.equal(i, o) for i, o in block_in_out(model, family, names))  # the check can fail
    apply_branch_scaling(model, beta=0.0)
    for name, (block_in, block_out) in zip(names, block_in_out(model, family, names)):
        assert torch.equal(block_out, block_in), name


@pytest.mark.parametrize("family", FAMILIES)
def test_preserve_function_keeps_outputs_and_scales_the_gradient_of_absorbing_weights_by_beta(family):
    original = build(family)
    model = copy.deepcopy(original)
    record = apply_branch_scaling(model, beta=varying_beta, preserve_function=True)
    assert record.absorbed and get_branch_scaling(model).absorbed
    reference, scaled = output(original, family), output(model, family)
    torch.testing.assert_close(scaled, reference, rtol=0, atol=1e-6)

    # The 1/β is in the weights (and biases) of the branch output modules, nowhere else.
    named, named_original = dict(model.named_modules()), dict(original.named_modules())
    absorbing = {}
    for block, rels in record.branches.items():
        for rel in rels:
            module = named[f"{block}.{rel}"]
            for pname, param in absorbing_parameters(module):
                before = named_original[f"{block}.{rel}"].get_parameter(pname)
                expected = absorbed(before, module, pname, record.beta[block], family)
                torch.testing.assert_close(param, expected, rtol=1e-14, atol=1e-15)
                absorbing[f"{block}.{rel}.{pname}"] = record.beta[block]
    assert absorbing

    # Same function, so every gradient is the same, except those of the absorbing weights: times β.
    weights = torch.randn_like(reference, generator=torch.Generator().manual_seed(2))
    (reference * weights).sum().backward()
    (scaled * weights).sum().backward()
    grads = dict(original.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
            continue
        assert grads[name].grad.abs().max() > 0, name  # a zero gradient would make the check empty
        expected = absorbing.get(name, 1.0) * grads[name].grad
        if family in FLOAT32_NORMS:
            torch.testing.assert_close(
                param.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
            )
        else:
            torch.testing.assert_close(param.grad, expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_restores_beta_without_absorbing_twice(family, tmp_path):
    original = build(family)
    model = copy.deepcopy(original)
    apply_branch_scaling(model, beta=varying_beta, preserve_function=True)
    model.save_pretrained(tmp_path)
    reference = output(original, family)

    loaded = load(family, tmp_path)
    # Without the call the weights still hold 1/β: a different function, which is why β travels in the config.
    assert not torch.allclose(output(loaded, family), reference, atol=1e-3)
    apply_branch_scaling(loaded)
    # 1e-6, not 0: some families recompute buffers (rotary inv_freq) at load time in another precision.
    torch.testing.assert_close(output(loaded, family), output(model, family), rtol=0, atol=1e-6)
    apply_branch_scaling(loaded)  # idempotent: multipliers replaced, not stacked
    torch.testing.assert_close(output(loaded, family), reference, rtol=0, atol=1e-6)

    again = load(family, tmp_path)
    apply_branch_scaling(
        again, beta=varying_beta, preserve_function=True
    )  # same β: the weights stay as saved
    torch.testing.assert_close(output(again, family), reference, rtol=0, atol=1e-6)
    assert get_branch_scaling(again).beta == get_branch_scaling(model).beta


def test_fresh_mode_round_trip_and_no_stacking(tmp_path):
    family = "llama"
    model = build(family)
    apply_branch_scaling(model, beta=0.5)
    once = output(model, family)
    apply_branch_scaling(model, beta=0.5)
    assert torch.equal(output(model, family), once)
    apply_branch_scaling(model, beta=0.25)  # replaces 0.5
    fresh = build(family)
    apply_branch_scaling(fresh, beta=0.25)
    assert torch.equal(output(model, family), output(fresh, family))
    record = get_branch_scaling(model)
    assert not record.absorbed and set(record.weight_scale.values()) <= {1.0}

    model.save_pretrained(tmp_path)
    loaded = load(family, tmp_path)
    unscaled = output(loaded, family)
    apply_branch_scaling(loaded)
    torch.testing.assert_close(output(loaded, family), output(model, family), rtol=0, atol=1e-6)
    assert not torch.allclose(unscaled, output(model, family), atol=1e-3)

    base = tf.LlamaModel.from_pretrained(
        tmp_path, dtype=torch.float64
    ).eval()  # names lose the "model." prefix
    record = apply_branch_scaling(base)
    assert set(record.beta) == {"layers.0", "layers.1"}
    expected = model.model(**inputs(family)).last_hidden_state
    torch.testing.assert_close(base(**inputs(family)).last_hidden_state, expected, rtol=0, atol=1e-6)


def test_replacing_beta_in_preserve_mode_rescales_by_the_ratio():
    family = "gpt2"
    original = build(family)
    model = copy.deepcopy(original)
    apply_branch_scaling(model, beta=0.5, preserve_function=True)
    record = apply_branch_scaling(model, beta=0.2, preserve_function=True)
    torch.testing.assert_close(output(model, family), output(original, family), rtol=0, atol=1e-6)
    assert record.absorbed
    assert all(abs(s - 5.0) < 1e-12 for s in record.weight_scale.values())


def test_one_over_sqrt_depth_counts_blocks_per_stack():
    model = build("t5")
    record = apply_branch_scaling(model, beta="1/sqrt(L)")
    for block, beta in record.beta.items():
        depth = 2 if block.startswith("encoder.") else 3
        assert beta == pytest.approx(depth**-0.5)


def test_preserve_function_refuses_beta_zero():
    with pytest.raises(ValueError, match="β != 0"):
        apply_branch_scaling(build("gpt2"), beta=0.0, preserve_function=True)


def test_preserve_function_refuses_to_zero_weights_of_switched_off_blocks():
    model = build("gpt2")
    apply_branch_scaling(model, beta=0.0)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="currently have β = 0"):
        apply_branch_scaling(model, beta=0.5, preserve_function=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert get_branch_scaling(model).beta["transformer.h.0"] == 0.0


def test_beta_none_needs_a_record():
    with pytest.raises(ValueError, match="has none"):
        apply_branch_scaling(build("gpt2"))


@pytest.mark.parametrize(
    "config",
    [
        lambda: tf.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        ),
        lambda: tf.RobertaConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        ),
    ],
)
def test_post_ln_families_are_refused(config):
    model = tf.AutoModel.from_config(config())
    with pytest.raises(ValueError, match="post-LN"):
        apply_branch_scaling(model, beta=0.5)
    assert get_branch_scaling(model) is None


@pytest.mark.parametrize("family", SANDWICH)
def test_sandwich_blocks_add_beta_times_the_normed_branch(family):
    """h <- h + β·norm(attn(.)), then h <- h + β·norm(mlp(.)), recomputed from the captured branch outputs."""
    model = build(family)
    record = apply_branch_scaling(model, beta=varying_beta)
    named = dict(model.named_modules())
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, out):
            captured[name] = (block_input(args, kwargs), block_output(out))

        return hook

    watched = [f"{b}.{rel}" for b in record.branches for rel in ("self_attn", "mlp")] + list(record.branches)
    handles = [named[n].register_forward_hook(capture(n), with_kwargs=True) for n in watched]
    with torch.no_grad():
        model(**inputs(family))
    for handle in handles:
        handle.remove()
    for block, (attn_norm, mlp_norm) in record.branches.items():
        beta, (h, block_out) = record.beta[block], captured[block]
        # forward() bypasses the multiplier hook: the norm as the model defines it
        h = h + named[f"{block}.{attn_norm}"].forward(captured[f"{block}.self_attn"][1]) * beta
        h = h + named[f"{block}.{mlp_norm}"].forward(captured[f"{block}.mlp"][1]) * beta
        torch.testing.assert_close(block_out, h, rtol=1e-13, atol=1e-13)
        assert not torch.allclose(block_out, captured[block][0], atol=1e-3)  # the branches do contribute


def test_unknown_sandwich_family_is_refused_and_explicit_post_norms_work():
    model = build("gemma2")
    model.config.model_type = "my_gemma_copy"
    with pytest.raises(ValueError, match="post-branch norm"):
        apply_branch_scaling(model, beta=0.5)
    assert get_branch_scaling(model) is None
    reference = output(model, "gemma2")
    record = apply_branch_scaling(model, beta=0.5, preserve_function=True, branches=POST_NORMS)
    assert record.absorbed
    torch.testing.assert_close(output(model, "gemma2"), reference, rtol=0, atol=1e-6)


def test_altup_blocks_are_refused():
    model = build("gemma2")
    model.config.model_type = (
        "gemma3n_text"  # the family is read from the config; a real Gemma 3n takes ~10 s
    )
    with pytest.raises(ValueError, match="AltUp"):
        apply_branch_scaling(model, beta=0.5)


class ToyBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.proj(torch.relu(self.fc(self.norm(h))))


class Toy(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_unknown_shape_raises_and_explicit_branches_work():
    model = Toy().double()
    with pytest.raises(ValueError, match="branches="):
        apply_branch_scaling(model, beta=0.5)
    x = torch.randn(5, 4, dtype=torch.float64)
    reference = model(x)
    record = apply_branch_scaling(model, beta="1/L", preserve_function=True, branches=["proj"])
    assert record.beta == {f"blocks.{i}": pytest.approx(1 / 3) for i in range(3)}
    torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-12)
    apply_branch_scaling(model, beta=0.0)  # now every block is the identity: the output is head(embed(x))
    torch.testing.assert_close(model(x), model.head(model.embed(x)), rtol=0, atol=0)


class SquaredGainNorm(nn.Module):
    """A norm whose output is not proportional to its weight (gain weight²): no weight rescaling absorbs 1/β."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, h):
        return nn.functional.rms_norm(h, h.shape[-1:]) * self.weight**2


class SandwichToyBlock(ToyBlock):
    def __init__(self, width: int, post_norm: nn.Module):
        super().__init__(width)
        self.post = post_norm

    def forward(self, h):
        return h + self.post(self.proj(torch.relu(self.fc(self.norm(h)))))


def sandwich_toy(post_norm) -> Toy:
    torch.manual_seed(0)
    model = Toy()
    model.blocks = nn.ModuleList(SandwichToyBlock(8, post_norm(8)) for _ in range(3))
    with torch.no_grad():
        for block in model.blocks:
            for param in block.post.parameters():
                param.normal_(1.0, 0.3)  # a LayerNorm's bias too, so a bias missing its 1/β shows
    return model.double()


def test_post_branch_layer_norm_with_bias_absorbs_one_over_beta():
    model = sandwich_toy(nn.LayerNorm)
    x = torch.randn(5, 4, dtype=torch.float64)
    reference = model(x)
    weight, bias = model.blocks[1].post.weight.clone(), model.blocks[1].post.bias.clone()
    apply_branch_scaling(model, beta=0.25, preserve_function=True, branches=["post"])
    torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-12)
    assert torch.equal(model.blocks[1].post.weight, weight * 4.0) and torch.equal(
        model.blocks[1].post.bias, bias * 4.0
    )
    apply_branch_scaling(model, beta=0.0)
    torch.testing.assert_close(model(x), model.head(model.embed(x)), rtol=0, atol=0)


def test_norm_whose_output_is_not_proportional_to_its_gain_is_refused():
    model = sandwich_toy(SquaredGainNorm)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="neither to weight nor to 1 \\+ weight"):
        apply_branch_scaling(model, beta=0.5, preserve_function=True, branches=["post"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert get_branch_scaling(model) is None
    apply_branch_scaling(model, beta=0.5, branches=["post"])  # the fresh mode needs no absorption


def test_unverified_family_warns_with_what_it_found():
    config = tf.Qwen3Config(**DECODER, **HEADS, head_dim=16, **COMMON)
    model = tf.Qwen3ForCausalLM(config)
    model.config.model_type = "my_llama_copy"
    with pytest.warns(UserWarning, match="not among the verified families"):
        record = apply_branch_scaling(model, beta=0.5)
    assert set(map(tuple, record.branches.values())) == {tuple(LLAMA_LIKE)}


def test_bad_beta_is_explained():
    with pytest.raises(ValueError, match="1/sqrt"):
        apply_branch_scaling(build("gpt2"), beta="sqrt(L)")
    with pytest.raises(ValueError, match="finite"):
        apply_branch_scaling(build("gpt2"), beta=float("nan"))


def test_blocks_given_as_a_layout_scale_the_same_branches_as_their_names():
    from hf_fsf import find_blocks

    by_names, by_layout = build("gpt2"), build("gpt2")
    names = find_blocks(by_names).names
    expected = apply_branch_scaling(by_names, beta="1/L", blocks=names)
    record = apply_branch_scaling(by_layout, beta="1/L", blocks=find_blocks(by_layout, names))
    assert len(names) >= 2 and list(record.beta) == names
    assert record.beta == expected.beta and record.branches == expected.branches
