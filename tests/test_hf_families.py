"""find_blocks and the probe on tiny Hugging Face models of every common family, built from configs (no download).

Layout: the blocks are the decoder / encoder layers, the stem the embeddings, the head the final norm plus the LM head
or classifier, and tied embeddings are recognized. Families the issue names and "unseen" ones (OPT, Falcon, BLOOM,
GPT-J, Qwen3, Gemma2, StableLM, DistilBERT, Electra, BART, Whisper) go through the same structural rule, no entry.

Exactness (float64, dropout on, AdamW): every block's fsf_ratio is 1 to first order, and the probe's stem + blocks +
head contributions equal −⟨∇L, δw⟩ from an independent autograd pass with the random state replayed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from torch.func import functional_call

from hf_fsf import FeatureSpeedProbe, find_blocks

LAYERS = 3
HIDDEN = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64
)
GQA = dict(num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    config: type
    kwargs: dict
    model: type
    inputs: str  # "lm", "cls", "image", "seq2seq", "audio"
    blocks: str  # the block list, as in named_modules()
    stem: tuple[str, ...]  # each stem parameter (tied ones by their stem name) starts with one; each owns one
    head: tuple[str, ...]  # the same for the head
    tied: tuple[str, str] | None = None  # (stem name, head name) of the tied embedding


LM = ("model.norm.", "lm_head.")
EMBED = ("model.embed_tokens.",)
GEMMA_TIED = ("model.embed_tokens.weight", "lm_head.weight")
GPT_TIED = ("transformer.word_embeddings.weight", "lm_head.weight")
DROP = dict(attention_dropout=0.1)
SEQ2SEQ = dict(
    encoder_layers=LAYERS,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=100,
    d_model=32,
)

# fmt: off
# The families the issue names.
NAMED = {
    "gpt2": Family(tf.GPT2Config, dict(vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=4), tf.GPT2LMHeadModel,
                   "lm", "transformer.h", ("transformer.wte.", "transformer.wpe."), ("transformer.ln_f.", "lm_head."),
                   ("transformer.wte.weight", "lm_head.weight")),
    "gpt_neox": Family(tf.GPTNeoXConfig, dict(**HIDDEN, **DROP, hidden_dropout=0.1), tf.GPTNeoXForCausalLM,
                       "lm", "gpt_neox.layers", ("gpt_neox.embed_in.",), ("gpt_neox.final_layer_norm.", "lm_head.")),
    "llama": Family(tf.LlamaConfig, dict(**HIDDEN, **GQA, **DROP), tf.LlamaForCausalLM, "lm", "model.layers",
                    EMBED, LM),
    "mistral": Family(tf.MistralConfig, dict(**HIDDEN, **GQA, **DROP), tf.MistralForCausalLM, "lm", "model.layers",
                      EMBED, LM),
    # experts_implementation: grouped_mm, the default expert kernel, has no float64
    "mixtral": Family(tf.MixtralConfig, dict(**HIDDEN, **GQA, num_local_experts=4, num_experts_per_tok=2,
                                             experts_implementation="eager"),
                      tf.MixtralForCausalLM, "lm", "model.layers", EMBED, LM),
    "qwen2": Family(tf.Qwen2Config, dict(**HIDDEN, **GQA, **DROP), tf.Qwen2ForCausalLM, "lm", "model.layers",
                    EMBED, LM),
    "gemma": Family(tf.GemmaConfig, dict(**HIDDEN, **GQA, head_dim=8, **DROP), tf.GemmaForCausalLM, "lm",
                    "model.layers", EMBED, LM, GEMMA_TIED),
    "phi": Family(tf.PhiConfig, dict(**HIDDEN, resid_pdrop=0.1, embd_pdrop=0.1, **DROP), tf.PhiForCausalLM, "lm",
                  "model.layers", EMBED, ("model.final_layernorm.", "lm_head.")),
    "bert": Family(tf.BertConfig, dict(**HIDDEN, num_labels=3), tf.BertForSequenceClassification, "cls",
                   "bert.encoder.layer", ("bert.embeddings.",), ("bert.pooler.", "classifier.")),
    "roberta": Family(tf.RobertaConfig, dict(**HIDDEN, pad_token_id=1), tf.RobertaForMaskedLM, "lm",
                      "roberta.encoder.layer", ("roberta.embeddings.",), ("lm_head.",),
                      ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight")),
    "vit": Family(tf.ViTConfig, dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=64, image_size=8, patch_size=4, num_labels=3,
                                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
                  tf.ViTForImageClassification, "image", "vit.layers", ("vit.embeddings.",),
                  ("vit.layernorm.", "classifier.")),
    "t5": Family(tf.T5Config, dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4,
                                   decoder_start_token_id=0),
                 tf.T5ForConditionalGeneration, "seq2seq", "encoder.block", ("encoder.embed_tokens.",),
                 ("encoder.final_layer_norm.", "decoder.", "lm_head."),
                 ("encoder.embed_tokens.weight", "lm_head.weight")),
}

# Families with the same shapes that the rule must handle without an entry of their own.
UNSEEN = {
    # OPT registers its final norm before its layers: only the execution order gets it right.
    "opt": Family(tf.OPTConfig, dict(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                                     eos_token_id=2),
                  tf.OPTForCausalLM, "lm", "model.decoder.layers",
                  ("model.decoder.embed_tokens.", "model.decoder.embed_positions."),
                  ("model.decoder.final_layer_norm.", "lm_head."),
                  ("model.decoder.embed_tokens.weight", "lm_head.weight")),
    "falcon": Family(tf.FalconConfig, dict(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS,
                                           num_attention_heads=4, hidden_dropout=0.1, **DROP),
                     tf.FalconForCausalLM, "lm", "transformer.h", ("transformer.word_embeddings.",),
                     ("transformer.ln_f.", "lm_head."), GPT_TIED),
    "bloom": Family(tf.BloomConfig, dict(vocab_size=100, hidden_size=32, n_layer=LAYERS, n_head=4,
                                         hidden_dropout=0.1, **DROP),
                    tf.BloomForCausalLM, "lm", "transformer.h",
                    ("transformer.word_embeddings.", "transformer.word_embeddings_layernorm."),
                    ("transformer.ln_f.", "lm_head."), GPT_TIED),
    "gptj": Family(tf.GPTJConfig, dict(vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=4, rotary_dim=4,
                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=1,
                                       eos_token_id=2),
                   tf.GPTJForCausalLM, "lm", "transformer.h", ("transformer.wte.",), ("transformer.ln_f.", "lm_head.")),
    "qwen3": Family(tf.Qwen3Config, dict(**HIDDEN, **GQA, head_dim=8, **DROP), tf.Qwen3ForCausalLM, "lm",
                    "model.layers", EMBED, LM),
    "gemma2": Family(tf.Gemma2Config, dict(**HIDDEN, **GQA, head_dim=8, **DROP), tf.Gemma2ForCausalLM, "lm",
                     "model.layers", EMBED, LM, GEMMA_TIED),
    "stablelm": Family(tf.StableLmConfig, dict(**HIDDEN, num_key_value_heads=4, hidden_dropout=0.1, **DROP),
                       tf.StableLmForCausalLM, "lm", "model.layers", EMBED, LM),
    "distilbert": Family(tf.DistilBertConfig, dict(vocab_size=100, dim=32, n_layers=LAYERS, n_heads=4,
                                                   hidden_dim=64, num_labels=3),
                         tf.DistilBertForSequenceClassification, "cls", "distilbert.transformer.layer",
                         ("distilbert.embeddings.",), ("pre_classifier.", "classifier.")),
    "electra": Family(tf.ElectraConfig, dict(**HIDDEN, embedding_size=16, num_labels=3),
                      tf.ElectraForSequenceClassification, "cls", "electra.encoder.layer",
                      ("electra.embeddings.", "electra.embeddings_project."), ("classifier.",)),
    # BART registers its embedding norm after its layers.
    "bart": Family(tf.BartConfig, SEQ2SEQ, tf.BartForConditionalGeneration, "seq2seq", "model.encoder.layers",
                   ("model.encoder.embed_tokens.", "model.encoder.embed_positions.",
                    "model.encoder.layernorm_embedding."),
                   ("model.decoder.", "lm_head."), ("model.encoder.embed_tokens.weight", "lm_head.weight")),
    # Whisper's input embeddings are the decoder's: the encoder's stem is its convolutions.
    "whisper": Family(tf.WhisperConfig, dict(**SEQ2SEQ, num_mel_bins=8, max_source_positions=8,
                                             max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                             decoder_start_token_id=3, dropout=0.1),
                      tf.WhisperForConditionalGeneration, "audio", "model.encoder.layers",
                      ("model.encoder.conv1.", "model.encoder.conv2.", "model.encoder.embed_positions."),
                      ("model.encoder.layer_norm.", "model.decoder.")),
}
# fmt: on
FAMILIES = {**NAMED, **UNSEEN}
# T5's encoder is not an exact chain (its position bias, see test_t5_*); every other family is.
CHAINS = [name for name in FAMILIES if name != "t5"]


def build(name: str, **overrides) -> tuple[torch.nn.Module, dict]:
    family = FAMILIES[name]
    torch.manual_seed(0)
    config = family.config(**{**family.kwargs, **overrides}, attn_implementation="eager")
    model = family.model(config).double().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    if family.inputs == "lm":
        return model, dict(input_ids=ids, labels=ids)
    if family.inputs == "cls":
        return model, dict(input_ids=ids, labels=torch.tensor([0, 2]))
    if family.inputs == "image":
        pixels = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
        return model, dict(pixel_values=pixels, labels=torch.tensor([0, 2]))
    targets = torch.randint(4, 100, (2, 4), generator=g)
    if family.inputs == "audio":
        features = torch.randn(2, 8, 16, generator=g, dtype=torch.float64)  # 2 x max_source_positions frames
        return model, dict(input_features=features, labels=targets)
    return model, dict(input_ids=ids, labels=targets)


def owned(names: list[str], prefixes: tuple[str, ...]) -> bool:
    """Every name starts with one of the prefixes, and every prefix has a name."""
    return all(n.startswith(prefixes) for n in names) and all(
        any(n.startswith(p) for n in names) for p in prefixes
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layout(name):
    family = FAMILIES[name]
    model, _ = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout = find_blocks(model)
    # T5's position-bias warning has a test of its own; no other family passes anything around the stream.
    expected_warnings = 1 if name == "t5" else 0
    assert len([w for w in caught if "find_blocks" in str(w.message)]) == expected_warnings
    assert layout.traced
    assert layout.names == [f"{family.blocks}.{i}" for i in range(LAYERS)]
    stem = [n for n, _ in layout.stem_params] + [t.stem_name for t in layout.tied]
    head = [n for n, _ in layout.head_params] + [t.head_name for t in layout.tied]
    assert owned(stem, family.stem), stem
    assert owned(head, family.head), head
    assert [(t.stem_name, t.head_name) for t in layout.tied] == ([family.tied] if family.tied else [])
    for tied in layout.tied:  # the module that the probe hooks for the stem's share of the tied gradient
        assert tied.stem_module is dict(model.named_modules(remove_duplicate=False))[tied.stem_module_name]
    # A partition: every parameter in exactly one place.
    placed = [p for _, p in layout.stem_params + layout.head_params] + [t.param for t in layout.tied]
    placed += [p for params in layout.block_params for _, p in params]
    assert len(placed) == len({id(p) for p in placed}) == len(list(model.parameters()))


def measure(model, inputs, blocks=None, lr=1e-6):
    """The probe's stats of one AdamW step, and −⟨∇L, δw⟩ from an independent autograd pass."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = FeatureSpeedProbe(model, blocks)
    with probe:
        trainable = [p for p in model.parameters() if p.requires_grad]
        stats = probe.measure_step(
            lambda: model(**inputs).loss, torch.optim.AdamW(trainable, lr=lr), angle=True
        )
    leaves = {n: v.clone().requires_grad_(True) for n, v in before.items()}
    torch.set_rng_state(rng)  # the same dropout masks as the measured step
    loss = functional_call(model, leaves, args=(), kwargs=inputs).loss
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    after = dict(model.named_parameters())
    decrease = -sum(
        float((g * (after[n].detach() - before[n])).sum()) for n, g in zip(leaves, grads) if g is not None
    )
    return stats, decrease


def fsf_errors(stats) -> list[float]:
    return [abs(b.fsf_ratio - 1) for b in stats.blocks]


@pytest.mark.parametrize("name", CHAINS)
def test_fsf_ratio_is_one_and_contributions_add_up(name):
    model, inputs = build(name)
    stats, decrease = measure(model, inputs)
    assert stats.valid and len(stats.blocks) == LAYERS
    assert abs(stats.total_loss_decrease - decrease) <= 1e-8 * abs(decrease)
    # The float32 softmax of HF's eager attention and the step's curvature leave ~1e-5; a misplaced final norm
    # (OPT read in registration order) is off by ~1e-3.
    assert max(fsf_errors(stats)) < 1e-4, [b.fsf_ratio for b in stats.blocks]


def test_t5_encoder_chain_needs_its_position_bias_frozen():
    """Encoder block 0 computes the relative position bias that blocks 1.. reuse: a path around f_ℓ."""
    # T5's layer norm takes its variance in float32: a larger step than elsewhere keeps that noise below 1e-4.
    lr = 5e-6
    model, inputs = build("t5")
    with pytest.warns(UserWarning, match="position_bias"):
        find_blocks(model)
    stats, decrease = measure(model, inputs, lr=lr)
    assert abs(stats.total_loss_decrease - decrease) <= 1e-8 * abs(decrease)
    assert fsf_errors(stats)[0] > 1e-3  # the bias's contribution is in ΔL_{≤0} but not in ⟨δf_0, b_0⟩
    assert fsf_errors(stats)[-1] < 1e-4  # after the last block everything flows through f_L

    model, inputs = build("t5")
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_blocks(model)  # frozen: nothing trainable goes around the stream, no warning
    stats, _ = measure(model, inputs, lr=lr)
    assert max(fsf_errors(stats)) < 1e-4


def test_encoder_decoder_picks_the_encoder_or_the_decoder_by_name():
    model, _ = build("bart")
    assert (
        find_blocks(model).names
        == find_blocks(model, "encoder").names
        == [f"model.encoder.layers.{i}" for i in range(LAYERS)]
    )
    decoder = find_blocks(model, "decoder")
    assert decoder.names == ["model.decoder.layers.0", "model.decoder.layers.1"]
    stem = [n for n, _ in decoder.stem_params]
    assert any(n.startswith("model.encoder.layers.") for n in stem)  # the encoder is upstream of the decoder
    assert "model.decoder.layernorm_embedding.weight" in stem  # registered after the layers, runs before them
    assert decoder.head_params == [] and [t.head_name for t in decoder.tied] == ["lm_head.weight"]
    assert find_blocks(model, "model.decoder.layers").names == decoder.names


def test_decoder_chain_holds_only_with_the_encoder_frozen():
    """The encoder feeds every decoder block through cross-attention, so its parameters bypass f_ℓ."""
    model, inputs = build("bart")
    stats, _ = measure(model, inputs, blocks="decoder")
    assert max(fsf_errors(stats)) > 1e-2
    model, inputs = build("bart")
    model.model.encoder.requires_grad_(False)
    model.model.shared.requires_grad_(False)  # also the encoder's input (tied to the LM head)
    stats, decrease = measure(model, inputs, blocks="decoder")
    assert abs(stats.total_loss_decrease - decrease) <= 1e-8 * abs(decrease)
    assert max(fsf_errors(stats)) < 1e-4


def test_mixtral_router_aux_loss_bypasses_the_stream():
    """With output_router_logits the load-balancing loss reads each block's router logits, computed from the
    block's input: a path from every block to the loss that skips the later ones (freezing the routers does not
    close it). Measure with output_router_logits=False."""
    model, inputs = build("mixtral", output_router_logits=True, router_aux_loss_coef=0.1)
    stats, decrease = measure(model, inputs)
    assert abs(stats.total_loss_decrease - decrease) <= 1e-8 * abs(decrease)
    assert fsf_errors(stats)[-1] > 1e-3


def test_execution_order_beats_registration_order():
    """OPT registers final_layer_norm before its layers; plain registration order puts it in the stem."""
    model, _ = build("opt")
    naive = find_blocks(model, trace=False)
    assert "model.decoder.final_layer_norm.weight" in [n for n, _ in naive.stem_params]
    traced = find_blocks(model)
    assert "model.decoder.final_layer_norm.weight" in [n for n, _ in traced.head_params]
    # A failed dry forward falls back to registration order, and says so.
    with pytest.warns(UserWarning, match="example_inputs"):
        fallback = find_blocks(model, example_inputs={"no_such_argument": 1})
    assert not fallback.traced and fallback.stem_params == naive.stem_params


def test_example_inputs_order_any_model():
    class FinalNormFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(4)  # registered first, runs last
            self.embed = torch.nn.Linear(3, 4)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            h = self.embed(x)
            for layer in self.layers:
                h = h + layer(h)
            return self.norm(h)

    model = FinalNormFirst()
    no_trace = find_blocks(model)  # a plain model without example inputs: registration order
    assert [n for n, _ in no_trace.stem_params][:2] == ["norm.weight", "norm.bias"]
    layout = find_blocks(model, example_inputs=torch.randn(2, 3))
    assert [n for n, _ in layout.stem_params] == ["embed.weight", "embed.bias"]
    assert [n for n, _ in layout.head_params] == ["norm.weight", "norm.bias"]
    # Blocks given out of order are put in the order the forward runs them.
    swapped = find_blocks(model, ["layers.1", "layers.0"], example_inputs=torch.randn(2, 3))
    assert swapped.names == ["layers.0", "layers.1"]


def test_the_trace_leaves_no_trace():
    model, _ = build("gpt2")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    model.transformer.h[1].eval()
    find_blocks(model)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and model.transformer.h[0].training and not model.transformer.h[1].training
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in model.named_parameters())


def test_unknown_shapes_say_how_to_pass_blocks():
    # ALBERT applies one layer three times: there is no list of blocks.
    config = tf.AlbertConfig(**HIDDEN, embedding_size=16)
    albert = tf.AlbertForMaskedLM(config)
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(albert)
    model, _ = build("llama")
    with pytest.raises(ValueError, match="no block list matches.*'model.layers'"):
        find_blocks(model, "decoder_stack")
    with pytest.raises(TypeError, match="blocks="):
        find_blocks(model, model.model.layers[0])
