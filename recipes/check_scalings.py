"""Recipe: which desiderata (SP, FL, LD, BC; PAPER.md §6) the NTK, MF+μP and FSC presets satisfy at init, with the
stability desiderata FS, BS of §6.1 and Thm 6.3's conditions (--no-stability skips them and their second step).

    python recipes/check_scalings.py                   # widths 64..1024 × depths 4..128, 2 seeds, 64 inputs
    python recipes/check_scalings.py --quick           # widths 64..256 × depths 4..32, 3 seeds, 16 inputs
    python recipes/check_scalings.py --threshold 0.2 --seeds 3 --out reports/scalings
    python recipes/check_scalings.py --n-inputs 1 --seeds 4 --out reports/scalings_n1   # the paper's setting

One GD step of a ReLU MLP per (scaling, width, depth, seed), measured by FeatureSpeedProbe; the exponents of each
quantity in width and depth are fitted on log-log axes and a property "holds" when all its exponents are below
the threshold in absolute value (see hf_fsf/experiments/desiderata.py). Writes desiderata.md (table),
desiderata_points.csv, desiderata_exponents.csv and one PNG per scaling under --out, and prints the table.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from hf_fsf.experiments.desiderata import DesiderataConfig, markdown_table, run_desiderata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/scalings", help="output folder (default: reports/scalings)")
    parser.add_argument("--quick", action="store_true", help="small grid, < 1 min on 2 cores")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per grid point (default: 2, quick: 3)")
    parser.add_argument(
        "--n-inputs", type=int, default=None, help="batch size of the step (default: 64, quick: 16)"
    )
    parser.add_argument("--threshold", type=float, default=0.25, help="|exponent| below this counts as Θ(1)")
    parser.add_argument("--master-lr", type=float, default=1e-3, help="master GD step (times each layer's η)")
    parser.add_argument(
        "--max-aspect", type=float, default=0.25, help="fit only points with depth/width ≤ this; 0 = fit all"
    )
    parser.add_argument(
        "--no-stability",
        action="store_true",
        help="skip FS, BS and Thm 6.3 (no backward-speed step per point)",
    )
    args = parser.parse_args(argv)
    cfg = DesiderataConfig.quick() if args.quick else DesiderataConfig.full()
    changes = {
        "threshold": args.threshold,
        "master_lr": args.master_lr,
        "max_aspect": args.max_aspect if args.max_aspect > 0 else None,
        "stability": not args.no_stability,
    }
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.n_inputs is not None:
        changes["n_inputs"] = args.n_inputs
    cfg = replace(cfg, **changes)
    result = run_desiderata(cfg, args.out)
    print(markdown_table(result, cfg))
    print(
        f"\n{len(result.points)} steps in {result.seconds:.0f} s; files: {', '.join(str(f) for f in result.files)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
