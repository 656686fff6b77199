"""
FID (and IS, precision/recall, KID, sFID) against training iterations for one run: the data of
the paper's Fig. 5/6.

For every complete checkpoint of RUN_DIR (or ``--steps``), sample ``--num_samples`` images from
its EMA model with a fixed seed and sampler, evaluate them against ``--ref`` with
``evaluations.evaluator.evaluate`` and append a row to ``RUN_DIR/fid_curve.csv``:

    step, samples_seen, gpu_hours, fid, inception_score, precision, recall, kid, sfid,
    sampler, sampling_steps, num_samples, extractor, ema_rate, seed, protocol

(a metric that was not computed is blank).

``--protocol`` picks the sampling settings:

- ``fast`` (default): DDIM (eta 0), 50 steps (``--timestep_respacing ddim50``), 10000 samples,
  the run's first EMA rate: cheap enough for a curve of many checkpoints.
- ``paper``: what the paper and the published Improved-/Guided-Diffusion FIDs use: 250 respaced
  ancestral (DDPM) steps (``--use_ddim False --timestep_respacing 250``), 50000 samples, the EMA
  0.9999 model (``--ema_rate 0.9999``; a run without it is refused before anything is sampled).

A flag given on the command line (or in a ``--config`` file) overrides the protocol's value,
e.g. ``--protocol paper --num_samples 10000``; the row records what was actually used, and its
``protocol`` column says ``paper`` only when every paper setting was used (and fp32 sampling),
``fast`` when the fast settings were (DDIM with eta 0, fp32, the run's first EMA rate), else
``custom``.

Model flags come from the run's ``config.yaml`` (``--model_flags "--num_channels 128 ..."`` for a
run without one, e.g. upstream's); ``--keep_samples True`` also keeps each checkpoint's sample
batch in ``RUN_DIR/fid_curve_samples/stepNNNNNN/``. Checkpoints already in the CSV with the same
sampler, number of steps, samples, EMA rate, seed and protocol are skipped (a row of an older CSV
without a protocol matches any protocol), so a second invocation continues where the first
stopped. A CSV written before the ``protocol`` column existed is rewritten with the column added
(blank for its rows) when the first new row is appended. Under ``mpiexec`` every rank samples its
share and rank 0 evaluates and writes.

Every flag (``--protocol``, ``--extractor``, ``--metrics``, ``--ref``, sizes, ...) is checked before
the first checkpoint is sampled, and a reference at another resolution than the model's samples, or
one that looks like a sample batch, is warned about up front. Sampling and feature extraction log
progress lines (images/s, ETA) also when the output is redirected; the reference's features come
from the evaluator's cache (``--cache_dir``), which ``evaluations/ref_stats.py`` fills too.

    python scripts/fid_curve.py runs/cifar_clts --ref cifar10_train.npz --num_samples 10000
    python scripts/fid_curve.py runs/cifar_clts --ref cifar10_train.npz --protocol paper --steps 500000
    python scripts/fid_curve.py --run_dir runs/cifar_clts --ref cifar10_train.npz   # RUN_DIR as a flag
    scripts/launch/fid_curve.sh runs/cifar_clts 8 --ref cifar10_train.npz
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple



from evaluations import evaluator

from guided_diffusion import dist_util, logger
from guided_diffusion.files import atomic_write
from guided_diffusion.model_loading import checkpoint_selection_defaults, resolve_model_flags, same_rate
from guided_diffusion.respace import space_timesteps
from guided_diffusion.sample_util import (
    SAMPLE_PRECISIONS,
    checkpoint_step,
    generate_samples,
    load_checkpoint_model,
    resolve_checkpoint,
    run_ema_rates,
    save_samples_npz,
)
from guided_diffusion.script_util import create_model_and_diffusion, load_config, model_and_diffusion_defaults, \
    parse_args_with_config, run_script
from guided_diffusion.train_util import list_complete_checkpoints, load_state_file

COLUMNS = ["step", "samples_seen", "gpu_hours", "fid", "inception_score", "precision", "recall", "kid", "sfid",
           "sampler", "sampling_steps", "num_samples", "extractor", "ema_rate", "seed", "protocol"]
METRIC_COLUMNS = ["fid", "inception_score", "precision", "recall", "kid", "sfid"]
# what makes two rows the same measurement (a checkpoint is skipped when its key is in the CSV);
# a blank protocol (a row written before the column existed) matches any protocol
KEY_COLUMNS = ["step", "sampler", "sampling_steps", "num_samples", "ema_rate", "seed", "protocol"]
# columns an older CSV may lack: it is rewritten with them added (blank for its rows)
ADDED_COLUMNS = ["protocol"]

# --protocol: the flag values each preset sets (a flag given explicitly overrides its preset value).
# "fast" is the flags' defaults; its ema_rate "" means the run's first EMA rate.
PROTOCOLS: Dict[str, Dict[str, Any]] = {
    "fast": dict(use_ddim=True, timestep_respacing="ddim50", num_samples=10000, ema_rate=""),
    "paper": dict(use_ddim=False, timestep_respacing="250", num_samples=50000, ema_rate="0.9999"),
}


def create_argparser_defaults() -> Dict[str, Any]:
    return dict(
        ref="",
        protocol="fast",  # fast | paper: see the module docstring
        num_samples=10000,
        batch_size=128,
        use_ddim=True,
        timestep_respacing="ddim50",
        eta=0.0,
        clip_denoised=True,
        seed=0,
        # --ema_rate / --use_ema as every checkpoint-loading script has them (RUN_DIR and --steps pick the rest)
        **{k: v for k, v in checkpoint_selection_defaults().items() if k in ("ema_rate", "use_ema")},
        steps="",
        metrics="fid,sfid,is,prc,kid",
        extractor="auto",
        inception_weights="",
        eval_batch_size=64,
        cache_dir="",
        csv="",
        keep_samples=False,
        progress=True,
        sample_precision="fp32",  # fp32 | bf16 | fp16 (network under autocast)
        model_flags="",
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    parser.add_argument("run_dir_arg", nargs="?", default=None, metavar="RUN_DIR",
                        help="a training run folder (modelNNNNNN.pt, ema_R_NNNNNN.pt, stateNNNNNN.pt)")
    parser.add_argument("--run_dir", default=None, metavar="DIR",
                        help="the run folder as the other scripts take it: the same as RUN_DIR")
    args = parse_args_with_config(create_argparser_defaults(), argv, parser=parser)
    positional, flag = args.run_dir_arg, args.run_dir
    del args.run_dir_arg
    if positional and flag and os.path.normpath(positional) != os.path.normpath(flag):
        raise ValueError(f"RUN_DIR {positional} and --run_dir {flag} differ: give the run folder once")
    if not (positional or flag):
        raise ValueError("RUN_DIR (or --run_dir DIR) is required: the training run folder to measure")
    args.run_dir = positional or flag
    return args


def explicit_flags(args: argparse.Namespace) -> List[str]:
    """The flags set on the command line or in the ``--config`` file (they win over a protocol)."""
    given = set(getattr(args, "command_line_flags", None) or [])
    if getattr(args, "config", ""):
        given |= set(load_config(args.config)) & set(create_argparser_defaults())
    return sorted(given)


def apply_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """
    Set the flags of ``--protocol``'s preset that were not given explicitly (in place).

    :raises ValueError: naming --protocol and its choices, for an unknown protocol.
    """
    protocol = str(args.protocol).strip().lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {args.protocol!r}")
    args.protocol = protocol
    given = set(explicit_flags(args))
    for flag, value in PROTOCOLS[protocol].items():
        if flag not in given:
            setattr(args, flag, value)
    return args


def validate_args(args: argparse.Namespace) -> Tuple[str, ...]:
    """
    Check every flag that could otherwise fail only after a checkpoint was sampled (an extractor
    name typo, an unknown metric, a missing or unreadable REF, sizes), so that a bad invocation
    costs seconds rather than an hour of sampling. ``--protocol`` is checked by ``apply_protocol``.

    :return: the metrics to compute.
    :raises ValueError / FileNotFoundError: naming the flag.
    """
    evaluator.check_extractor(args.extractor, args.inception_weights or None)
    metrics = evaluator.parse_metrics(args.metrics)
    for flag in ("num_samples", "batch_size", "eval_batch_size"):
        if int(getattr(args, flag)) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.sample_precision not in SAMPLE_PRECISIONS:
        raise ValueError(f"--sample_precision must be one of {', '.join(SAMPLE_PRECISIONS)}, "
                         f"got {args.sample_precision!r}")
    if args.steps:
        checkpoint_steps(args.run_dir, args.steps)  # parses --steps
    if not args.ref:
        raise ValueError("--ref is required: reference images (folder, npz batch, or guided-diffusion reference npz)")
    if not os.path.exists(args.ref):
        raise FileNotFoundError(f"--ref: not found: {args.ref}")
    evaluator.inspect_reference(args.ref)  # an unsupported file, or an npz without images or mu/sigma
    return metrics


def protocol_label(args: argparse.Namespace, ema_rate: str, run_rates: Sequence[str]) -> str:
    """
    The ``protocol`` column: ``paper`` when every paper setting was used (DDPM in fp32,
    ``--timestep_respacing 250``, 50000 samples, EMA 0.9999), ``fast`` when the fast ones were
    (DDIM with eta 0 in fp32, ``ddim50``, 10000 samples, the run's first EMA rate), else ``custom``.

    :param ema_rate: the EMA rate sampled from ("" or anything with ``--use_ema False``: none).
    :param run_rates: the run's EMA rates (``run_ema_rates``), the first being the fast default.
    """
    sampler = sampler_name(args.use_ddim, args.eta, args.sample_precision)
    used = (sampler, str(args.timestep_respacing), int(args.num_samples))
    if args.use_ema and ema_rate:
        paper = PROTOCOLS["paper"]
        if used == ("ddpm", paper["timestep_respacing"], paper["num_samples"]) \
                and same_rate(ema_rate, paper["ema_rate"]):
            return "paper"
        fast = PROTOCOLS["fast"]
        if used == ("ddim", fast["timestep_respacing"], fast["num_samples"]) \
                and run_rates and same_rate(ema_rate, run_rates[0]):
            return "fast"
    return "custom"


def sampler_name(use_ddim: bool, eta: float, precision: str = "fp32") -> str:
    """The ``sampler`` column: ``ddpm``, ``ddim`` or ``ddim_eta<eta>``, + ``+bf16``/``+fp16`` under autocast."""
    name = "ddpm" if not use_ddim else ("ddim" if not eta else f"ddim_eta{eta:g}")
    return name if precision == "fp32" else f"{name}+{precision}"


def checkpoint_steps(run_dir: str, steps: str) -> List[int]:
    """
    ``--steps`` (comma-separated), else every complete checkpoint set of the run (a run without
    state files, e.g. upstream's, gives every ``modelNNNNNN.pt``).
    """
    if steps:
        try:
            return sorted({int(s) for s in str(steps).split(",") if s.strip()})
        except ValueError:
            raise ValueError(f"--steps: expected comma-separated integers, got {steps!r}") from None
    found = list_complete_checkpoints(run_dir)
    if not found and not any(n.startswith("state") for n in os.listdir(run_dir)):
        found = sorted({s for s in map(checkpoint_step, os.listdir(run_dir))
                        if s is not None})
    return found


def read_rows(path: str) -> List[Dict[str, str]]:
    """The rows of an existing CSV (none when the file does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(row: Dict[str, Any]) -> Tuple[str, ...]:
    return tuple("" if row.get(k) is None else str(row.get(k)) for k in KEY_COLUMNS)


def is_measured(settings: Dict[str, Any], done: Set[Tuple[str, ...]]) -> bool:
    """
    Whether a row with ``settings`` (every KEY_COLUMNS value) is among the keys ``done``; a row
    without a protocol (an older CSV) stands for any protocol.
    """
    key = row_key(settings)
    blank = tuple("" if k == "protocol" else v for k, v in zip(KEY_COLUMNS, key))
    return key in done or blank in done


def _add_columns(path: str, fields: List[str], added: List[str]) -> List[str]:
    """Rewrite the CSV at ``path`` atomically with the columns ``added`` (blank); the new header."""
    rows = read_rows(path)
    fields = fields + added
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items() if k is not None})

    atomic_write(path, write, text=True, newline="", keep_mode=True)
    return fields


@contextlib.contextmanager
def csv_lock(path: str):
    """
    Hold an exclusive lock for the CSV at ``path`` (``flock`` on the hidden ``.<name>.lock`` beside
    it, which stays), so that two fid_curve.py on one run read and append its rows one at a time.
    """
    lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_row(path: str, row: Dict[str, Any]) -> bool:
    """
    Append one row (header first for a new file), flushed to disk, unless a row of the same
    measurement (``KEY_COLUMNS``) is there already: another fid_curve.py on the same run measured
    it meanwhile (the CSV is read and appended under ``csv_lock``). An existing CSV that lacks only
    columns added since (``ADDED_COLUMNS``: ``protocol``) is first rewritten with them.

    :return: whether the row was written.
    :raises ValueError: for an existing CSV that lacks any other column.
    """
    with csv_lock(path):
        if is_measured(row, {row_key(r) for r in read_rows(path)}):
            return False
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        fields = COLUMNS if new else (read_rows_header(path) or COLUMNS)
        missing = [c for c in COLUMNS if c not in fields]
        if missing and all(c in ADDED_COLUMNS for c in missing):
            fields = _add_columns(path, fields, missing)
        elif missing:
            raise ValueError(f"{path}: existing CSV lacks the column(s) {missing}; use --csv for a new file")
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
            f.flush()
            os.fsync(f.fileno())
    return True


def read_rows_header(path: str) -> List[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def checkpoint_facts(run_dir: str, step: int) -> Dict[str, Any]:
    """``samples_seen`` (the state file's count of images seen; = step x global batch for state files
    without one, or from the config) and ``gpu_hours`` from the state file."""
    facts: Dict[str, Any] = {"samples_seen": None, "gpu_hours": None}
    state_path = os.path.join(run_dir, f"state{step:06d}.pt")
    state: Dict[str, Any] = {}
    if os.path.isfile(state_path):
        state = load_state_file(state_path)  # safe: tensors and plain values only
    batch = state.get("global_batch")
    if batch is None and isinstance(state.get("config"), dict):
        batch = state["config"].get("batch_size")
        if batch is not None:
            batch = int(batch) * int(state.get("world_size", 1))
    if state.get("samples") is not None:  # the sum of each step's global batch (a resume may change it)
        facts["samples_seen"] = int(state["samples"])
    elif batch is not None:
        facts["samples_seen"] = int(step) * int(batch)
    if state.get("gpu_hours") is not None:
        facts["gpu_hours"] = round(float(state["gpu_hours"]), 6)
    return facts


def pending_steps(run_dir: str, args: argparse.Namespace, csv_path: str, settings: Dict[str, Any]) -> List[int]:
    """The checkpoint steps whose row (same ``settings``) is not yet in the CSV."""
    steps = checkpoint_steps(run_dir, args.steps)
    if not steps:
        raise FileNotFoundError(f"RUN_DIR {run_dir}: no complete checkpoint set (stateNNNNNN.pt with "
                                "modelNNNNNN.pt and optNNNNNN.pt)")
    done = {row_key(r) for r in read_rows(csv_path)}
    todo = []
    for step in steps:
        if is_measured({"step": step, **settings}, done):
            logger.log(f"step {step}: already in {csv_path}, skipped")
        else:
            todo.append(step)
    return todo


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """
    Measure every checkpoint not yet in the CSV.

    :return: the rows written by this invocation (rank 0; other ranks get []).
    """
    args = apply_protocol(parse_args(argv))  # an unknown --protocol fails here, before anything else
    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"RUN_DIR: folder not found: {run_dir}")
    metrics = validate_args(args)
    if not any(checkpoint_step(n) is not None or n.startswith("state") for n in os.listdir(run_dir)):
        # before the EMA and resolution checks, whose hints would lead elsewhere
        raise FileNotFoundError(f"RUN_DIR {run_dir}: no checkpoints (modelNNNNNN.pt, ema_R_NNNNNN.pt, "
                                "stateNNNNNN.pt): is it a training run's folder?")
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    logger.configure(dir=run_dir, format_strs=["stdout"])
    csv_path = args.csv or os.path.join(run_dir, "fid_curve.csv")
    ema_rate = ""
    run_rates = run_ema_rates(run_dir)
    if args.use_ema:
        ema_rate = args.ema_rate or next(iter(run_rates), "")
        if not ema_rate:
            raise ValueError(f"RUN_DIR {run_dir}: no EMA checkpoints (ema_R_NNNNNN.pt); use --use_ema False")
        if run_rates and not any(same_rate(ema_rate, r) for r in run_rates):
            preset = "ema_rate" not in explicit_flags(args)
            raise ValueError(f"--ema_rate {ema_rate}{f' (set by --protocol {args.protocol})' if preset else ''}: "
                             f"RUN_DIR {run_dir} has no EMA checkpoints of that rate; its EMA rates: "
                             f"{', '.join(run_rates)}. Pass --ema_rate with one of them"
                             f"{' (the rows then say protocol custom)' if preset else ''}, or --use_ema False")
        ema_rate = next(r for r in run_rates if same_rate(ema_rate, r)) if run_rates else ema_rate
    sampler = sampler_name(args.use_ddim, args.eta, args.sample_precision)
    protocol = protocol_label(args, ema_rate, run_rates)

    run_flags, flags_source = resolve_model_flags(os.path.join(run_dir, "config.yaml"), args.model_flags or None)
    T = int(run_flags["diffusion_steps"])
    sampling_steps = len(space_timesteps(T, args.timestep_respacing or [T]))
    known_size = flags_source not in ("defaults", "improved defaults")  # not a default's image size
    if rank == 0 and known_size:  # once, before any sampling (evaluate would repeat them for every checkpoint)
        for warning in evaluator.reference_warnings(args.ref, args.num_samples, int(run_flags["image_size"])):
            logger.warn(f"warning: {warning}")
    todo, error = None, None
    if rank == 0:  # rank 0 decides; every rank gets the list (or the error) so none waits alone
        try:
            todo = pending_steps(run_dir, args, csv_path, {
                "sampler": sampler, "sampling_steps": sampling_steps, "num_samples": args.num_samples,
                "ema_rate": ema_rate if args.use_ema else "none", "seed": args.seed, "protocol": protocol})
        except (ValueError, FileNotFoundError) as e:
            error = e
    todo, error = dist_util.broadcast_from_rank0((todo, error))
    if error is not None:
        raise error

    rows = []
    for step in todo:
        settings = {"step": step, "sampler": sampler, "sampling_steps": sampling_steps,
                    "num_samples": args.num_samples, "ema_rate": ema_rate if args.use_ema else "none",
                    "seed": args.seed, "protocol": protocol}
        # another fid_curve.py on this run may have measured it since the list was made
        if dist_util.broadcast_from_rank0(is_measured(settings, {row_key(r) for r in read_rows(csv_path)}) if rank == 0 else None):
            logger.log(f"step {step}: measured meanwhile (another fid_curve.py?), skipped")
            continue
        checkpoint = resolve_checkpoint("", run_dir, step, ema_rate, args.use_ema)
        model, diffusion, flags = load_checkpoint_model(
            checkpoint, args, {"timestep_respacing"}, model_and_diffusion_defaults(), create_model_and_diffusion,
            model_flags=args.model_flags,
            flags_hint="give the training flags with --model_flags \"--num_channels 128 ...\", or put the run's "
                       "config.yaml in RUN_DIR")
        logger.log(f"step {step}: sampling {args.num_samples} images from {os.path.basename(checkpoint)} "
                   f"({sampler}, {diffusion.num_timesteps} steps, seed {args.seed}, protocol {protocol})")
        images, labels = generate_samples(
            model, diffusion, num_samples=args.num_samples, batch_size=args.batch_size,
            image_size=flags["image_size"], class_cond=flags["class_cond"], num_classes=flags["num_classes"],
            use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised, seed=args.seed,
            progress=args.progress, precision=args.sample_precision,
        )
        del model
        if rank == 0:
            if args.keep_samples:
                save_samples_npz(os.path.join(run_dir, "fid_curve_samples", f"step{step:06d}"), images, labels)
            result = evaluator.evaluate(args.ref, images, metrics=metrics,
                                        extractor=args.extractor, inception_weights=args.inception_weights or None,
                                        batch_size=args.eval_batch_size, device=dist_util.dev(),
                                        cache_dir=args.cache_dir or None, check_reference=False,
                                        progress=args.progress)
            row = {"step": step, **checkpoint_facts(run_dir, step),
                   **{k: result.get(k) for k in METRIC_COLUMNS},
                   "sampler": sampler, "sampling_steps": sampling_steps, "num_samples": args.num_samples,
                   "extractor": result.get("extractor", args.extractor),
                   "ema_rate": ema_rate if args.use_ema else "none", "seed": args.seed, "protocol": protocol}
            if not append_row(csv_path, row):
                logger.log(f"step {step}: measured meanwhile by another fid_curve.py; its row is kept, this one "
                           "not written")
                dist_util.barrier()
                continue
            rows.append(row)
            shown = ", ".join(f"{k}={row[k]:.4g}" for k in METRIC_COLUMNS if row[k] is not None)
            logger.log(f"step {step}: {shown} ({row['extractor']})")
            for metric, why in (result.get("skipped") or {}).items():
                logger.log(f"step {step}: {metric} skipped: {why}")
        dist_util.barrier()
    if rank == 0:
        logger.log(f"{len(rows)} new row(s) in {csv_path}")
    return rows


if __name__ == "__main__":
    run_script(main)
