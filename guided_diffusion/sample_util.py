"""
Sampling helpers shared by the sample scripts (``image_sample.py``, ``classifier_sample.py``,
``super_res_sample.py``), ``fid_curve.py`` and anyone else who needs a batch of samples.

- ``generate_samples``: N samples from a model, batched over ranks and gathered in a fixed
  order. Every random draw is a function of ``(seed, global sample index)`` only: image i gets
  the initial noise x_T and the noise of every sampling step from generators seeded with
  ``sample_seed(seed, i, k)``, and its class label from ``sample_seed(seed, i, LABEL_STREAM)``.
  The same seed therefore gives the same images for any batch size or number of ranks (up to
  the floating-point differences of batched kernels).
- ``save_samples_npz`` / ``save_grid``: upstream's ``samples_{N}x{H}x{W}x3.npz`` (``arr_0``
  uint8 NHWC, ``arr_1`` labels) and a PNG grid.
- The flag handling of the sample scripts: ``sample_defaults`` (with the checkpoint-selection
  flags of ``model_loading``), ``parse_sample_args`` (``--config`` with training keys allowed);
  ``resolve_checkpoint`` (``--model_path`` or ``--run_dir`` + ``--step`` + ``--ema_rate``) and
  ``load_checkpoint_model`` (model flags: command line > ``--config`` > the run's ``config.yaml``
  beside the checkpoint > defaults) live in ``model_loading`` and are re-exported here.
- Where the outputs go (``default_out_dir``): ``--out_dir``, else ``$OPENAI_LOGDIR`` (as upstream's
  ``logger.configure()``), else ``<run>/samples/<checkpoint stem>/``; an existing samples file is
  never overwritten without ``--overwrite True`` (``check_samples_file``, before sampling).
- ``ProgressLog`` (``logger``'s, re-exported): progress of a long loop as a tqdm bar on a terminal
  and as periodic plain lines (done/total, images/s, ETA) when the output is redirected.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from . import dist_util, logger
from .logger import ProgressLog, format_seconds  # noqa: F401  (re-exported: their old home)
from .config import coerce_config, load_config, parse_args_with_config
from .model_loading import (  # noqa: F401  (re-exported: the sample scripts' names since before model_loading)
    checkpoint_selection_defaults,
    checkpoint_step,
    load_checkpoint_model,
    model_flags_hint,
    resolve_checkpoint,
    run_ema_rates,
    step_list,
)
from .options import training_defaults
from .script_util import NUM_CLASSES, classifier_and_diffusion_defaults, model_and_diffusion_defaults, \
    sr_model_and_diffusion_defaults
from .seeding import mix_seed
from .files import atomic_write
from .image_io import to_uint8, write_grid

ModelKwargsFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]

# Stream numbers of ``sample_seed``: 0 is x_T, k + 1 the noise of sampling step k.
LABEL_STREAM = 1 << 40


# ======================================================================================
# Seeds and noise
# ======================================================================================


def sample_seed(seed: int, index: int, stream: int) -> int:
    """
    The generator seed of one draw: a 63-bit hash (SplitMix64) of ``(seed, index, stream)``.

    :param seed: the run's ``--seed``.
    :param index: the global index of the sample (0 .. num_samples - 1).
    :param stream: 0 for the initial noise, k + 1 for sampling step k, ``LABEL_STREAM`` for the label.
    """
    return mix_seed(seed, index, stream)


class SampleNoise:
    """
    The noise of a batch of samples, image by image from its own seed: ``initial()`` is x_T,
    and the instance is a ``step_noise_fn`` for the diffusion's sampling loops
    (``(step, shape, device) -> tensor``). Drawn on the sampling device with a generator of
    that device, so CPU and CUDA runs use different (each reproducible) numbers.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: Union[str, torch.device]):
        """
        :param seed: the run's seed.
        :param indices: the global indices of the batch's samples.
        :param shape: the shape of one sample, e.g. (3, 32, 32).
        :param device: where the noise is drawn.
        """
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)

    def draw(self, stream: int) -> torch.Tensor:
        """One standard-normal tensor per sample of the batch, [B, *shape], for ``stream``."""
        out = torch.empty((len(self.indices),) + self.shape, device=self.device)
        for n, i in enumerate(self.indices):
            self._gen.manual_seed(self.item_seed(i, stream))
            torch.randn(self.shape, generator=self._gen, device=self.device, out=out[n])
        return out

    def item_seed(self, index: int, stream: int) -> int:
        """The generator seed of one sample's draw of ``stream``: ``sample_seed(seed, index, stream)``."""
        return sample_seed(self.seed, index, stream)

    def initial(self) -> torch.Tensor:
        """x_T of the batch."""
        return self.draw(0)

    def __call__(self, step: int, shape: Sequence[int], device: Any = None) -> torch.Tensor:
        if tuple(shape) != (len(self.indices),) + self.shape:
            raise ValueError(f"SampleNoise: asked for shape {tuple(shape)}, it serves "
                             f"{len(self.indices)} samples of shape {self.shape}")
        noise = self.draw(int(step) + 1)
        return noise if device is None else noise.to(device)


def draw_labels(seed: int, indices: Iterable[int], num_classes: int) -> np.ndarray:
    """
    The class label of each sample index, uniform over ``num_classes``, from its own seed
    (so independent of batching).

    :return: int64 array, one label per index.
    """
    if int(num_classes) < 1:
        raise ValueError(f"--num_classes must be >= 1 for class-conditional sampling, got {num_classes}")
    gen = torch.Generator()
    out = []
    for i in indices:
        gen.manual_seed(sample_seed(seed, i, LABEL_STREAM))
        out.append(int(torch.randint(int(num_classes), (1,), generator=gen)))
    return np.asarray(out, dtype=np.int64)


# ======================================================================================
# Sampling
# ======================================================================================


def _gather_rank_order(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors (same shape) concatenated in rank order; itself in one process."""
    if dist_util.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist_util.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


# --sample_precision: the autocast dtype of the network while sampling (fp32: no autocast)
SAMPLE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def generate_samples(
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    *,
    num_samples: int,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    num_classes: int = NUM_CLASSES,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    cond_fn: Optional[Callable[..., torch.Tensor]] = None,
    model_kwargs_fn: Optional[ModelKwargsFn] = None,
    progress: bool = False,
    labels: Optional[np.ndarray] = None,
    channels: int = 3,
    precision: str = "fp32",
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """
    Draw ``num_samples`` samples, each rank a share, gathered in sample-index order on every rank.

    Round r takes the next ``world_size * b`` indices (``b = batch_size`` except in the last
    round, where it shrinks so that no rank idles); rank k samples indices
    ``[offset + k*b, offset + (k+1)*b)``. Every collective runs on every rank.

    :param model: the denoising network (eval mode), or a function (x, t, **model_kwargs) -> output.
    :param diffusion: a ``GaussianDiffusion`` / ``SpacedDiffusion`` (its steps are the sampler's).
    :param num_samples: total number of samples over all ranks.
    :param batch_size: samples per forward pass and rank.
    :param image_size: side of the (square) samples.
    :param class_cond: draw a label per sample (``model_kwargs["y"]``).
    :param num_classes: labels are uniform over ``range(num_classes)``.
    :param use_ddim: DDIM instead of ancestral (DDPM) sampling.
    :param eta: DDIM's eta (0: deterministic after x_T).
    :param clip_denoised: clip x_0 predictions to [-1, 1].
    :param seed: fixes x_T, every step's noise and the labels (see the module docstring).
    :param device: where to sample (default ``dist_util.dev()``).
    :param cond_fn: guidance gradient, as the diffusion's sampling loops take it.
    :param model_kwargs_fn: ``(indices, model_kwargs) -> extra model_kwargs`` for a batch, e.g. the
        low-resolution inputs of a super-resolution model; a returned ``"y"`` replaces the label.
    :param progress: report progress on rank 0 (``ProgressLog``: a tqdm bar on a terminal, else
        lines with images/s and the ETA).
    :param labels: fixed labels, one per sample, instead of drawn ones.
    :param channels: channels of a sample.
    :param precision: "fp32" (exact), or "bf16"/"fp16": the network under ``torch.autocast``
        (faster on GPUs; the diffusion's arithmetic stays float32, samples differ by rounding).
    :return: ``(images, labels)``: uint8 [N, H, W, C] and int64 [N] (None when there are no labels).
    """
    num_samples, batch_size = int(num_samples), int(batch_size)
    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if not use_ddim and eta:
        logger.warn(f"--eta {eta} only applies to DDIM (--use_ddim True); ignored")
    if precision not in SAMPLE_PRECISIONS:
        raise ValueError(f"--sample_precision must be one of {', '.join(SAMPLE_PRECISIONS)}, got {precision!r}")
    device = torch.device(device) if device is not None else dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    autocast = torch.autocast(device.type, dtype=SAMPLE_PRECISIONS[precision], enabled=precision != "fp32")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != num_samples:
            raise ValueError(f"labels: expected {num_samples} (--num_samples), got {labels.shape[0]}")
    shape = (int(channels), int(image_size), int(image_size))
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    bar = ProgressLog(num_samples, "sampling", enabled=progress and rank == 0)
    images: List[np.ndarray] = []
    out_labels: List[np.ndarray] = []
    offset = 0
    while offset < num_samples:
        b = min(batch_size, math.ceil((num_samples - offset) / world))
        idx = torch.arange(offset + rank * b, offset + (rank + 1) * b)
        noise = SampleNoise(seed, idx.tolist(), shape, device)
        kwargs: Dict[str, torch.Tensor] = {}
        if labels is not None:
            kwargs["y"] = torch.from_numpy(labels[idx.clamp(max=num_samples - 1).numpy()]).to(device)
        elif class_cond:
            kwargs["y"] = torch.from_numpy(draw_labels(seed, idx.tolist(), num_classes)).to(device)
        if model_kwargs_fn is not None:
            kwargs.update(model_kwargs_fn(idx, kwargs))
        extra: Dict[str, Any] = {}
        if use_ddim:
            extra["eta"] = float(eta)
        # deterministic DDIM multiplies the step noise by 0: skip drawing it
        step_noise = None if (use_ddim and not eta) else noise
        with autocast:
            sample = loop(model, (b,) + shape, noise=noise.initial(), clip_denoised=clip_denoised,
                          cond_fn=cond_fn, model_kwargs=kwargs, device=device, step_noise_fn=step_noise, **extra)
        x = to_uint8(sample)  # upstream's conversion (truncation), on the device
        images.append(_gather_rank_order(x).permute(0, 2, 3, 1).cpu().numpy())
        if "y" in kwargs:
            out_labels.append(_gather_rank_order(kwargs["y"].long()).cpu().numpy())
        offset += world * b
        bar.update(min(world * b, num_samples - (offset - world * b)))
    bar.close()
    arr = np.concatenate(images, axis=0)[:num_samples]
    lab = np.concatenate(out_labels, axis=0)[:num_samples] if out_labels else None
    return arr, lab


# ======================================================================================
# Files
# ======================================================================================


def samples_file_name(images: Union[np.ndarray, Sequence[int]]) -> str:
    """
    Upstream's name of a sample batch: ``samples_{N}x{H}x{W}x{C}.npz``.

    :param images: the uint8 [N, H, W, C] images, or their shape (to name a file before sampling).
    """
    shape = images.shape if isinstance(images, np.ndarray) else tuple(images)
    return f"samples_{'x'.join(str(int(s)) for s in shape)}.npz"


def save_samples_npz(out_dir: Union[str, os.PathLike], images: np.ndarray, labels: Optional[np.ndarray] = None,
                     name: Optional[str] = None) -> str:
    """
    Write ``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels when given), as
    upstream's sample scripts do, atomically.

    :param out_dir: the folder (created when missing).
    :param images: uint8 [N, H, W, C].
    :param labels: int [N] or None.
    :param name: the file name (default ``samples_file_name(images)``).
    :return: the file's path.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"save_samples_npz: expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"save_samples_npz: {len(labels)} labels for {len(images)} images")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(str(out_dir), name or samples_file_name(images))
    arrays = [images] if labels is None else [images, np.asarray(labels)]
    atomic_write(path, lambda f: np.savez(f, *arrays))
    return path


def save_grid(images: np.ndarray, path: Union[str, os.PathLike], max_images: int = 64) -> str:
    """
    Save the first ``max_images`` uint8 NHWC samples as one PNG grid (train_util's writer).

    :return: the PNG path.
    """
    # the uint8 pixels as they are: no round trip through [-1, 1] that truncation could shift
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images)[:max_images])).permute(0, 3, 1, 2)
    folder = os.path.dirname(str(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    write_grid(x, str(path))
    return str(path)


# ======================================================================================
# Flags, checkpoints and models of the sample scripts
# ======================================================================================


def sample_defaults() -> Dict[str, Any]:
    """The flags every sample script has (upstream's ``image_sample.py`` ones + this project's)."""
    return dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        eta=0.0,
        **checkpoint_selection_defaults(),
        seed=0,
        out_dir="",
        overwrite=False,  # replace an existing samples file (else refused before sampling)
        grid="",
        progress=True,
        sample_precision="fp32",  # fp32 | bf16 | fp16 (network under autocast; faster on GPUs)
    )


def _other_known_keys() -> Set[str]:
    """Keys of training/model configs that a sample script may meet in a --config and ignore."""
    keys: Set[str] = set(training_defaults()) | {"flavor"}
    for d in (model_and_diffusion_defaults(), classifier_and_diffusion_defaults(), sr_model_and_diffusion_defaults()):
        keys |= set(d)
    return keys


def _strip_config(argv: Sequence[str]) -> Tuple[List[str], str]:
    out, config, skip = [], "", False
    for k, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--config":
            if k + 1 >= len(argv):
                raise ValueError("--config: expected a file name after it")
            config, skip = argv[k + 1], True
        elif tok.startswith("--config="):
            config = tok.split("=", 1)[1]
        else:
            out.append(tok)
    return out, config


def parse_sample_args(
    defaults: Dict[str, Any],
    argv: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
    parser: Optional[argparse.ArgumentParser] = None,
) -> Tuple[argparse.Namespace, Set[str]]:
    """
    Parse a sample script's flags: upstream's defaults-dict flow plus ``--config FILE.yaml``.
    Unlike training, the config may be a training config: its keys that this script does not
    have (training flags, other models' flags) are ignored; keys nobody knows are an error.

    :param defaults: the script's flags and defaults.
    :return: ``(args, given)``: ``given`` holds the flags set by the config or the command line
        (they win over the run's ``config.yaml`` when the model flags are resolved).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, config = _strip_config(argv)
    merged = dict(defaults)
    given: Set[str] = set()
    if config:
        values = load_config(config)
        unknown = sorted(set(values) - set(defaults) - _other_known_keys())
        if unknown:
            raise ValueError(f"--config {config}: unknown key(s) {', '.join(unknown)}. "
                             f"Valid keys: {', '.join(sorted(defaults))} (and training flags, ignored here)")
        mine = {k: v for k, v in values.items() if k in defaults}
        merged.update(coerce_config(mine, defaults, f"--config {config}"))
        given |= set(mine)
    args = parse_args_with_config(merged, rest, description=description, parser=parser)
    args.config = config
    names = {tok[2:].split("=", 1)[0] for tok in rest if tok.startswith("--")}
    given |= {k for k in defaults if k in names}
    return args, given


def default_out_dir(checkpoint: str, kind: str = "samples") -> str:
    """
    Where a sample script writes when ``--out_dir`` is not given.

    ``$OPENAI_LOGDIR`` when set: upstream's scripts call ``logger.configure()``, which logs there,
    and save into ``logger.get_dir()``. Else a folder that names the checkpoint,
    ``<checkpoint's folder>/<kind>/<checkpoint stem>`` (e.g. ``runs/x/samples/ema_0.9999_000200``:
    the stem holds the step and EMA rate, so samples of step 100 and step 200 never share a file);
    ``runs/<kind>-<timestamp>/<stem>`` when the checkpoint's folder is not writable.

    :param checkpoint: the checkpoint sampled from.
    :param kind: the output's kind (``samples``, ``guided_samples``, ``nll``, ...).
    """
    env = os.environ.get("OPENAI_LOGDIR")
    if env:
        return os.path.expanduser(env)
    folder = os.path.dirname(os.path.abspath(checkpoint))
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    if os.access(folder, os.W_OK):
        return os.path.join(folder, kind, stem)
    return os.path.join(logger.default_log_dir(kind), stem)


def setup_sampling(args: argparse.Namespace, checkpoint: str, kind: str = "samples") -> str:
    """
    Set up the process group, fix ``args.out_dir`` (``--out_dir``, else ``default_out_dir``) and
    log to stdout.

    :return: the output folder.
    """
    dist_util.setup_dist()
    args.out_dir = os.path.expanduser(args.out_dir) if args.out_dir else default_out_dir(checkpoint, kind)
    logger.configure(dir=args.out_dir, format_strs=["stdout"])
    return args.out_dir


def check_samples_file(args: argparse.Namespace, num_samples: int, image_size: int, channels: int = 3) -> str:
    """
    The samples file this run will write, ``<--out_dir>/samples_{N}x{H}x{W}x{C}.npz``; refused when
    it exists and ``--overwrite`` is not True. Call it before sampling: a refusal after hours of
    sampling would lose them, an overwrite would silently lose the older batch. Rank 0 looks (the
    only rank that writes) and every rank raises alike.

    :param args: the script's flags (``out_dir`` already set by ``setup_sampling``, ``overwrite``).
    :param num_samples: N.
    :param image_size: H = W of a sample.
    :param channels: C.
    :return: the path.
    :raises FileExistsError: naming the file and ``--overwrite True``.
    """
    path = os.path.join(args.out_dir, samples_file_name((num_samples, image_size, image_size, channels)))
    exists = dist_util.broadcast_from_rank0(os.path.exists(path) if dist_util.get_rank() == 0 else None)
    if exists and not getattr(args, "overwrite", False):
        raise FileExistsError(f"{path} exists (samples of an earlier run); pass --overwrite True to replace it, "
                              "or --out_dir for another folder")
    return path


def _unused_name(folder: str, name: str) -> str:
    stem, ext = os.path.splitext(name)
    k = 1
    while os.path.exists(os.path.join(folder, f"{stem}-{k}{ext}")):
        k += 1
    return f"{stem}-{k}{ext}"


def write_outputs(args: argparse.Namespace, checkpoint: str, images: np.ndarray,
                  labels: Optional[np.ndarray], kind: str = "samples") -> Optional[str]:
    """
    Rank 0: write the npz to ``--out_dir`` (default ``default_out_dir``) and, with ``--grid``,
    a PNG grid; print where. Other ranks write nothing. A samples file that appeared while
    sampling (another process; ``check_samples_file`` found none before) is kept: without
    ``--overwrite True`` this batch goes to ``samples_...-1.npz`` instead, with a warning.

    :return: the npz path on rank 0, else None.
    """
    if dist_util.get_rank() != 0:
        return None
    out_dir = args.out_dir or default_out_dir(checkpoint, kind)
    name = samples_file_name(images)
    if os.path.exists(os.path.join(out_dir, name)) and not getattr(args, "overwrite", False):
        new = _unused_name(out_dir, name)
        logger.warn(f"{os.path.join(out_dir, name)} appeared while sampling; writing {new} instead "
                    "(--overwrite True replaces it)")
        name = new
    path = save_samples_npz(out_dir, images, labels, name=name)
    logger.log(f"saving to {path}")
    print(f"wrote {path}", flush=True)
    if args.grid:
        save_grid(images, args.grid)
        print(f"wrote {args.grid}", flush=True)
    return path


class SamplingSetup(NamedTuple):
    """What ``start_sampling`` returns."""

    args: argparse.Namespace
    given: Set[str]
    checkpoint: str
    model: torch.nn.Module
    diffusion: Any
    flags: Dict[str, Any]


def start_sampling(
    script_defaults: Dict[str, Any],
    model_defaults: Dict[str, Any],
    factory: Callable[..., Tuple[torch.nn.Module, Any]],
    argv: Optional[Sequence[str]] = None,
    description: Optional[str] = None,
    kind: str = "samples",
    validate: Optional[Callable[[argparse.Namespace], None]] = None,
) -> SamplingSetup:
    """
    The common start of the sample scripts: parse the flags (``parse_sample_args``), check them
    (``validate(args)`` raises naming a flag), pick the checkpoint (``resolve_checkpoint``), set up
    ranks, output folder and logging (``setup_sampling``) and load the model
    (``load_checkpoint_model`` with ``model_defaults`` and ``factory``).
    """
    args, given = parse_sample_args(script_defaults, argv, description=description)
    checkpoint = resolve_checkpoint(args.model_path, args.run_dir, args.step, args.ema_rate, args.use_ema)
    if validate is not None:
        validate(args)
    setup_sampling(args, checkpoint, kind)
    logger.log(f"creating model and diffusion from {checkpoint}...")
    model, diffusion, flags = load_checkpoint_model(checkpoint, args, given, model_defaults, factory)
    return SamplingSetup(args, given, checkpoint, model, diffusion, flags)


def finish_sampling(args: argparse.Namespace, checkpoint: str, images: np.ndarray,
                    labels: Optional[np.ndarray]) -> Optional[str]:
    """Write the outputs (rank 0, ``write_outputs``) and wait for every rank; return the npz path."""
    path = write_outputs(args, checkpoint, images, labels)
    dist_util.barrier()
    logger.log("sampling complete")
    return path


__all__ = [
    "step_list",
    "LABEL_STREAM",
    "ProgressLog",
    "SampleNoise",
    "SamplingSetup",
    "check_samples_file",
    "checkpoint_step",
    "default_out_dir",
    "format_seconds",
    "draw_labels",
    "finish_sampling",
    "generate_samples",
    "load_checkpoint_model",
    "model_flags_hint",
    "parse_sample_args",
    "resolve_checkpoint",
    "run_ema_rates",
    "sample_defaults",
    "sample_seed",
    "samples_file_name",
    "save_grid",
    "save_samples_npz",
    "setup_sampling",
    "start_sampling",
    "write_outputs",
]
