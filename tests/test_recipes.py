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
    "--max_steps", "3", "--layers", "2", "--width", "32", "--heads", "2", "--block_size", "32",
    "--max_bytes", "20000", "--per_device_train_batch_size", "2", "--eval_blocks", "4", "--logging_steps", "1",
    "--fsf_angle_every", "1",
]  # fmt: skip


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    extra = dict(extra or {})
    paths = [extra.pop("PYTHONPATH", ""), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return {**env, **extra}


def _run(args: list[str], timeout: float = 120, env: dict | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=_env(env), cwd=ROOT, timeout=timeout)
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
          *TINY_LM, "--output_dir", str(out)])  # fmt: skip
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
    stdout = _run([sys.executable, str(RECIPES / "finetune.py"), "--checkpoint", str(lm_run / "final"),
                   "--max_steps", "3", "--snippets_per_class", "8", "--snippet_bytes", "32",
                   "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path)])  # fmt: skip
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


def test_train_lm_resumes_from_its_checkpoint_and_continues_the_stats(lm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    stats = run / "fsf_stats.jsonl"
    # Marks the first record: a resumed run keeps the records up to its checkpoint, a fresh run rewrites them.
    lines = stats.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "marker": True})
    stats.write_text("\n".join(lines) + "\n")
    checkpoint = (
        run / "checkpoint-3"
    )  # the Trainer saves at the last step (save_strategy: steps in the config)
    assert (checkpoint / "trainer_state.json").exists()
    _run([sys.executable, str(RECIPES / "train_lm.py"), *TINY_LM, "--max_steps", "5", "--output_dir", str(run),
          "--resume_from_checkpoint", str(checkpoint)])  # fmt: skip
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0].get("marker") is True
    state = json.loads((run / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5


def test_recipe_args_take_a_yaml_config_and_hf_flags(tmp_path):
    from hf_fsf.recipe_support import FeatureSpeedArguments, parse_recipe_args

    train_lm = _load_recipe("train_lm")
    config = tmp_path / "config.yaml"
    config.write_text("max_steps: 11\nlayers: 3\nfsf_every: 2\nlearning_rate: 0.01\nreport_to: none\n")
    flags = ["--config", str(config), "--max_steps", "7", "--save_strategy", "steps", "--bf16",
             "--gradient_checkpointing", "--beta", "1/sqrt(L)", "--output_dir", str(tmp_path)]  # fmt: skip
    lm, fsf, training = parse_recipe_args((train_lm.LMArguments, FeatureSpeedArguments), config, flags)
    assert training.max_steps == 7  # the flag wins over the config
    assert (
        training.learning_rate == 0.01 and lm.layers == 3 and fsf.fsf_every == 2
    )  # the config over defaults
    assert lm.width == 128 and fsf.fsf_angle_every == 50  # defaults where neither says anything
    assert training.save_strategy == "steps" and training.bf16 and training.gradient_checkpointing
    assert lm.beta == "1/sqrt(L)" and train_lm.branch_beta("0.5") == 0.5
    assert not torch.cuda.is_available() or not training.use_cpu

    with pytest.raises(ValueError, match="--max_steps 7"):
        parse_recipe_args((train_lm.LMArguments, FeatureSpeedArguments), config, ["max_steps=7"])
    config.write_text("max_stpes: 3\n")
    with pytest.raises(ValueError, match="max_stpes.*Did you mean max_steps"):
        parse_recipe_args((train_lm.LMArguments, FeatureSpeedArguments), config, [])


def test_bench_overhead_quick_prints_the_table():
    stdout = _run([sys.executable, str(RECIPES / "bench_overhead.py"), "--quick"])
    rows = [line for line in stdout.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == [
        "AdamW alone", "cheap stats every step", "angle every step", "angle every 50", "FSCOptimizer",
        "FSC + cheap stats",
    ]  # fmt: skip
    # The no-callback run is the reference of every ratio.
    assert rows[0].split("|")[4].strip() == "1.000"
    assert all(float(row.split("|")[3]) > 0 for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")  # fmt: skip
def test_train_lm_under_accelerate_runs_two_processes(tmp_path):
    # A stand-in tracker whose finish hook is an exit handler (as W&B's and MLflow's are): it must run on every
    # rank although the processes leave through os._exit.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda: open(os.path.join(os.environ['FINISHED_DIR'], 'rank' + os.environ.get('RANK', "
        "'x')), 'w').close())\n"
    )
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {"PYTHONPATH": str(hooks), "FINISHED_DIR": str(tmp_path)}
    stdout = _run([launcher, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
                   str(RECIPES / "train_lm.py"), *TINY_LM, "--output_dir", str(tmp_path)], env=env)  # fmt: skip
    assert (tmp_path / "rank0").exists() and (tmp_path / "rank1").exists()
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


def test_mup_coord_check_fits_width_exponents_and_runs_on_the_benchmark_models(tmp_path):
    import pandas as pd

    coord = _load_recipe("mup_coord_check")
    rows = [
        {"width": w, "module": name, "t": 2, "l1": value}
        for w in (64, 128, 256)
        for name, value in (("h.0.fc", 0.3 * w**0.5), ("h.1.fc", 0.3 * w**0.5), ("head", 2.0))
    ]
    fitted = coord.slopes(pd.DataFrame(rows), step=2)
    assert fitted == pytest.approx({"h.*.fc": 0.5, "head": 0.0}, abs=1e-12)
    # The real check, small: the benchmark's GPT-2 at two widths; standard grows with width where μP does not.
    out = _run(
        [sys.executable, str(RECIPES / "mup_coord_check.py"), "--out", str(tmp_path), "--tasks", "gpt2", "--gpt2-widths",
         "64,256", "--steps", "3", "--lr-scales", "1"],
        timeout=300,
    )  # fmt: skip
    table = (tmp_path / "coord_check.md").read_text()
    mup_row, standard_row = [line for line in table.splitlines() if line.startswith("| gpt2")]
    assert "| mup |" in mup_row and "grows" not in mup_row and "grows" in standard_row
    assert "PASS" in out and (tmp_path / "coord_check.csv").exists()
