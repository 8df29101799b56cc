"""recipes/finetune.py on a local checkpoint it did not write: a tiny Llama with a tokenizer trained here (no download).

The recipe builds the checkpoint's own architecture with its own tokenizer, trains it (fully or with LoRA), and
refuses checkpoints whose weights or vocabulary do not match their config instead of training random weights.
"""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        continue\n",
]
TINY_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--logging_steps", "1", "--fsf_angle_every", "1", "--report_to", "none"]  # fmt: skip


def _finetune_recipe():
    spec = importlib.util.spec_from_file_location("recipe_finetune", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = _finetune_recipe()


def _tokenizer():
    """A byte-level BPE trained on a few sentences, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama(tokenizer, layers: int = 2, **config):
    """A tiny Llama whose vocabulary and special tokens are the tokenizer's (also used by test_trl.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "fsf_stats.jsonl").read_text().splitlines()]


def test_load_checkpoint_keeps_the_checkpoint_weights_and_tokenizer(llama_dir):
    from safetensors.torch import load_file

    model, tokenizer = finetune.load_checkpoint(llama_dir, "lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    saved = load_file(llama_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert tokenizer.get_vocab() == _tokenizer().get_vocab()
    # The classifier keeps the body and adds a head; the LM head it drops is no error.
    classifier, _ = finetune.load_checkpoint(llama_dir, "classify", num_labels=3)
    assert torch.equal(classifier.model.embed_tokens.weight, saved["model.embed_tokens.weight"])


def test_finetune_lm_on_a_local_llama_with_its_tokenizer(llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    finetune.main(["--checkpoint", str(llama_dir), "--task", "lm", "--block_size", "32", "--max_bytes", "20000",
                   *TINY_RUN, "--output_dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and f"({len(_tokenizer())} tokens)" in out  # not byte-level
    assert [r["step"] for r in _records(tmp_path)] == [1, 2]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert trained.config.num_hidden_layers == 2 and trained.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(tmp_path / "final").get_vocab() == _tokenizer().get_vocab()
    assert math.isfinite(json.loads((tmp_path / "eval_metrics.json").read_text())["eval_loss"])


def test_finetune_classify_with_lora(llama_dir, tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    finetune.main(["--checkpoint", str(llama_dir), "--task", "classify", "--lora_r", "4",
                   "--snippets_per_class", "4", "--snippet_bytes", "48", *TINY_RUN,
                   "--output_dir", str(tmp_path)])  # fmt: skip
    adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert any("lora_A" in name for name in adapter) and any("score" in name for name in adapter)
    assert not any("embed_tokens" in name for name in adapter)  # the body is frozen: only adapters and head
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert [b["name"] for b in records[-1]["blocks"]] == [
        "base_model.model.model.layers.0",
        "base_model.model.model.layers.1",
    ]
    assert 0.0 <= json.loads((tmp_path / "eval_metrics.json").read_text())["eval_accuracy"] <= 1.0


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _gpt2_config(folder: Path) -> None:
    from hf_fsf.models import small_gpt2

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    small_gpt2(2, 32, vocab_size=vocab).config.save_pretrained(folder)  # a GPT-2 config over Llama weights


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda f: _edit_config(f, num_hidden_layers=3), r"1 missing|9 missing"),
        (lambda f: _edit_config(f, hidden_size=64), "cannot load"),
        (_gpt2_config, "does not hold the weights"),
        (lambda f: _edit_config(f, vocab_size=200), "cannot load"),
        (
            lambda f: (f / "tokenizer.json").unlink() or (f / "tokenizer_config.json").unlink(),
            "no tokenizer files",
        ),
    ],
    ids=["extra-layer", "other-width", "other-architecture", "other-vocab-size", "no-tokenizer"],
)
def test_mismatched_checkpoints_are_errors(llama_dir, tmp_path, break_it, message):
    folder = tmp_path / "broken"
    shutil.copytree(llama_dir, folder)
    break_it(folder)
    with pytest.raises(ValueError, match=message):
        finetune.load_checkpoint(folder, "lm")


def test_a_tokenizer_larger_than_the_embeddings_is_an_error(llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "small_vocab"
    config = LlamaConfig.from_pretrained(llama_dir)
    config.vocab_size = 280  # fewer embeddings than the tokenizer's tokens
    LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match=f"{len(_tokenizer())} tokens but the model only 280"):
        finetune.load_checkpoint(folder, "lm")


def test_lora_without_peft_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    args = finetune.FinetuneArguments(lora_r=8)
    with pytest.raises(ImportError, match=r"pip install 'hf_fsf\[peft\]'"):
        finetune.add_lora(torch.nn.Linear(2, 2), args)
