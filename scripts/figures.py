"""
The consistency phenomenon, measured: the paper's Table 1 and Figs. 1-4 from models trained here
at the CPU study's scale, written to docs/figures/ (the committed results) and docs/figures.md's
"Measured here" section.

    python scripts/figures.py                       # = make figures: trains what is missing, measures, reports
    python scripts/figures.py --report_only True    # only rebuild the tables, figures and docs from docs/figures/

Resumable: an analysis whose files are in the ledger (docs/figures/) is never run again, a
model is trained only when a missing analysis needs it (finished runs are reused, interrupted
diffusion runs resume), and the CPU study's finished baseline-s1/-s2 (--study_out) are used
instead of training them again. On a clone with a complete ledger it trains nothing and
reprints the tables. Models, analyses and ledger layout: experiments/figures/ and docs/figures.md.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Sequence


from experiments.figures import ROOT, SETTINGS, report, run_figures, settings_for  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--scale", default="cpu", choices=sorted(SETTINGS), help="the preset (default cpu)")
    p.add_argument("--out", default="", help="working folder: runs, logs, the scripts' outputs "
                                             "(default runs/figures-<scale>)")
    p.add_argument("--study_out", default="", help="the CPU study's folder, whose finished baseline-s1/-s2 are reused "
                                                   "(default runs/study-<scale>)")
    p.add_argument("--ledger", default="", help="the results folder (default docs/figures for the cpu preset, "
                                                "<out>/ledger otherwise)")
    p.add_argument("--doc", default="", help="the markdown file whose generated section is rewritten (default "
                                             "docs/figures.md for the cpu preset, <out>/figures.md otherwise)")
    p.add_argument("--source", default="", help="CIFAR-10 when the study's data/train_16.npz is not there: "
                                                "cifar-10-python.tar.gz, an image zip/folder or a packed .npz")
    p.add_argument("--jobs", type=int, default=0, help="trainings at once (default: the study preset's, 2)")
    p.add_argument("--device", default="auto", help="for the analyses: auto (CUDA when there is one), cpu, cuda")
    p.add_argument("--report_only", type=str2bool, default=False,
                   help="only rebuild the tables, figures and doc from the ledger")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    settings = settings_for(args.scale)
    out = args.out or os.path.join("runs", f"figures-{args.scale}")
    study_out = args.study_out or os.path.join("runs", f"study-{args.scale}")
    default_docs = args.scale == "cpu"
    ledger = args.ledger or (os.path.join(ROOT, "docs", "figures") if default_docs else os.path.join(out, "ledger"))
    doc = args.doc or (os.path.join(ROOT, "docs", "figures.md") if default_docs else os.path.join(out, "figures.md"))
    if args.report_only:
        return report(ledger, settings, doc)
    return run_figures(out, settings, ledger, doc, study_out=study_out, source=args.source, jobs=args.jobs or None,
                       device=args.device)


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
