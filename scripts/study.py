"""
Run (or continue) the small-scale CLTS/MDLRC study on CIFAR-10 and print its summary table.

    python scripts/study.py                           # the "first" arms x 2 seeds, 2 CPU cores, -> runs/study-cpu
    python scripts/study.py --arms comparisons        # a group (or comma-separated arms); ledger runs are skipped
    python scripts/study.py --scale cpu_long --arms long_new_seed2 --seeds 2   # seed 2 of the best long_new arms
    python scripts/study.py --scale gpu --out runs/study-gpu   # one GPU, larger model, more steps
    python scripts/study.py --summary_only True       # reprint the tables from the ledger (make study: both scales)

Arms, scales and outputs: experiments/study/ (the package) and docs/study.md. Rerunning the same
command continues where it stopped and skips finished runs and evaluated checkpoints. The ledger is
checked before anything is computed from it: a damaged or incomplete run folder stops the command
with one line naming the file, and nothing is rewritten.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence


from experiments.study import ARM_NAMES, DEFAULT_LEDGER, GROUPS, SCALES, SECOND_SEED_SUFFIX, export_results, preset, \
    doc_sections, resolve_arms, run_bootstrap, run_study, summarize, write_doc_section  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="the preset (default cpu)")
    p.add_argument("--out", default="", help="the study folder (default runs/study-<scale>)")
    p.add_argument("--source", default="", help="CIFAR-10: cifar-10-python.tar.gz, an image zip/folder or a "
                                                "packed .npz (default: .data/cifar10_train.npz, then "
                                                "../shared/data/cifar10-jpeg/train.zip)")
    p.add_argument("--arms", default="first", help=f"comma-separated arms and/or groups ({', '.join(GROUPS)}); "
                                                   f"arms: {', '.join(ARM_NAMES)}; or <group>{SECOND_SEED_SUFFIX} "
                                                   "(e.g. long_new_seed2): the group's arms that earn a second seed, "
                                                   "chosen from the ledger's seed-1 runs")
    p.add_argument("--ledger", default=None,
                   help="the committed results (default docs/study/ledger; with --scale test <out>/ledger): runs "
                        "found there are not run again, finished runs are copied there, tables and figures are "
                        "computed from it; '' = none")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    p.add_argument("--jobs", type=int, default=0, help="runs at once (default: the preset's)")
    p.add_argument("--summary_only", type=str2bool, default=False, help="only reprint the saved summary")
    p.add_argument("--bootstrap_only", type=str2bool, default=False,
                   help="train nothing: add the paired bootstrap of the headline arms' committed runs to the ledger "
                        "(sampling a run's final checkpoint in --out again when its samples were not committed), "
                        "then print the summary")
    p.add_argument("--export", default="", help="also copy the small result files (no checkpoints) to this folder, "
                                                "e.g. docs/study")
    return p.parse_args(argv)


def resolve_ledger(ledger: Optional[str], scale: str, out: str) -> str:
    """``--ledger`` as given (``''``: none); unnamed, the committed ledger, but for the ``test`` scale
    (seconds-long runs, never committed) ``<out>/ledger``."""
    if ledger is not None:
        return ledger
    return os.path.join(out, "ledger") if scale == "test" else DEFAULT_LEDGER


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    scale = preset(args.scale)
    out = args.out or os.path.join("runs", f"study-{args.scale}")
    args.ledger = resolve_ledger(args.ledger, scale.name, out)
    arms = resolve_arms(args.arms, scale, args.ledger)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or list(scale.seeds)
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if args.bootstrap_only:
        if not args.ledger:
            raise ValueError("--bootstrap_only True needs --ledger (the bootstrap is computed from committed runs)")
        run_bootstrap(out, scale, args.ledger, args.source)
    if args.summary_only or args.bootstrap_only:
        if not args.bootstrap_only:
            print(f"study: ledger {os.path.join(os.path.abspath(args.ledger), scale.name)}" if args.ledger
                  else f"study: no ledger (--ledger ''): the summary of {os.path.abspath(out)}")
        summary = summarize(out, scale, arms, seeds, ledger=args.ledger)
    else:
        summary = run_study(out, scale, arms, seeds, source=args.source, jobs=args.jobs or None, ledger=args.ledger)
    # the ledger's docs page (docs/study/ledger -> docs/study.md), also when the runner works from a worktree
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ledger))), "study.md") if args.ledger else ""
    for part, text in doc_sections(summary):
        if doc and write_doc_section(doc, scale.name, text, part):
            print(f"study: {doc}: the {scale.name} {part} section rewritten from the ledger")
    if args.export:
        print(f"study: {len(export_results(out, args.export))} result files copied to {args.export}")
    return summary


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
