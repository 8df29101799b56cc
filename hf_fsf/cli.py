"""The `hf-fsf` command. Each sub-command lives in the module that does the work."""

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
        "hf_fsf.experiments.paper",
        "reproduce Fig. 1 and Fig. 2 of the paper (angles, sensitivities)",
    ),
    "report": ("hf_fsf.report", "turn an fsf_stats.jsonl file into figures and a markdown table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-fsf", description="The Feature Speed Formula for transformers.")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.cli_main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
