"""The `hf-fsf` command (also `python -m hf_fsf`). Each sub-command lives in the module that does the work.

Only the chosen sub-command's module is imported, and those modules import torch and transformers after their
arguments are parsed, so `hf-fsf X --help` answers without loading them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help). Each module exposes `cli_main(argv: list[str]) -> int`.
COMMANDS = {
    "demo": (
        "hf_fsf.experiments.demo",
        "train a small GPT-2 LM (standard, β = 1/√L, β = 1/√L with FSC control) and write a report",
    ),
    "reproduce": (
        "hf_fsf.experiments.reproduce",
        "reproduce Fig. 1 and Fig. 2 of the paper (angles, sensitivities) and the backward speed law",
    ),
    "report": ("hf_fsf.report", "turn an fsf_stats.jsonl file into figures and a markdown table"),
    "scan": (
        "hf_fsf.experiments.scan",
        "coord check of an HF config over widths and depths: per-block speeds, angles, exponents, desiderata",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from hf_fsf import __version__

    parser = argparse.ArgumentParser(
        prog="hf-fsf",
        description="The Feature Speed Formula for transformers. `hf-fsf COMMAND --help` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hf-fsf {__version__}")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    # The options of the command itself (--help, --version) come before it; the rest goes to the sub-command.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = parser.parse_args(argv[: split + 1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.cli_main(argv[split + 1 :]) or 0)


if __name__ == "__main__":
    sys.exit(main())
