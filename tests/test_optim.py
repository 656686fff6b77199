"""AdamW factory and the MDLRC schedule (guided_diffusion/optim.py) against DESIGN.md section 4."""
import pytest
import torch

from guided_diffusion.optim import MomentumDecay, create_optimizer

I = 1000  # total steps used throughout


def closed_beta1(i, b=0.9, floor=0.5, total=I):
    r = max(1 - i / total, 0.0)
    return max(floor, b * r / ((1 - b) + b * r))


# ----------------------------------------------------------------------------------- create_optimizer

def test_create_optimizer_adamw_settings():
    p = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = create_optimizer(p, lr=2e-4, weight_decay=0.01, beta1=0.8, beta2=0.99)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["lr"] == 2e-4 and g["weight_decay"] == 0.01 and g["betas"] == (0.8, 0.99)
    # CPU parameters: the multi-tensor implementation, not fused
    assert g["foreach"] is True and not g["fused"]
    opt2 = create_optimizer((q for q in p), lr=1e-4)  # a generator, as model.parameters()
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999) and opt2.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("kw,flag", [
    (dict(lr=0.0), "--lr"), (dict(lr=-1e-4), "--lr"), (dict(lr=float("inf")), "--lr"),
    (dict(lr=1e-4, weight_decay=-0.1), "--weight_decay"),
    (dict(lr=1e-4, beta1=1.0), "--beta1"), (dict(lr=1e-4, beta1=-0.1), "--beta1"),
    (dict(lr=1e-4, beta2=1.0), "--beta2"),
])
def test_create_optimizer_validation(kw, flag):
    with pytest.raises(ValueError, match=flag):
        create_optimizer([torch.nn.Parameter(torch.zeros(1))], **kw)


def test_create_optimizer_no_params():
    with pytest.raises(ValueError, match="no parameters"):
        create_optimizer([], lr=1e-4)


# ----------------------------------------------------------------------------------- MomentumDecay

def test_beta1_and_lr_at_key_steps():
    md = MomentumDecay(beta1=0.9, beta1_min=0.5, total_steps=I)
    # step 0: the initial values
    assert md.beta1_at(0) == pytest.approx(0.9, abs=1e-15)
    assert md.lr_at(0, 1e-4) == pytest.approx(1e-4, rel=1e-12)
    # I/2: r = 1/2 -> 0.45 / 0.55 = 9/11; lr = lr0 * 0.1 / (2/11) = 0.55 lr0
    assert md.beta1_at(I // 2) == pytest.approx(9 / 11, rel=1e-12)
    assert md.lr_at(I // 2, 1e-4) == pytest.approx(0.55e-4, rel=1e-12)
    # I and beyond: r clamps at 0, beta1 at the floor, lr = lr0 * 0.1 / 0.5
    for step in (I, I + 1, 10 * I):
        assert md.beta1_at(step) == 0.5
        assert md.lr_at(step, 1e-4) == pytest.approx(0.2e-4, rel=1e-12)
    # the whole curve against the closed form, monotone non-increasing
    vals = [md.beta1_at(i) for i in range(0, 2 * I, 7)]
    assert vals == pytest.approx([closed_beta1(i) for i in range(0, 2 * I, 7)], rel=1e-12)
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_floor_kicks_in_where_decay_crosses_it():
    md = MomentumDecay(beta1=0.9, beta1_min=0.5, total_steps=I)
    # 0.9 r / (0.1 + 0.9 r) = 0.5  <=>  r = 1/9  <=>  i = 8/9 I = 888.9
    assert md.beta1_at(888) > 0.5
    assert md.beta1_at(888) == pytest.approx(0.9 * (112 / 1000) / (0.1 + 0.9 * 0.112), rel=1e-12)
    assert md.beta1_at(889) == 0.5
    md0 = MomentumDecay(beta1=0.9, beta1_min=0.0, total_steps=I)  # no floor: reaches 0 at I
    assert md0.beta1_at(I) == 0.0 and md0.beta1_at(999) > 0


def test_lr_compensation_formula_and_switch():
    md = MomentumDecay(beta1=0.95, beta1_min=0.3, total_steps=400)
    for i in (0, 37, 200, 399, 400, 1000):
        b = closed_beta1(i, 0.95, 0.3, 400)
        assert md.lr_at(i, 3e-4) == pytest.approx(3e-4 * 0.05 / (1 - b), rel=1e-12)
        # the current gradient's share of the update, lr * (1 - beta1), stays at its start value
        assert md.lr_at(i, 3e-4) * (1 - md.beta1_at(i)) == pytest.approx(3e-4 * 0.05, rel=1e-12)
    off = MomentumDecay(beta1=0.95, beta1_min=0.3, total_steps=400, lr_compensation=False)
    assert off.lr_at(200, 3e-4) == 3e-4 and off.beta1_at(200) == md.beta1_at(200)


def test_apply_sets_every_param_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [a], "betas": (0.9, 0.999)}, {"params": [b], "betas": (0.9, 0.95)}],
                            lr=1e-3)
    md = MomentumDecay(total_steps=I)
    lr, beta1 = md.apply(opt, I // 2, 1e-3)
    assert beta1 == pytest.approx(9 / 11) and lr == pytest.approx(0.55e-3)
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == lr
    assert opt.param_groups[0]["betas"] == (beta1, 0.999)
    assert opt.param_groups[1]["betas"] == (beta1, 0.95)  # beta2 untouched, per group


def test_apply_takes_effect_in_adamw_update():
    """Two AdamW steps with apply() between them equal a hand-written Adam update with beta1(i)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    w0 = w.detach().clone()
    opt = create_optimizer([w], lr=1e-2, weight_decay=0.0, beta1=0.9, beta2=0.999)
    md = MomentumDecay(beta1=0.9, beta1_min=0.5, total_steps=4)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(2)]
    for step, g in enumerate(grads):
        md.apply(opt, step + 2, 1e-2)  # steps 2, 3: beta1 = 9/11 -> floor 0.5 (r=1/4: 0.225/0.325)
        w.grad = g.clone()
        opt.step()
    # reference Adam with the per-step beta1 and compensated lr (eps 1e-8, bias corrections as torch)
    m = torch.zeros(5, dtype=torch.float64)
    v = torch.zeros(5, dtype=torch.float64)
    x = w0.clone()
    for k, g in enumerate(grads, start=1):
        i = k + 1
        b1 = closed_beta1(i, 0.9, 0.5, 4)
        lr = 1e-2 * 0.1 / (1 - b1)
        m = b1 * m + (1 - b1) * g
        v = 0.999 * v + 0.001 * g * g
        bc1 = 1 - b1**k
        bc2 = 1 - 0.999**k
        x = x - lr / bc1 * m / ((v / bc2).sqrt() + 1e-8)
    torch.testing.assert_close(w.detach(), x, rtol=1e-12, atol=1e-14)


def test_apply_with_tensor_hyperparameters_updates_in_place():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([w], lr=torch.tensor(1e-3), betas=(0.9, 0.999), foreach=False)
    lr_t = opt.param_groups[0]["lr"]
    md = MomentumDecay(total_steps=10)
    lr, _ = md.apply(opt, 10, 1e-3)
    assert opt.param_groups[0]["lr"] is lr_t and float(lr_t) == pytest.approx(lr)


def test_disabled_is_identity():
    md = MomentumDecay(beta1=0.9, beta1_min=0.5, total_steps=None, enabled=False)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([w], lr=5.0, betas=(0.3, 0.99))
    assert md.apply(opt, 123, 2e-4) == (2e-4, 0.9)
    assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert md.beta1_at(10**9) == 0.9


def test_composes_with_annealed_base_lr():
    """--lr_anneal_steps (upstream: lr * (1 - step / anneal)) then MDLRC on top of it."""
    lr0, anneal = 1e-4, 800
    md = MomentumDecay(total_steps=I)
    w = torch.nn.Parameter(torch.ones(1))
    opt = create_optimizer([w], lr=lr0)
    for step in (0, 100, 400, 799, 800):
        base = lr0 * (1 - step / anneal)
        lr, b1 = md.apply(opt, step, base)
        assert lr == pytest.approx(base * 0.1 / (1 - closed_beta1(step)), rel=1e-12, abs=0)
        assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["betas"][0] == b1
    assert lr == 0.0  # annealed to zero stays zero


@pytest.mark.parametrize("kw,flags", [
    (dict(beta1=0.5, beta1_min=0.6, total_steps=10), ["--beta1_min", "--beta1"]),
    (dict(total_steps=None), ["--total_steps", "--momentum_decay"]),
    (dict(total_steps=0), ["--total_steps"]),
    (dict(total_steps=-5), ["--total_steps"]),
    (dict(total_steps=10.5), ["--total_steps"]),
    (dict(beta1=1.0, total_steps=10), ["--beta1"]),
    (dict(beta1_min=-0.1, total_steps=10), ["--beta1_min"]),
    (dict(beta1_min=1.0, total_steps=10), ["--beta1_min"]),
])
def test_validation_messages(kw, flags):
    with pytest.raises(ValueError) as e:
        MomentumDecay(**kw)
    for f in flags:
        assert f in str(e.value)


def test_step_validation():
    md = MomentumDecay(total_steps=10)
    with pytest.raises(ValueError, match="step"):
        md.beta1_at(-1)
    assert md.beta1_at(5.0) == md.beta1_at(5)


# issue 31 item 5 (2): --momentum_decay True --total_steps 0 named the value it got as None
def test_mdlrc_without_total_steps_names_the_value_given():
    import sys
    from pathlib import Path

    from guided_diffusion.options import momentum_decay_from_flags, validate_training_args

    with pytest.raises(ValueError, match=r"--momentum_decay needs --total_steps .*got 0$"):
        momentum_decay_from_flags({"momentum_decay": True, "total_steps": 0})
    with pytest.raises(ValueError, match=r"got 0$"):
        validate_training_args({"momentum_decay": True, "total_steps": 0})
    assert momentum_decay_from_flags({"momentum_decay": False, "total_steps": 0}).total_steps is None  # off: no horizon
    assert momentum_decay_from_flags({"momentum_decay": True, "total_steps": 8}).total_steps == 8
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import image_train

    with pytest.raises(ValueError, match=r"got 0$"):  # the script's own message, flags as a user types them
        image_train.main(["--momentum_decay", "True", "--total_steps", "0", "--print_config"])
