"""
The diffusion U-Net (``UNetModel``), its super-resolution variant (``SuperResModel``) and the
noisy-image classifier (``EncoderUNetModel``).

Module names, parameter names and shapes are those of upstream guided-diffusion's ``unet.py``
for every configuration, so the published checkpoints of guided-diffusion *and*
improved-diffusion load with ``strict=True`` (improved-diffusion's U-Net is this one with
``resblock_updown=False``, ``use_new_attention_order=False`` and ``num_head_channels=-1``).

What differs from upstream is how it runs: attention uses
``torch.nn.functional.scaled_dot_product_attention`` (equal to upstream's einsum/softmax to float32
rounding), gradient checkpointing is the non-reentrant ``torch.utils.checkpoint`` (autocast-safe),
and the forward pass has no host syncs, so it works with ``channels_last``, ``torch.compile``
and bf16/fp16 autocast.

The building blocks (``ResBlock``, ``AttentionBlock``, ``QKVAttention``, ...) live in
``unet_blocks``; this module re-exports every public one under its upstream home.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import conv_nd, linear, normalization, timestep_embedding, zero_module
from .unet_blocks import (  # noqa: F401  (re-exported: upstream's unet.py defines them all)
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
    convert_module_to_f16,
    convert_module_to_f32,
    count_flops_attn,
)


def _as_rates(attention_resolutions: Union[int, Iterable[int]]) -> Tuple[int, ...]:
    if isinstance(attention_resolutions, str):
        raise TypeError(
            f"attention_resolutions must be a collection of downsample rates (ints), got the string "
            f"{attention_resolutions!r}; script_util converts resolutions to rates (image_size // res)"
        )
    if isinstance(attention_resolutions, int):
        return (attention_resolutions,)
    return tuple(int(r) for r in attention_resolutions)


class UNetModel(nn.Module):
    """
    The full UNet model with attention and timestep embedding.

    :param image_size: side length of the images (used by the classifier's attention pool;
        kept in the signature for upstream compatibility).
    :param in_channels: channels in the input Tensor.
    :param model_channels: base channel count for the model.
    :param out_channels: channels in the output Tensor.
    :param num_res_blocks: number of residual blocks per downsample.
    :param attention_resolutions: a collection of downsample rates at which
        attention will take place. May be a set, list, or tuple.
        For example, if this contains 4, then at 4x downsampling, attention
        will be used.
    :param dropout: the dropout probability.
    :param channel_mult: channel multiplier for each level of the UNet.
    :param conv_resample: if True, use learned convolutions for upsampling and
        downsampling.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param num_classes: if specified (as an int), then this model will be
        class-conditional with `num_classes` classes.
    :param use_checkpoint: use gradient checkpointing to reduce memory usage.
    :param use_fp16: run the torso (input, middle and output blocks) in float16 once
        ``convert_to_fp16()`` has been called, as upstream. Without the conversion the model
        computes in its weights' dtype (e.g. under autocast, the modern mixed-precision path).
    :param num_heads: the number of attention heads in each attention layer.
    :param num_head_channels: if specified, ignore num_heads and instead use
                               a fixed channel width per attention head.
    :param num_heads_upsample: works with num_heads to set a different number
                               of heads for upsampling. Deprecated.
    :param use_scale_shift_norm: use a FiLM-like conditioning mechanism.
    :param resblock_updown: use residual blocks for up/downsampling.
    :param use_new_attention_order: use a different attention pattern for potentially
                                    increased efficiency.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = _as_rates(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                up=up,
                down=down,
            )

        def attn_block(ch_in: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch_in,
                use_checkpoint=use_checkpoint,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        self._feature_size = ch
        input_block_chans = [ch]
        ds = 1  # current downsample rate
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res_block(ch, out_ch, down=True)
                        if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                )
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attn_block(ch, num_heads),
            res_block(ch, ch),
        )
        self._feature_size += ch

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        res_block(ch, out_ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self) -> None:
        """
        Convert the torso of the model to float16 (and make float16 its compute dtype).
        """
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.output_blocks.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        """
        Convert the torso of the model back to float32 (and make float32 its compute dtype).
        """
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)
        self.dtype = torch.float32

    @property
    def inner_dtype(self) -> torch.dtype:
        """
        The dtype of the torso's weights (improved-diffusion's name).
        """
        return self.input_blocks[0][0].weight.dtype

    def _embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "y (class labels) must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}, y {'given' if y is not None else 'missing'})"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"y must have shape ({x.shape[0]},) for a batch of {x.shape[0]}, got {tuple(y.shape)}"
                )
            emb = emb + self.label_emb(y)
        return emb

    def _torso_input(self, x: torch.Tensor) -> torch.Tensor:
        # Upstream casts to `self.dtype`; that equals the torso's weight dtype whenever upstream
        # runs. Following the weights also serves an unconverted use_fp16 model (under autocast).
        return x.type(self.inner_dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] Tensor of labels, if class-conditional.
        :return: an [N x C x ...] Tensor of outputs.
        """
        emb = self._embed(x, timesteps, y)
        hs = []
        h = self._torso_input(x)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.type(x.dtype)
        return self.out(h)

    def get_feature_vectors(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> Dict[str, object]:
        """
        Apply the model and return all of the intermediate tensors (improved-diffusion API).

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] Tensor of labels, if class-conditional.
        :return: a dict with the following keys:
                 - 'down': a list of hidden state tensors from downsampling.
                 - 'middle': the tensor of the output of the lowest-resolution
                             block in the model.
                 - 'up': a list of hidden state tensors from upsampling.
        """
        emb = self._embed(x, timesteps, y)
        hs = []
        result: Dict[str, object] = dict(down=[], up=[])
        h = self._torso_input(x)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
            result["down"].append(h.type(x.dtype))
        h = self.middle_block(h, emb)
        result["middle"] = h.type(x.dtype)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
            result["up"].append(h.type(x.dtype))
        return result


class SuperResModel(UNetModel):
    """
    A UNetModel that performs super-resolution.

    Expects an extra kwarg `low_res` to condition on a low-resolution image, which is
    upsampled bilinearly to the size of `x` and concatenated to it (so the network sees
    ``in_channels * 2`` channels).
    """

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        low_res: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        :param x: an [N x C x H x W] Tensor of noisy high-resolution inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param low_res: an [N x C x h x w] Tensor of low-resolution conditioning images.
        :param kwargs: passed on to UNetModel.forward (e.g. ``y``).
        """
        if low_res is None:
            raise ValueError("SuperResModel.forward needs low_res (the low-resolution image batch)")
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        x = torch.cat([x, upsampled], dim=1)
        return super().forward(x, timesteps, **kwargs)

    def get_feature_vectors(self, x, timesteps, low_res=None, **kwargs):
        """
        UNetModel.get_feature_vectors on `x` concatenated with the upsampled `low_res`.
        """
        if low_res is None:
            raise ValueError("SuperResModel.get_feature_vectors needs low_res")
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        x = torch.cat([x, upsampled], dim=1)
        return super().get_feature_vectors(x, timesteps, **kwargs)


_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNetModel(nn.Module):
    """
    The half UNet model with attention and timestep embedding (the noisy-image classifier).

    For usage, see UNetModel. Extra parameter:

    :param pool: how the features become logits: "adaptive" (average pool + 1x1 conv),
        "attention" (AttentionPool2d, needs num_head_channels), "spatial" or "spatial_v2"
        (spatial means of every block concatenated, then an MLP).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if pool not in _POOLS:
            raise ValueError(f"classifier_pool must be one of {_POOLS}, got {pool!r}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError('classifier pool "attention" needs num_head_channels (got -1)')
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = _as_rates(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        def res_block(ch_in: int, ch_out: int, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                down=down,
            )

        def attn_block(ch_in: int) -> AttentionBlock:
            return AttentionBlock(
                ch_in,
                use_checkpoint=use_checkpoint,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        self._feature_size = ch
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn_block(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
            if level != len(self.channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res_block(ch, out_ch, down=True)
                        if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                )
                ch = out_ch
                ds *= 2
                self._feature_size += ch

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attn_block(ch),
            res_block(ch, ch),
        )
        self._feature_size += ch
        self.pool = pool
        if pool == "adaptive":
            pool_layer = {1: nn.AdaptiveAvgPool1d(1), 2: nn.AdaptiveAvgPool2d((1, 1)), 3: nn.AdaptiveAvgPool3d(1)}
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                pool_layer[dims],
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d((image_size // ds), ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, self.out_channels),
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, self.out_channels),
            )

    def convert_to_fp16(self) -> None:
        """
        Convert the torso of the model to float16 (and make float16 its compute dtype).
        """
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        """
        Convert the torso of the model back to float32 (and make float32 its compute dtype).
        """
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.dtype = torch.float32

    @property
    def inner_dtype(self) -> torch.dtype:
        """
        The dtype of the torso's weights.
        """
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Apply the model to an input batch.

        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :return: an [N x K] Tensor of outputs.
        """
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        spatial = self.pool.startswith("spatial")
        spatial_dims = tuple(range(2, x.ndim))
        results = []
        h = x.type(self.inner_dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                results.append(h.type(x.dtype).mean(dim=spatial_dims))
        h = self.middle_block(h, emb)
        if spatial:
            results.append(h.type(x.dtype).mean(dim=spatial_dims))
            h = torch.cat(results, dim=-1)
            return self.out(h)
        h = h.type(x.dtype)
        return self.out(h)
