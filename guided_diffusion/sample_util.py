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
- The flag handling of the sample scripts: ``sample_defaults``, ``parse_sample_args``
  (``--config`` with training keys allowed), ``resolve_checkpoint`` (``--model_path`` or
  ``--run_dir`` + ``--step`` + ``--ema_rate``), ``load_checkpoint_model`` (model flags:
  command line > ``--config`` > the run's ``config.yaml`` beside the checkpoint > defaults).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from . import dist_util, logger
from .analysis import load_into, load_state_dict_file, resolve_model_flags
from .script_util import NUM_CLASSES, coerce_config, load_config, parse_args_with_config

ModelKwargsFn = Callable[[torch.Tensor, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]

# Stream numbers of ``sample_seed``: 0 is x_T, k + 1 the noise of sampling step k.
LABEL_STREAM = 1 << 40
_MASK64 = (1 << 64) - 1


# ======================================================================================
# Seeds and noise
# ======================================================================================


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int, stream: int) -> int:
    """
    The generator seed of one draw: a 63-bit hash (SplitMix64) of ``(seed, index, stream)``.

    :param seed: the run's ``--seed``.
    :param index: the global index of the sample (0 .. num_samples - 1).
    :param stream: 0 for the initial noise, k + 1 for sampling step k, ``LABEL_STREAM`` for the label.
    """
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(index) & _MASK64))
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    return h & ((1 << 63) - 1)


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
            self._gen.manual_seed(sample_seed(self.seed, i, stream))
            torch.randn(self.shape, generator=self._gen, device=self.device, out=out[n])
        return out

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
    :param progress: show a tqdm bar (rank 0).
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
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_samples, unit="img", desc="sampling")
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
        x = ((sample.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # upstream's conversion, on device
        images.append(_gather_rank_order(x).permute(0, 2, 3, 1).cpu().numpy())
        if "y" in kwargs:
            out_labels.append(_gather_rank_order(kwargs["y"].long()).cpu().numpy())
        offset += world * b
        if bar is not None:
            bar.update(min(world * b, num_samples - (offset - world * b)))
    if bar is not None:
        bar.close()
    arr = np.concatenate(images, axis=0)[:num_samples]
    lab = np.concatenate(out_labels, axis=0)[:num_samples] if out_labels else None
    return arr, lab


# ======================================================================================
# Files
# ======================================================================================


def samples_file_name(images: np.ndarray) -> str:
    """Upstream's name of a sample batch: ``samples_{N}x{H}x{W}x{C}.npz``."""
    return f"samples_{'x'.join(str(int(s)) for s in images.shape)}.npz"


def save_samples_npz(out_dir: Union[str, os.PathLike], images: np.ndarray, labels: Optional[np.ndarray] = None) -> str:
    """
    Write ``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels when given), as
    upstream's sample scripts do, atomically.

    :param out_dir: the folder (created when missing).
    :param images: uint8 [N, H, W, C].
    :param labels: int [N] or None.
    :return: the file's path.
    """
    from .train_util import _atomic_write

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"save_samples_npz: expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"save_samples_npz: {len(labels)} labels for {len(images)} images")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(str(out_dir), samples_file_name(images))
    arrays = [images] if labels is None else [images, np.asarray(labels)]
    _atomic_write(path, lambda f: np.savez(f, *arrays))
    return path


def save_grid(images: np.ndarray, path: Union[str, os.PathLike], max_images: int = 64) -> str:
    """
    Save the first ``max_images`` uint8 NHWC samples as one PNG grid (train_util's writer).

    :return: the PNG path.
    """
    from .train_util import _write_grid

    x = torch.from_numpy(np.asarray(images)[:max_images]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    folder = os.path.dirname(str(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    _write_grid(x, str(path))
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
        model_path="",
        run_dir="",
        step=-1,
        ema_rate="",
        use_ema=True,
        seed=0,
        out_dir="",
        grid="",
        progress=True,
        sample_precision="fp32",  # fp32 | bf16 | fp16 (network under autocast; faster on GPUs)
    )


def _other_known_keys() -> Set[str]:
    """Keys of training/model configs that a sample script may meet in a --config and ignore."""
    from .script_util import classifier_and_diffusion_defaults, model_and_diffusion_defaults, \
        sr_model_and_diffusion_defaults
    from .train_util import training_defaults

    keys: Set[str] = set(training_defaults())
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
    import sys

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


_MODEL_FILE = re.compile(r"^model(\d+)\.pt$")
_EMA_FILE = re.compile(r"^ema_([0-9.eE+-]+)_(\d+)\.pt$")


def checkpoint_step(path: Union[str, os.PathLike]) -> Optional[int]:
    """The step in a ``modelNNNNNN.pt`` / ``ema_R_NNNNNN.pt`` name, or None."""
    base = os.path.basename(str(path))
    m = _MODEL_FILE.match(base) or _EMA_FILE.match(base)
    return int(m.groups()[-1]) if m else None


def run_ema_rates(run_dir: str) -> List[str]:
    """The EMA rates of a run as written in its file names (config order when known)."""
    rates: List[str] = []
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        rate = load_config(cfg_path).get("ema_rate")
        if rate not in (None, ""):
            from .train_util import parse_ema_rates

            rates = [str(r) for r in parse_ema_rates(rate)]
    found = sorted({m.group(1) for m in map(_EMA_FILE.match, os.listdir(run_dir)) if m})
    return rates + [r for r in found if r not in rates]


def resolve_checkpoint(
    model_path: str = "",
    run_dir: str = "",
    step: int = -1,
    ema_rate: str = "",
    use_ema: bool = True,
) -> str:
    """
    The checkpoint file a sample script loads.

    ``--model_path`` (a ``modelNNNNNN.pt`` or ``ema_R_NNNNNN.pt``, as upstream) wins. Otherwise
    ``--run_dir`` with ``--step`` (default: the newest step with a model file) and, with
    ``--use_ema True`` (default), the EMA file of ``--ema_rate`` (default: the run's first rate).

    :raises ValueError / FileNotFoundError: naming the flag and what is missing.
    """
    if model_path:
        if run_dir:
            raise ValueError("give either --model_path or --run_dir, not both")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"--model_path: checkpoint not found: {model_path}")
        return model_path
    if not run_dir:
        raise ValueError("--model_path (a modelNNNNNN.pt / ema_R_NNNNNN.pt file) or --run_dir (a training run "
                         "folder) is required")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run_dir: folder not found: {run_dir}")
    steps = sorted(int(m.group(1)) for m in map(_MODEL_FILE.match, os.listdir(run_dir)) if m)
    if int(step) < 0:
        if not steps:
            raise FileNotFoundError(f"--run_dir {run_dir}: no modelNNNNNN.pt checkpoint in it")
        step = steps[-1]
    if not use_ema:
        path = os.path.join(run_dir, f"model{int(step):06d}.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--step {step}: {path} not found (steps with a model file: {steps})")
        return path
    rates = [str(ema_rate)] if ema_rate else run_ema_rates(run_dir)
    for rate in rates:
        path = os.path.join(run_dir, f"ema_{rate}_{int(step):06d}.pt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"--run_dir {run_dir} --step {step}: no EMA checkpoint "
                            f"{'ema_' + str(ema_rate) if ema_rate else 'ema_<rate>'}_{int(step):06d}.pt "
                            f"(rates of the run: {rates or 'none'}); use --use_ema False for the raw model")


def load_checkpoint_model(
    checkpoint: str,
    args: argparse.Namespace,
    given: Set[str],
    defaults: Dict[str, Any],
    factory: Callable[..., Tuple[torch.nn.Module, Any]],
    device: Union[str, torch.device, None] = None,
    flag_map: Optional[Dict[str, str]] = None,
    model_flags: Optional[str] = None,
) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """
    Build ``factory(**flags)`` and load ``checkpoint`` into it (strict; errors name keys/shapes).

    Flags: ``defaults`` < the ``config.yaml`` of the checkpoint's run < ``model_flags`` (an
    upstream flag string, for runs without a config.yaml) < the flags in ``given`` (``--config``
    and command line; ``timestep_respacing`` etc.).

    :param factory: e.g. ``create_model_and_diffusion``.
    :param flag_map: script flag -> factory flag, for scripts whose flags are renamed
        (none of upstream's are; kept for callers).
    :return: ``(model, diffusion, flags)``; the model in eval mode on ``device``.
    """
    flags, source = resolve_model_flags(checkpoint, model_flags or None, defaults)
    flag_map = flag_map or {}
    for k in given:
        key = flag_map.get(k, k)
        if key in defaults:
            flags[key] = getattr(args, k)
    if "use_checkpoint" in flags:
        flags["use_checkpoint"] = False  # gradient checkpointing only costs time when sampling
    model, diffusion = factory(**flags)
    load_into(model, load_state_dict_file(checkpoint), checkpoint, source + (" < command line" if given else ""))
    if flags.get("use_fp16") or flags.get("classifier_use_fp16"):
        model.convert_to_fp16()
    model.to(device if device is not None else dist_util.dev()).eval()
    return model, diffusion, flags


def default_out_dir(checkpoint: str, kind: str = "samples") -> str:
    """The checkpoint's folder when writable, else ``runs/<kind>-<timestamp>``."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.access(folder, os.W_OK):
        return folder
    return logger.default_log_dir(kind)


def setup_sampling(args: argparse.Namespace, checkpoint: str, kind: str = "samples") -> str:
    """
    Set up the process group, fix ``args.out_dir`` (default ``default_out_dir``) and log to stdout.

    :return: the output folder.
    """
    dist_util.setup_dist()
    args.out_dir = args.out_dir or default_out_dir(checkpoint, kind)
    logger.configure(dir=args.out_dir, format_strs=["stdout"])
    return args.out_dir


def write_outputs(args: argparse.Namespace, checkpoint: str, images: np.ndarray,
                  labels: Optional[np.ndarray], kind: str = "samples") -> Optional[str]:
    """
    Rank 0: write the npz to ``--out_dir`` (default ``default_out_dir``) and, with ``--grid``,
    a PNG grid; print where. Other ranks write nothing.

    :return: the npz path on rank 0, else None.
    """
    if dist_util.get_rank() != 0:
        return None
    path = save_samples_npz(args.out_dir or default_out_dir(checkpoint, kind), images, labels)
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
    "LABEL_STREAM",
    "SampleNoise",
    "SamplingSetup",
    "checkpoint_step",
    "default_out_dir",
    "draw_labels",
    "finish_sampling",
    "generate_samples",
    "load_checkpoint_model",
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
