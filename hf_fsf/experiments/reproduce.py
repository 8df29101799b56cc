"""`hf-fsf reproduce --out DIR [--quick] [--seeds N]`: the command line of the paper's reproduction (paper.py).

Kept apart from paper.py so that `--help` answers without importing torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fsf reproduce",
        description="Reproduce Fig. 1 and Fig. 2 of the paper and the backward speed law (docs/reproduction.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory (CSVs, PNGs, summary.md)")
    parser.add_argument(
        "--quick", action="store_true", help="smaller grid (depth ≤ 64, 2 seeds): about a minute"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds to average over (None: 5, quick: 2)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be ≥ 1")

    from hf_fsf.experiments import paper  # torch and the models: only once the arguments are known

    cfg = paper.ReproConfig.quick() if args.quick else paper.ReproConfig.full()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    result = paper.run_reproduction(cfg, args.out)
    print(f"wrote {len(result.files)} files to {args.out} in {result.seconds:.0f} s:")
    for path in result.files:
        print(f"  {path}")
    print(Path(args.out, "summary.md").read_text())
    return 0
