"""
Measure what a packed dataset costs each rank of ``load_data``: private memory growth and batches/s.

Starts ``--ranks`` processes at once, each standing in for one rank (``load_data(rank=r,
world_size=R)``, one torch thread), once per ``--modes`` entry: ``mmap`` (the loader's default:
the packed images memory-mapped) and ``memory`` (the same data read whole into memory first, as
the loader did before). Each process reads ``/proc/self/smaps_rollup`` before building its loader
and after ``--batches`` batches and reports the growth of ``Private_Clean + Private_Dirty`` (its
pages no other process maps), of ``Anonymous`` (heap and arrays: copies), of ``Rss`` and of
``Pss``, with the batches/s of its batches. Linux only. The page cache is left as it is (warm
when the file was just written).

    python scripts/datasets/pack.py --data_dir synthetic:50000 --image_size 64 --out /tmp/syn64.npz
    python scripts/datasets/measure_loader_memory.py --data_dir /tmp/syn64.npz --image_size 64 --ranks 2 --batches 40
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMAPS = "/proc/self/smaps_rollup"
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous")


def smaps_rollup() -> Dict[str, int]:
    """This process's memory totals from ``/proc/self/smaps_rollup``, in bytes."""
    out: Dict[str, int] = {}
    with open(SMAPS) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


def worker(args: argparse.Namespace) -> Dict[str, object]:
    """One rank: build the loader, take the batches, report the growth (runs in a child process)."""
    import torch

    from guided_diffusion.image_datasets import ImageBatches, load_data, load_source

    torch.set_num_threads(1)
    kw = dict(batch_size=args.batch_size, image_size=args.image_size, class_cond=args.class_cond, seed=args.seed,
              rank=args.worker_rank, world_size=args.ranks)
    before = smaps_rollup()
    start = time.perf_counter()
    if args.worker_mode == "mmap":
        loader = load_data(data_dir=args.data_dir, **kw)
    else:
        src = load_source(args.data_dir, args.image_size, mmap=False)
        loader = ImageBatches(src, deterministic=False, random_crop=False, random_flip=True, device=None,
                              drop_last=True, **kw)
    built = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    done = time.perf_counter()
    after = smaps_rollup()
    grew = {k: after[k] - before[k] for k in FIELDS}
    return {"mode": args.worker_mode, "rank": args.worker_rank, "images_type": type(loader._host_images).__name__,
            "dataset_bytes": int(loader._host_images.nbytes), "build_s": built - start,
            "batches_per_s": args.batches / (done - built),
            "private_growth": grew["Private_Clean"] + grew["Private_Dirty"],
            **{f"{k}_growth": v for k, v in grew.items()}}


def measure(args: argparse.Namespace, mode: str) -> List[Dict[str, object]]:
    """Start ``--ranks`` workers of ``mode`` at once and collect their reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    procs = []
    for rank in range(args.ranks):
        cmd = [sys.executable, os.path.abspath(__file__), "--data_dir", args.data_dir, "--image_size",
               str(args.image_size), "--batch_size", str(args.batch_size), "--batches", str(args.batches),
               "--ranks", str(args.ranks), "--seed", str(args.seed), "--class_cond", str(args.class_cond),
               "--worker_mode", mode, "--worker_rank", str(rank)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} ({mode}) failed with status {proc.returncode}:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def create_argparser() -> argparse.ArgumentParser:
    """The flags of this script."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data_dir", required=True, help="a packed .npz/.npy or a folder of shards")
    p.add_argument("--image_size", type=int, required=True, help="side of the packed images")
    p.add_argument("--batch_size", type=int, default=64, help="batch of each rank")
    p.add_argument("--batches", type=int, default=40, help="batches each rank takes")
    p.add_argument("--ranks", type=int, default=2, help="concurrent processes (ranks of world_size --ranks)")
    p.add_argument("--modes", default="mmap,memory", help="comma-separated: mmap (default loader), memory")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--class_cond", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="return labels too (the source must have them)")
    p.add_argument("--out", default="", help="also write the reports here as JSON")
    p.add_argument("--worker_mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Measure as the flags say; prints one line per rank and mode."""
    args = create_argparser().parse_args(argv)
    if args.worker_mode:
        print(json.dumps(worker(args)), flush=True)
        return []
    if not os.path.exists(SMAPS):
        raise ValueError(f"{SMAPS} is missing: this measurement needs Linux")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("mmap", "memory") for m in modes):
        raise ValueError(f"--modes {args.modes!r}: expected a comma-separated list of mmap, memory")
    reports: List[Dict[str, object]] = []
    mb = 2**20
    for mode in modes:
        for r in measure(args, mode):
            reports.append(r)
            size = float(r["dataset_bytes"])
            print(f"{mode:6s} rank {r['rank']}: images {r['images_type']}, dataset {size / mb:.0f} MiB, "
                  f"private (Private_Clean+Private_Dirty) +{r['private_growth'] / mb:.1f} MiB "
                  f"({100 * r['private_growth'] / size:.1f}%), Anonymous +{r['Anonymous_growth'] / mb:.1f} MiB, "
                  f"Rss +{r['Rss_growth'] / mb:.1f} MiB, Pss +{r['Pss_growth'] / mb:.1f} MiB, "
                  f"build {r['build_s']:.2f} s, {r['batches_per_s']:.1f} batches/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                       "load_avg_1m": os.getloadavg()[0], "reports": reports}, f, indent=1)
    return reports


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
