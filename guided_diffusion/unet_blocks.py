"""
The building blocks of the U-Net and the classifier (``unet.UNetModel``, ``unet.EncoderUNetModel``):
timestep-conditioned residual blocks, nearest/strided up- and downsampling, self-attention with its
two QKV orders (``QKVAttentionLegacy``, upstream's original; ``QKVAttention``, the new order) run
through ``torch.nn.functional.scaled_dot_product_attention``, the classifier's ``AttentionPool2d``,
and upstream's fp16 helpers ``convert_module_to_f16``/``convert_module_to_f32``. Class names and
parameter names are upstream guided-diffusion's, so checkpoints load with ``strict=True``;
``guided_diffusion.unet`` (upstream's home of all of them) re-exports every public name here.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .nn import avg_pool_nd, conv_nd, linear, normalization, zero_module

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module) -> None:
    """
    Convert the weights of a convolution layer to float16 (upstream ``fp16_util`` helper,
    applied with ``module.apply``); other layers are left in float32.
    """
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module: nn.Module) -> None:
    """
    Undo ``convert_module_to_f16``: convolution weights back to float32.
    """
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def _maybe_checkpoint(enabled: bool, func, *args: torch.Tensor) -> torch.Tensor:
    # Non-reentrant checkpointing: works with autocast and with inputs that need no grad,
    # and restores the RNG state so dropout masks match in the recomputation.
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *args, use_reentrant=False)
    return func(*args)


def _check_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of attention heads for `channels`, validating the head flags."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} must be >= 1 and divide the {channels} channels of an "
                "attention layer"
            )
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels != 0:
        raise ValueError(
            f"num_head_channels={num_head_channels} must be -1 or a positive divisor of the "
            f"{channels} channels of an attention layer"
        )
    return channels // num_head_channels


def _sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """
    Attention over per-head tensors in upstream's channel-major layout.

    :param q, k, v: [B x H x C x T] queries, keys and values (C channels per head).
    :return: an [B x (H * C) x T] tensor: softmax(Q^T K / sqrt(C)) applied to V, per head.
    """
    b, h, c, t = q.shape
    # SDPA wants [..., T, C]; its default scale 1/sqrt(C) equals upstream's (C^-1/4)^2 on q and k.
    out = F.scaled_dot_product_attention(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
    )
    return out.transpose(-1, -2).reshape(b, h * c, t)


def count_flops_attn(model: nn.Module, _x, y) -> None:
    """thop counter for the attention matmuls (upstream's ``count_flops_attn``)."""
    b, c, *spatial = y[0].shape
    num_spatial = int(math.prod(spatial))
    # Two matmuls of the same cost: the attention weights and the weighted values.
    matmul_ops = 2 * b * (num_spatial**2) * c
    model.total_ops += torch.DoubleTensor([matmul_ops])


class AttentionPool2d(nn.Module):
    """
    Attention pooling over the spatial positions plus their mean (adapted from CLIP); the
    output is the attention result at the mean token.

    :param spacial_dim: side length of the (square) input feature map.
    :param embed_dim: channels of the input.
    :param num_heads_channels: channels per attention head.
    :param output_dim: output channels (default: embed_dim).
    """

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_heads_channels: int,
        output_dim: Optional[int] = None,
    ):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = _check_heads(embed_dim, 1, num_heads_channels)
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # [N x C x (HW + 1)]
        if x.shape[-1] != self.positional_embedding.shape[-1]:
            raise ValueError(
                f"AttentionPool2d: input has {x.shape[-1] - 1} positions but the pool was built "
                f"for {self.positional_embedding.shape[-1] - 1} (image_size does not match the model)"
            )
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = self.qkv_proj(x)
        x = self.attention(x)
        x = self.c_proj(x)
        return x[:, :, 0]


class TimestepBlock(nn.Module):
    """
    Any module where forward() takes timestep embeddings as a second argument.
    """

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        Apply the module to `x` given `emb` timestep embeddings.
        """


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """
    A sequential module that passes timestep embeddings to the children that
    support it as an extra input.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """
    An upsampling layer (nearest neighbour x2) with an optional convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a convolution is applied.
    :param dims: determines if the signal is 1D, 2D, or 3D. If 3D, then
                 upsampling occurs in the inner-two dimensions.
    :param out_channels: output channels (only with use_conv; default: channels).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(
                f"Upsample without a convolution (conv_resample=False) cannot change channels "
                f"{channels} -> {self.out_channels}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expected {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """
    A downsampling layer (x2) with an optional convolution.

    :param channels: channels in the inputs and outputs.
    :param use_conv: a bool determining if a strided convolution (else average pooling) is used.
    :param dims: determines if the signal is 1D, 2D, or 3D. If 3D, then
                 downsampling occurs in the inner-two dimensions.
    :param out_channels: output channels (only with use_conv; default: channels).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError(
                    f"Downsample without a convolution (conv_resample=False) cannot change "
                    f"channels {channels} -> {self.out_channels}"
                )
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block that can optionally change the number of channels.

    :param channels: the number of input channels.
    :param emb_channels: the number of timestep embedding channels.
    :param dropout: the rate of dropout (probability).
    :param out_channels: if specified, the number of out channels.
    :param use_conv: if True and out_channels is specified, use a spatial
        convolution instead of a smaller 1x1 convolution to change the
        channels in the skip connection.
    :param dims: determines if the signal is 1D, 2D, or 3D.
    :param use_checkpoint: if True, use gradient checkpointing on this module.
    :param use_scale_shift_norm: if True, the embedding sets a scale and shift of the second
        GroupNorm (FiLM) instead of being added before it.
    :param up: if True, use this block for upsampling.
    :param down: if True, use this block for downsampling.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be True")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(
                emb_channels,
                2 * self.out_channels if use_scale_shift_norm else self.out_channels,
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        Apply the block to a Tensor, conditioned on a timestep embedding.

        :param x: an [N x C x ...] Tensor of features.
        :param emb: an [N x emb_channels] Tensor of timestep embeddings.
        :return: an [N x C x ...] Tensor of outputs.
        """
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, in_act, in_conv = self.in_layers
        if self.updown:
            # Resample between the activation and the convolution, as upstream.
            h = in_conv(self.h_upd(in_act(in_norm(x))))
            x = self.x_upd(x)
        else:
            h = in_conv(in_act(in_norm(x)))
        emb_out = self.emb_layers(emb).type(h.dtype)
        # [N x C] -> [N x C x 1 x ...] to broadcast over the spatial dimensions.
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.ndim - 2))
        out_norm, out_act, out_drop, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = out_conv(out_drop(out_act(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """
    An attention block that allows spatial positions to attend to each other.

    Originally ported from here, but adapted to the N-d case.
    https://github.com/hojonathanho/diffusion/blob/1e0dceb3b3495bbe19116a5e1b3596cd0706c543/diffusion_tf/models/unet.py#L66.

    :param channels: channels of the input.
    :param num_heads: number of heads (used when num_head_channels is -1).
    :param num_head_channels: if not -1, a fixed channel width per head (overrides num_heads).
    :param use_checkpoint: if True, use gradient checkpointing on this module.
    :param use_new_attention_order: split qkv into q, k, v before splitting heads
        (``QKVAttention``) instead of heads first (``QKVAttentionLegacy``).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = _check_heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        if use_new_attention_order:
            # split qkv before split heads
            self.attention = QKVAttention(self.num_heads)
        else:
            # split heads before split qkv
            self.attention = QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        :param x: an [N x C x ...] Tensor of features.
        :return: x plus the attention output, same shape.
        """
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class QKVAttentionLegacy(nn.Module):
    """
    A module which performs QKV attention. Matches legacy QKVAttention + input/output heads
    shaping: the channels of qkv are laid out as (heads, [q, k, v], channels per head).
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """
        Apply QKV attention.

        :param qkv: an [N x (H * 3 * C) x T] tensor of Qs, Ks, and Vs.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads) != 0:
            raise ValueError(f"qkv width {width} is not divisible by 3 x {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, self.n_heads, 3, ch, length).unbind(2)
        return _sdpa_heads(q, k, v)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVAttention(nn.Module):
    """
    A module which performs QKV attention and splits in a different order: the channels of
    qkv are laid out as ([q, k, v], heads, channels per head).
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """
        Apply QKV attention.

        :param qkv: an [N x (3 * H * C) x T] tensor of Qs, Ks, and Vs.
        :return: an [N x (H * C) x T] tensor after attention.
        """
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads) != 0:
            raise ValueError(f"qkv width {width} is not divisible by 3 x {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, 3, self.n_heads, ch, length).unbind(1)
        return _sdpa_heads(q, k, v)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)
