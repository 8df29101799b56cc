"""The `hf-fsf` command's conventions: --version, `python -m hf_fsf`, help with defaults, lazy imports, extras."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fsf.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_version_and_python_dash_m():
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    run = subprocess.run(
        [sys.executable, "-m", "hf_fsf", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == f"hf-fsf {declared}"
    listing = subprocess.run(
        [sys.executable, "-m", "hf_fsf", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert listing.returncode == 0 and all(name in listing.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_sub_command_help_loads_neither_torch_nor_transformers(command):
    """`hf-fsf X --help` parses X's arguments before anything heavy is imported (structural, not timed)."""
    code = f"""
import contextlib, io, sys
from hf_fsf.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main([{command!r}, "--help"])
assert "usage: hf-fsf {command}" in out.getvalue(), out.getvalue()
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"hf-fsf {command} --help imported {run.stdout.strip()}"


def _parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a sub-command builds, caught when it parses its arguments."""

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Caught(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught) as caught:
        importlib.import_module(module_name).cli_main([])
    monkeypatch.undo()
    return caught.value.args[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_with_its_default(command, monkeypatch):
    parser = _parser_of(COMMANDS[command][0], monkeypatch)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        needs_default = not action.required  # a required option has no default to state
        assert text and ("default" in text or not needs_default), (
            f"hf-fsf {command} {action.option_strings[0]}: help {text!r}"
        )


def test_callback_without_transformers_names_the_extra():
    run = _python("import sys; sys.modules['transformers'] = None; import hf_fsf.callback")
    assert run.returncode != 0
    assert 'ImportError: hf_fsf.callback needs transformers: pip install "hf_fsf[hf]"' in run.stderr
    # The core still imports and runs without it.
    core = _python(
        "import sys; sys.modules['transformers'] = None\n"
        "import torch; from hf_fsf import FeatureSpeedProbe, apply_branch_scaling, FSCOptimizer; print('ok')"
    )
    assert core.returncode == 0 and core.stdout.strip() == "ok", core.stderr


def test_pyyaml_only_in_the_extras_whose_code_imports_it():
    text = (ROOT / "pyproject.toml").read_text()
    core = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    assert "yaml" not in core.lower()
    assert re.search(r'^recipes = \[.*"pyyaml[^"]*"', text, re.M)
    core_files = [p for p in (ROOT / "hf_fsf").rglob("*.py") if p.name != "recipe_support.py"]
    assert not [p for p in core_files if re.search(r"^\s*import yaml", p.read_text(), re.M)]
