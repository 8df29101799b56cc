"""The recipes run end to end on tiny configs: train_lm -> checkpoint -> finetune, the benchmark, accelerate."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TINY_LM = [
    "max_steps=3",
    "layers=2",
    "width=32",
    "heads=2",
    "block_size=32",
    "max_bytes=20000",
    "batch_size=2",
    "eval_blocks=4",
    "logging_steps=1",
    "fsf_angle_every=1",
]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], timeout: float = 120) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_lm")
    _run([sys.executable, str(RECIPES / "train_lm.py"), "--config", str(ROOT / "configs/train_lm.yaml"),
          *TINY_LM, f"output_dir={out}"])  # fmt: skip
    return out


def test_train_lm_writes_checkpoint_and_stats(lm_run):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(lm_run / "final")
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 32, 256)
    records = [json.loads(line) for line in (lm_run / "fsf_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # The saved weights are the trained ones, not the initialization: a fresh seeded model differs.
    torch.manual_seed(0)
    fresh = GPT2LMHeadModel(model.config)
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)


def test_finetune_classifies_from_the_lm_checkpoint(lm_run, tmp_path):
    stdout = _run([sys.executable, str(RECIPES / "finetune.py"), f"checkpoint={lm_run / 'final'}",
                   "max_steps=3", "snippets_per_class=8", "snippet_bytes=32", "batch_size=4",
                   f"output_dir={tmp_path}"])  # fmt: skip
    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert "eval_accuracy" in stdout
    assert (tmp_path / "fsf_stats.jsonl").read_text().count("\n") == 3
    # The transformer body comes from the LM checkpoint: before fine-tuning, the position embeddings match.
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    lm = GPT2LMHeadModel.from_pretrained(lm_run / "final")
    classifier = GPT2ForSequenceClassification.from_pretrained(lm_run / "final", num_labels=4)
    assert torch.equal(lm.transformer.wpe.weight, classifier.transformer.wpe.weight)


def test_local_accuracy_metric_matches_an_independent_count():
    import evaluate

    metric = evaluate.load(str(ROOT / "hf_fsf" / "metrics" / "accuracy"))
    generator = torch.Generator().manual_seed(1)
    predictions = torch.randint(0, 3, (50,), generator=generator).tolist()
    references = torch.randint(0, 3, (50,), generator=generator).tolist()
    expected = sum(p == r for p, r in zip(predictions, references)) / 50
    assert metric.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        expected
    )
    with pytest.raises(ValueError, match="references"):
        metric.compute(predictions=[0, 1], references=[0])


def test_config_overrides_are_typed_and_checked(tmp_path):
    train_lm = _load_recipe("train_lm")
    config = train_lm.load_config(
        ROOT / "configs/train_lm.yaml", ["max_steps=7", "beta=1/sqrt(L)", "report_to=[]"]
    )
    assert config["max_steps"] == 7 and config["beta"] == "1/sqrt(L)" and config["report_to"] == []
    with pytest.raises(KeyError, match="max_stpes"):
        train_lm.load_config(ROOT / "configs/train_lm.yaml", ["max_stpes=7"])
    with pytest.raises(ValueError, match="key=value"):
        train_lm.load_config(ROOT / "configs/train_lm.yaml", ["max_steps"])


def test_bench_overhead_quick_prints_the_table():
    stdout = _run([sys.executable, str(RECIPES / "bench_overhead.py"), "--quick"])
    rows = [line for line in stdout.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == [
        "none", "cheap every step", "angle every step", "angle every 50",
    ]  # fmt: skip
    # The no-callback run is the reference of every ratio.
    assert rows[0].split("|")[4].strip() == "1.000"
    assert all(float(row.split("|")[3]) > 0 for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")  # fmt: skip
def test_train_lm_under_accelerate_runs_two_processes(tmp_path):
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    stdout = _run([launcher, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
                   str(RECIPES / "train_lm.py"), *TINY_LM, f"output_dir={tmp_path}"])  # fmt: skip
    assert "processes: 2" in stdout
    assert (tmp_path / "final" / "model.safetensors").exists()
    # Only the main process writes the stats: one record per step, not two.
    assert [json.loads(x)["step"] for x in (tmp_path / "fsf_stats.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_check_fsc_contributions_on_llama_and_qwen2(capsys):
    spec = importlib.util.spec_from_file_location("check_fsc", RECIPES / "check_fsc.py")
    check_fsc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_fsc)
    assert check_fsc.check_contributions(quick=True) < 1e-9
    assert capsys.readouterr().out.count("| llama |") == 4  # 2 bases x 2 balances
