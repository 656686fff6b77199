"""Tests of guided_diffusion.nn and guided_diffusion.unet.

What is checked against what:
- the upstream golden vectors (../shared/fixtures/upstream) load with strict=True and reproduce
  upstream's model output (relative error < 1e-5);
- reference numbers produced by upstream guided-diffusion's own unet.py (run once, offline, on the
  seeded weights and inputs built below) for three non-degenerate tiny models;
- SDPA attention against an explicit softmax(Q^T K / sqrt(d)) V for both qkv orderings;
- every option: output shapes, backward passes, checkpointing giving the same gradients;
- timestep_embedding / update_ema / GroupNorm32 against their closed forms;
- parameter counts of the paper's CIFAR-10 and ImageNet-128 configurations (meta device).
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from guided_diffusion import nn as gnn
from guided_diffusion.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded non-zero weights (upstream zero-initialises output convs, which hides bugs).

    Matrices/kernels ~ N(0, 1/fan_in), 1-D weights (GroupNorm scales) ~ 1 + 0.1 N, biases ~ 0.1 N.
    The upstream reference numbers below were produced with exactly this initialisation.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (0 when both are exactly zero)."""
    out, ref = out.double(), ref.double()
    err, norm = (out - ref).norm().item(), ref.norm().item()
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


def _tiny_kwargs(**over) -> dict:
    kw = dict(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_heads=2,
    )
    kw.update(over)
    return kw


def _forward_backward(model, x, t, **extra):
    """One forward + backward; every parameter must receive a finite, non-zero gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x, t, **extra)
    (out.float() ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    return out


def _build_from_upstream_args(args: dict, improved: bool) -> UNetModel:
    """Upstream create_model's mapping of flags to UNetModel (stand-in while script_util is absent)."""
    size = args["image_size"]
    if improved:  # improved-diffusion picks the multipliers from the image size
        channel_mult = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}[size]
    else:
        channel_mult = tuple(int(c) for c in args["channel_mult"].split(","))
    rates = tuple(size // int(res) for res in args["attention_resolutions"].split(","))
    return UNetModel(
        image_size=size,
        in_channels=3,
        model_channels=args["num_channels"],
        out_channels=6 if args["learn_sigma"] else 3,
        num_res_blocks=args["num_res_blocks"],
        attention_resolutions=rates,
        dropout=args["dropout"],
        channel_mult=channel_mult,
        num_classes=1000 if args["class_cond"] else None,
        use_checkpoint=args["use_checkpoint"],
        use_fp16=args.get("use_fp16", False),
        num_heads=args["num_heads"],
        num_head_channels=args.get("num_head_channels", -1),
        num_heads_upsample=args["num_heads_upsample"],
        use_scale_shift_norm=args["use_scale_shift_norm"],
        resblock_updown=args.get("resblock_updown", False),
        use_new_attention_order=args.get("use_new_attention_order", False),
    )


def _load_fixture(fixtures_dir, case):
    return torch.load(fixtures_dir / f"{case}.pt", weights_only=True)


def _scaled_t(d: dict) -> torch.Tensor:
    # diffusion._scale_timesteps: t * 1000 / num_timesteps when rescale_timesteps
    if d["args"]["rescale_timesteps"]:
        return d["t"].float() * (1000.0 / d["args"]["diffusion_steps"])
    return d["t"]


# ---------------------------------------------------------------------------------------------
# golden vectors


@pytest.mark.parametrize("case", ["id_tiny", "gd_tiny"])
def test_golden_fixture_direct(fixtures_dir, case):
    d = _load_fixture(fixtures_dir, case)
    model = _build_from_upstream_args(d["args"], improved=(case == "id_tiny"))
    mine, theirs = set(model.state_dict()), set(d["state_dict"])
    assert mine == theirs, f"missing {sorted(theirs - mine)[:5]}, unexpected {sorted(mine - theirs)[:5]}"
    model.load_state_dict(d["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(d["x_t"], _scaled_t(d), **d["model_kwargs"])
    assert out.shape == d["model_output"].shape
    assert _rel_err(out, d["model_output"]) < 1e-5


@pytest.mark.parametrize(
    "case,module",
    [("id_tiny", "improved_diffusion.script_util"), ("gd_tiny", "guided_diffusion.script_util")],
)
def test_golden_fixture_via_script_util(fixtures_dir, case, module):
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    script_util = importlib.import_module(module)
    d = _load_fixture(fixtures_dir, case)
    model, diffusion = script_util.create_model_and_diffusion(**d["args"])
    model.load_state_dict(d["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(d["x_t"], diffusion._scale_timesteps(d["t"]), **d["model_kwargs"])
    assert _rel_err(out, d["model_output"]) < 1e-5


# Outputs of upstream guided-diffusion's unet.py (the PyPI sdist guided-diffusion-sdk 1.0.0, whose
# unet.py is openai/guided-diffusion's) on _randomize(model, 1234), x = randn(2, 3, 16, 16) from
# seed 99: the norm of the output and out.reshape(-1)[::97] (all 20 logits for the classifier).
_UPSTREAM_CASES = {
    "gd": (
        UNetModel,
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_classes=10, num_head_channels=16,
             use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True),
        [3.0, 700.0], {"y": [3, 7]},
        32.75229104608018,
        [-0.021089835, -0.27678272, 0.2530874, 0.22163877, -0.46953911, 0.74134082, -0.47316512,
         -0.99089694, -0.017205086, -0.89673698, -0.19044955, 0.61504984, -0.41602474, 0.4733974,
         0.48140988, 0.70272201, 0.086912915, 1.0983669, -0.052396357, -0.76127964, 0.42704734,
         -0.93949538, 0.40763983, -0.21677871, 0.6574477, -0.18925056, -0.01854853, -0.12584399,
         -0.37564057, 0.4987632, -0.41613099, -0.15978968],
    ),
    "id": (
        UNetModel,
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True),
        [891.0, 70.25], {},
        33.93903215408971,
        [0.62016678, -0.20941806, 0.047873333, -0.28287476, -0.70518166, 0.52732474, -0.17648602,
         -0.21790624, -0.21386164, 0.26905149, -0.75708026, 0.61724114, -0.33758429, 0.52870274,
         -0.66418493, -0.46437773, 0.94391572, 0.56918263, 0.37923113, -0.56188297, -0.82662505,
         -0.43656269, 0.074800581, -0.59795779, 0.35503182, 0.039287113, 0.38701496, 0.95140582,
         -0.45299652, 0.14118786, -1.5386124, -0.82572192],
    ),
    "cls": (
        EncoderUNetModel,
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
             use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
             pool="attention"),
        [250.0, 999.0], {},
        1.8203148696998304,
        [0.2995297, -0.41418275, -0.02380991, -0.22130433, 0.59191537, 0.44095585, -0.3128708,
         -0.41193369, 0.58521378, 0.17829925, 0.23677421, -0.3498241, -0.067951284, -0.29292247,
         0.74855554, 0.58666587, -0.20518532, -0.41445795, 0.63220924, 0.17073989],
    ),
}


@pytest.mark.parametrize("case", sorted(_UPSTREAM_CASES))
def test_matches_upstream_reference_numbers(case):
    cls, kw, t, extra, ref_norm, ref_values = _UPSTREAM_CASES[case]
    model = _randomize(cls(**kw), 1234).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(99))
    extra = {k: torch.tensor(v) for k, v in extra.items()}
    with torch.no_grad():
        out = model(x, torch.tensor(t), **extra).double()
    flat = out.reshape(-1)
    values = flat[::97] if flat.numel() > 100 else flat
    assert out.norm().item() == pytest.approx(ref_norm, rel=1e-5)
    torch.testing.assert_close(values, torch.tensor(ref_values, dtype=torch.float64), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention


def _explicit_attention(q, k, v):
    """softmax(Q^T K / sqrt(d)) V for [B x d x T] tensors, written out."""
    d = q.shape[1]
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v)


@pytest.mark.parametrize("heads,ch,length", [(1, 8, 5), (3, 16, 17), (4, 32, 64)])
def test_sdpa_attention_equals_explicit_reference(heads, ch, length):
    g = torch.Generator().manual_seed(heads)
    bs = 2
    qkv = torch.randn(bs, 3 * heads * ch, length, generator=g, dtype=torch.float64).float()

    # legacy: channels laid out as (head, [q, k, v], ch)
    per_head = qkv.reshape(bs, heads, 3, ch, length)
    ref_legacy = torch.cat(
        [_explicit_attention(per_head[:, h, 0], per_head[:, h, 1], per_head[:, h, 2]) for h in range(heads)], dim=1
    )
    # new order: channels laid out as ([q, k, v], head, ch)
    per_qkv = qkv.reshape(bs, 3, heads, ch, length)
    ref_new = torch.cat(
        [_explicit_attention(per_qkv[:, 0, h], per_qkv[:, 1, h], per_qkv[:, 2, h]) for h in range(heads)], dim=1
    )
    out_legacy = QKVAttentionLegacy(heads)(qkv)
    out_new = QKVAttention(heads)(qkv)
    assert out_legacy.shape == out_new.shape == (bs, heads * ch, length)
    torch.testing.assert_close(out_legacy, ref_legacy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_new, ref_new, rtol=1e-5, atol=1e-6)
    if heads > 1:  # the two orderings really are different functions of the same qkv
        assert (out_legacy - out_new).abs().max() > 1e-2


def test_attention_errors_name_the_flag():
    with pytest.raises(ValueError, match="num_head_channels=24"):
        AttentionBlock(64, num_head_channels=24)
    with pytest.raises(ValueError, match="num_heads=3"):
        AttentionBlock(64, num_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        QKVAttention(4)(torch.zeros(1, 30, 5))


def test_attention_block_backward_on_3d_input():
    block = _randomize(AttentionBlock(32, num_heads=4, use_new_attention_order=True), 0)
    x = torch.randn(2, 32, 2, 3, 4, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# UNet options


_OPTION_CASES = {
    "default": {},
    "mult_1_2_2": dict(channel_mult=(1, 2, 2), image_size=16),
    "mult_fractional": dict(channel_mult=(1, 1.5), model_channels=64),
    "two_res_blocks_attn_everywhere": dict(num_res_blocks=2, attention_resolutions=(1, 2)),
    "num_head_channels": dict(num_head_channels=16),
    "num_heads_upsample": dict(num_heads=4, num_heads_upsample=1),
    "resblock_updown": dict(resblock_updown=True),
    "scale_shift": dict(use_scale_shift_norm=True),
    "no_scale_shift_new_order": dict(use_scale_shift_norm=False, use_new_attention_order=True),
    "legacy_order_scale_shift": dict(use_scale_shift_norm=True, use_new_attention_order=False),
    "class_cond": dict(num_classes=5),
    "dropout": dict(dropout=0.3),
    "no_conv_resample": dict(conv_resample=False),
    "guided_like": dict(num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True,
                        use_new_attention_order=True, num_classes=5),
}


@pytest.mark.parametrize("name", sorted(_OPTION_CASES))
def test_unet_option_shape_and_backward(name):
    kw = _tiny_kwargs(**_OPTION_CASES[name])
    torch.manual_seed(0)
    model = _randomize(UNetModel(**kw), 1)
    size = kw["image_size"]
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([10, 900])
    extra = {"y": torch.tensor([0, 4])} if kw.get("num_classes") else {}
    out = _forward_backward(model, x, t, **extra)
    assert out.shape == (2, 6, size, size)
    assert out.dtype == torch.float32


def test_unet_1d_and_3d_smoke():
    m1 = _randomize(UNetModel(**_tiny_kwargs(dims=1, resblock_updown=True)), 2)
    out = _forward_backward(m1, torch.randn(2, 3, 16), torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 6, 16)
    # 3-D: resampling acts on the inner two dimensions only
    m3 = _randomize(UNetModel(**_tiny_kwargs(dims=3, num_head_channels=32)), 3)
    out = _forward_backward(m3, torch.randn(1, 3, 3, 4, 4), torch.tensor([5]))
    assert out.shape == (1, 6, 3, 4, 4)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_use_checkpoint_gives_the_same_gradients(dropout):
    kw = _tiny_kwargs(dropout=dropout, use_scale_shift_norm=True, resblock_updown=True, num_classes=3)
    plain = _randomize(UNetModel(**kw), 4)
    ckpt = UNetModel(**dict(kw, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 500])
    y = torch.tensor([0, 2])
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # the same dropout masks (checkpointing restores the RNG on recompute)
        out = _forward_backward(model, x, t, y=y)
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_class_cond_and_input_errors():
    model = UNetModel(**_tiny_kwargs(num_classes=4))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="y \\(class labels\\)"):
        model(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="y must have shape"):
        model(x, torch.tensor([1, 2]), y=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="y \\(class labels\\)"):
        UNetModel(**_tiny_kwargs())(x, torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1-D"):
        UNetModel(**_tiny_kwargs())(x, torch.tensor(3))
    with pytest.raises(TypeError, match="attention_resolutions"):
        UNetModel(**_tiny_kwargs(attention_resolutions="16,8"))
    with pytest.raises(ValueError, match="num_channels x channel_mult"):
        UNetModel(**_tiny_kwargs(model_channels=48))


def test_labels_change_the_output():
    model = _randomize(UNetModel(**_tiny_kwargs(num_classes=4)), 5).eval()
    x = torch.randn(1, 3, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model(x, torch.tensor([7, 7]), y=torch.tensor([0, 3]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_get_feature_vectors():
    model = _randomize(UNetModel(**_tiny_kwargs()), 6).eval()
    with torch.no_grad():
        feats = model.get_feature_vectors(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert len(feats["down"]) == len(model.input_blocks)
    assert len(feats["up"]) == len(model.output_blocks)
    assert feats["middle"].shape == (2, 64, 4, 4)


def test_channels_last_and_autocast_bf16():
    model = _randomize(UNetModel(**_tiny_kwargs(use_scale_shift_norm=True, num_head_channels=16)), 7).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([4, 444])
    with torch.no_grad():
        ref = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x, t)
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-5)
    assert out_bf16.dtype == torch.bfloat16
    assert _rel_err(out_bf16.float(), ref) < 5e-2


def test_use_fp16_flag_and_conversion():
    kw = _tiny_kwargs()
    ref_model = _randomize(UNetModel(**kw), 8).eval()
    model = UNetModel(**dict(kw, use_fp16=True))
    model.load_state_dict(ref_model.state_dict(), strict=True)
    model.eval()
    assert model.dtype == torch.float16
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    # Not converted (the autocast path): runs in the weights' dtype, same result as float32.
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref_model(x, t))
    model.convert_to_fp16()
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.middle_block[1].qkv.weight.dtype == torch.float16
    assert model.middle_block[0].in_layers[0].weight.dtype == torch.float32  # GroupNorm stays fp32
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    with torch.no_grad():
        out16 = model(x, t)
    assert out16.dtype == torch.float32  # the torso runs in float16, the output layers in float32
    assert _rel_err(out16, ref_model(x, t).detach()) < 1e-2
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_torch_compile_fullgraph_traces():
    """No graph breaks (host syncs such as .item() or data-dependent branches would break it)."""
    torch._dynamo.reset()
    model = _randomize(UNetModel(**_tiny_kwargs(num_classes=3, resblock_updown=True, use_scale_shift_norm=True)), 9)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 9]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y=y), model(x, t, y=y))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# SuperResModel and EncoderUNetModel


def test_super_res_model_shape_backward_and_error():
    model = _randomize(SuperResModel(**_tiny_kwargs(image_size=16)), 10)
    assert model.input_blocks[0][0].in_channels == 6  # in_channels * 2
    x, low = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    out = _forward_backward(model, x, torch.tensor([5, 50]), low_res=low)
    assert out.shape == (2, 6, 16, 16)
    # low_res really is the bilinear upsample concatenated to x
    plain = UNetModel(**_tiny_kwargs(image_size=16, in_channels=6))
    plain.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    plain.eval()
    with torch.no_grad():
        up = F.interpolate(low, (16, 16), mode="bilinear")
        torch.testing.assert_close(
            model(x, torch.tensor([5, 50]), low_res=low), plain(torch.cat([x, up], 1), torch.tensor([5, 50]))
        )
    with pytest.raises(ValueError, match="low_res"):
        model(x, torch.tensor([5, 50]))


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_unet_pools(pool):
    kw = dict(image_size=16, in_channels=3, model_channels=32, out_channels=7, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
              use_scale_shift_norm=True, resblock_updown=True, pool=pool)
    model = _randomize(EncoderUNetModel(**kw), 11)
    out = _forward_backward(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
    assert out.shape == (2, 7)
    if pool == "attention":
        # (image_size // 2)^2 positions + the mean token
        assert model.out[2].positional_embedding.shape == (64, 8 * 8 + 1)


def test_encoder_errors():
    kw = dict(image_size=16, in_channels=3, model_channels=32, out_channels=7, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2))
    with pytest.raises(ValueError, match="classifier_pool"):
        EncoderUNetModel(**kw, pool="max")
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetModel(**kw, pool="attention")
    model = EncoderUNetModel(**kw, num_head_channels=32, pool="attention")
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]))


# ---------------------------------------------------------------------------------------------
# nn.py


@pytest.mark.parametrize("dim", [8, 9, 128])
def test_timestep_embedding_closed_form(dim):
    t = torch.tensor([0, 1, 17, 999])
    emb = gnn.timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    for row, tv in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            assert emb[row, i].item() == pytest.approx(math.cos(tv * freq), abs=2e-4)
            assert emb[row, half + i].item() == pytest.approx(math.sin(tv * freq), abs=2e-4)
    if dim % 2:
        assert (emb[:, -1] == 0).all()
    # fractional timesteps (rescale_timesteps) and a custom max_period
    emb2 = gnn.timestep_embedding(torch.tensor([2.5]), 4, max_period=100)
    expected = [math.cos(2.5), math.cos(2.5 * 0.1), math.sin(2.5), math.sin(2.5 * 0.1)]
    torch.testing.assert_close(emb2[0], torch.tensor(expected))


def test_timestep_embedding_stays_float32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = gnn.timestep_embedding(torch.tensor([999, 3]), 16)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, gnn.timestep_embedding(torch.tensor([999, 3]), 16))


def test_update_ema_formula():
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    sources = [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    expected = [tt * 0.9 + s.detach() * (1 - 0.9) for tt, s in zip(targets, sources)]
    gnn.update_ema(iter(targets), iter(sources), rate=0.9)  # generators work, as with .parameters()
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want)
    # on real model parameters (which require grad) and the default rate
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in a.parameters()]
    gnn.update_ema(a.parameters(), b.parameters())
    for p, p0, q in zip(a.parameters(), before, b.parameters()):
        torch.testing.assert_close(p.detach(), p0 * 0.99 + q.detach() * 0.01)
    with pytest.raises(ValueError, match="update_ema"):
        gnn.update_ema([torch.zeros(1)], [])


def test_group_norm32_float32_compute_and_dtype():
    norm = gnn.normalization(64)
    assert isinstance(norm, gnn.GroupNorm32) and norm.num_groups == 32
    x = torch.randn(2, 64, 3, 3).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.group_norm(x.float(), 32, norm.weight, norm.bias).to(torch.bfloat16))


def test_small_helpers():
    lin = gnn.zero_module(torch.nn.Linear(3, 3))
    assert all((p == 0).all() for p in lin.parameters())
    lin2 = torch.nn.Linear(3, 3)
    w = lin2.weight.detach().clone()
    gnn.scale_module(lin2, 0.5)
    torch.testing.assert_close(lin2.weight.detach(), w * 0.5)
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(gnn.mean_flat(x), torch.tensor([5.5, 17.5]))
    assert isinstance(gnn.conv_nd(3, 2, 2, 1), torch.nn.Conv3d)
    assert isinstance(gnn.avg_pool_nd(1, 2), torch.nn.AvgPool1d)
    with pytest.raises(ValueError, match="dims=4"):
        gnn.conv_nd(4, 2, 2, 1)
    # upstream-signature checkpoint helper: same value and gradient as a plain call
    lin3 = torch.nn.Linear(4, 4)
    inp = torch.randn(2, 4, requires_grad=True)
    out = gnn.checkpoint(lambda z: lin3(z).tanh(), (inp,), lin3.parameters(), True)
    out.sum().backward()
    g_ckpt = inp.grad.clone()
    inp.grad = None
    lin3(inp).tanh().sum().backward()
    torch.testing.assert_close(g_ckpt, inp.grad)


def test_resblock_up_down_shapes():
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    assert ResBlock(32, 16, 0.0, out_channels=64, down=True)(x, emb).shape == (2, 64, 4, 4)
    assert ResBlock(32, 16, 0.0, up=True, use_conv=True)(x, emb).shape == (2, 32, 16, 16)
    with pytest.raises(ValueError, match="up and down"):
        ResBlock(32, 16, 0.0, up=True, down=True)


# ---------------------------------------------------------------------------------------------
# the paper's configurations (counted on the meta device: nothing is allocated or run)


def test_param_count_cifar10_config():
    with torch.device("meta"):
        model = UNetModel(image_size=32, in_channels=3, model_channels=128, out_channels=6,
                          num_res_blocks=3, attention_resolutions=(2, 4), dropout=0.3,
                          channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"CIFAR-10 config: {n} parameters ({n / 1e6:.2f}M)")
    assert abs(n - 52.5e6) / 52.5e6 < 0.01
    keys = model.state_dict().keys()
    assert "input_blocks.4.0.op.weight" in keys and "middle_block.1.qkv.weight" in keys
    assert len(model.input_blocks) == 16 and len(model.output_blocks) == 16


def test_param_count_imagenet128_config():
    with torch.device("meta"):
        model = UNetModel(image_size=128, in_channels=3, model_channels=256, out_channels=6,
                          num_res_blocks=2, attention_resolutions=(4, 8, 16), dropout=0.0,
                          channel_mult=(1, 1, 2, 3, 4), num_classes=1000, use_fp16=True, num_heads=4,
                          num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                          use_new_attention_order=False)
    n = sum(p.numel() for p in model.parameters())
    print(f"ImageNet-128 config: {n} parameters ({n / 1e6:.2f}M)")
    assert abs(n - 421.5e6) / 421.5e6 < 0.01
    assert model.label_emb.weight.shape == (1000, 1024)
    assert model.middle_block[1].num_heads == 1024 // 64
