"""
Upstream's public names, for users porting guided-diffusion / improved-diffusion code: every
name this project claims to provide imports from the module upstream has it in (``GUIDED``,
``IMPROVED``; ``TrainLoop``'s methods: ``GUIDED_LOOP``, ``IMPROVED_LOOP``), and the ones added for
porting behave as upstream documents (fp16_util, TrainLoop's hooks and ``mp_trainer``, the resume
hooks called where upstream calls them, Improved-Diffusion's fp16 methods, ``nn.CheckpointFunction``,
``ImageDataset``, the logger's ``scoped_configure``/``reset``/``profile``/``get_rank_without_mpi_import``).
Every upstream public name is provided (docs/dev/contract.md).
"""
import importlib
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

GUIDED = {
    "dist_util": ["setup_dist", "dev", "load_state_dict", "sync_params", "GPUS_PER_NODE", "SETUP_RETRY_COUNT"],
    "fp16_util": [
        "convert_module_to_f16", "convert_module_to_f32", "make_master_params", "model_grads_to_master_grads",
        "master_params_to_model_params", "unflatten_master_params", "get_param_groups_and_shapes",
        "master_params_to_state_dict", "state_dict_to_master_params", "zero_master_grads", "zero_grad",
        "param_grad_or_zeros", "MixedPrecisionTrainer", "check_overflow", "INITIAL_LOG_LOSS_SCALE",
    ],
    "gaussian_diffusion": [
        "get_named_beta_schedule", "betas_for_alpha_bar", "ModelMeanType", "ModelVarType", "LossType",
        "GaussianDiffusion",
    ],
    "image_datasets": ["load_data", "ImageDataset", "center_crop_arr", "random_crop_arr"],
    "logger": [
        "KVWriter", "SeqWriter", "HumanOutputFormat", "JSONOutputFormat", "CSVOutputFormat",
        "TensorBoardOutputFormat", "make_output_format", "logkv", "logkv_mean", "logkvs", "dumpkvs", "getkvs",
        "log", "debug", "info", "warn", "error", "set_level", "set_comm", "get_dir", "record_tabular",
        "dump_tabular", "profile_kv", "profile", "get_current", "Logger", "configure", "reset",
        "scoped_configure", "mpi_weighted_mean", "DEBUG", "INFO", "WARN", "ERROR", "DISABLED",
        "get_rank_without_mpi_import",
    ],
    "losses": ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"],
    "nn": [
        "SiLU", "GroupNorm32", "conv_nd", "linear", "avg_pool_nd", "update_ema", "zero_module", "scale_module",
        "mean_flat", "normalization", "timestep_embedding", "checkpoint", "CheckpointFunction",
    ],
    "resample": [
        "create_named_schedule_sampler", "ScheduleSampler", "UniformSampler", "LossAwareSampler",
        "LossSecondMomentResampler",
    ],
    "respace": ["space_timesteps", "SpacedDiffusion"],
    "script_util": [
        "NUM_CLASSES", "diffusion_defaults", "classifier_defaults", "model_and_diffusion_defaults",
        "classifier_and_diffusion_defaults", "create_model_and_diffusion", "create_model",
        "create_classifier_and_diffusion", "create_classifier", "sr_model_and_diffusion_defaults",
        "sr_create_model_and_diffusion", "sr_create_model", "create_gaussian_diffusion", "add_dict_to_argparser",
        "args_to_dict", "str2bool",
    ],
    "train_util": [
        "TrainLoop", "parse_resume_step_from_filename", "get_blob_logdir", "find_resume_checkpoint",
        "find_ema_checkpoint", "log_loss_dict", "INITIAL_LOG_LOSS_SCALE",
    ],
    "unet": [
        "convert_module_to_f16", "convert_module_to_f32", "AttentionPool2d", "TimestepBlock",
        "TimestepEmbedSequential", "Upsample", "Downsample", "ResBlock", "AttentionBlock", "QKVAttentionLegacy",
        "QKVAttention", "count_flops_attn", "UNetModel", "SuperResModel", "EncoderUNetModel",
    ],
}

IMPROVED = {
    "dist_util": GUIDED["dist_util"],
    "fp16_util": [
        "convert_module_to_f16", "convert_module_to_f32", "make_master_params", "model_grads_to_master_grads",
        "master_params_to_model_params", "unflatten_master_params", "zero_grad",
    ],
    "gaussian_diffusion": GUIDED["gaussian_diffusion"],
    "image_datasets": ["load_data", "ImageDataset"],
    "logger": GUIDED["logger"],
    "losses": GUIDED["losses"],
    "nn": GUIDED["nn"],
    "resample": GUIDED["resample"],
    "respace": GUIDED["respace"],
    "script_util": [
        "NUM_CLASSES", "model_and_diffusion_defaults", "create_model_and_diffusion", "create_model",
        "sr_model_and_diffusion_defaults", "sr_create_model_and_diffusion",
        "create_gaussian_diffusion", "add_dict_to_argparser", "args_to_dict", "str2bool",
        "sr_create_model",
    ],
    "train_util": GUIDED["train_util"],
    "unet": [
        "convert_module_to_f16", "convert_module_to_f32", "TimestepBlock", "TimestepEmbedSequential", "Upsample",
        "Downsample", "ResBlock", "AttentionBlock", "QKVAttention", "UNetModel", "SuperResModel",
    ],
}


#: upstream TrainLoop's methods (guided-diffusion's; Improved-Diffusion's add its fp16 update)
GUIDED_LOOP = [
    "_load_and_sync_parameters", "_load_ema_parameters", "_load_optimizer_state", "run_loop", "run_step",
    "forward_backward", "_update_ema", "_anneal_lr", "log_step", "save",
]
IMPROVED_LOOP = [n for n in GUIDED_LOOP if n != "_update_ema"] + [
    "_setup_fp16", "optimize_fp16", "optimize_normal", "_log_grad_norm", "_master_params_to_state_dict",
    "_state_dict_to_master_params",
]


@pytest.mark.parametrize("package, table, loop", [("guided_diffusion", GUIDED, GUIDED_LOOP),
                                                  ("improved_diffusion", IMPROVED, IMPROVED_LOOP)])
def test_upstream_names_exist(package, table, loop):
    missing = []
    for module, names in table.items():
        mod = importlib.import_module(f"{package}.{module}")
        missing += [f"{package}.{module}.{n}" for n in names if not hasattr(mod, n)]
    trainloop = importlib.import_module(f"{package}.train_util").TrainLoop
    missing += [f"{package}.train_util.TrainLoop.{n}" for n in loop if not callable(getattr(trainloop, n, None))]
    assert not missing, "upstream names missing: " + ", ".join(missing)


def test_improved_modules_are_the_guided_ones():
    for module in ("fp16_util", "schedules"):
        assert importlib.import_module(f"improved_diffusion.{module}") is importlib.import_module(
            f"guided_diffusion.{module}")


def test_one_owner_of_shared_names():
    from guided_diffusion import fp16_util, train_util, unet

    assert fp16_util.convert_module_to_f16 is unet.convert_module_to_f16
    assert fp16_util.convert_module_to_f32 is unet.convert_module_to_f32
    assert fp16_util.INITIAL_LOG_LOSS_SCALE == train_util.INITIAL_LOG_LOSS_SCALE == 20.0


# ------------------------------------------------------------------------------------ fp16_util


def fp16_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.Flatten(),
                               torch.nn.Linear(3, 2))


def test_master_params_round_trip():
    from guided_diffusion import fp16_util as F

    model = fp16_model()
    model.apply(F.convert_module_to_f16)
    assert model[0].weight.dtype == torch.float16 and model[3].weight.dtype == torch.float32
    groups = F.get_param_groups_and_shapes(model.named_parameters())
    assert [shape for _, shape in groups] == [-1, (1, -1)]
    assert [n for n, _ in groups[0][0]] == ["0.bias", "1.weight", "1.bias", "3.bias"]
    assert [n for n, _ in groups[1][0]] == ["0.weight", "3.weight"]
    masters = F.make_master_params(groups)
    assert [tuple(m.shape) for m in masters] == [(3 + 3 + 3 + 2,), (1, 2 * 3 * 9 + 6)]
    assert all(m.dtype == torch.float32 and m.requires_grad and m.grad is None for m in masters)
    for (group, _), m in zip(groups, masters):
        for (_, p), v in zip(group, F.unflatten_master_params(group, m)):
            assert torch.equal(v, p.float())

    # gradients (zeros where a parameter has none) into the masters, as float32
    for i, (name, p) in enumerate(model.named_parameters()):
        p.grad = None if name == "1.weight" else torch.full_like(p, float(i))  # 0.bias: 1
    F.model_grads_to_master_grads(groups, masters)
    assert masters[0].grad.dtype == torch.float32 and masters[1].grad.shape == masters[1].shape
    grads = dict(zip([n for n, _ in groups[0][0]], F.unflatten_master_params(groups[0][0], masters[0].grad)))
    assert torch.all(grads["1.weight"] == 0) and torch.all(grads["0.bias"] == 1)

    # masters back into the model (cast to each parameter's dtype), and the state_dict views
    with torch.no_grad():
        for m in masters:
            m.add_(0.5)
    F.master_params_to_model_params(groups, masters)
    assert model[0].weight.dtype == torch.float16
    sd = F.master_params_to_state_dict(model, groups, masters, use_fp16=True)
    assert torch.allclose(sd["0.weight"], model[0].weight.float(), atol=1e-3)
    again = F.state_dict_to_master_params(model, sd, use_fp16=True)
    assert all(torch.equal(a, b) for a, b in zip(again, masters))
    state = model.state_dict()
    plain = F.state_dict_to_master_params(model, state, use_fp16=False)
    assert [id(t) for t in plain] == [id(state[n]) for n, _ in model.named_parameters()]
    F.zero_master_grads(masters)
    assert all(m.grad is None for m in masters)


def test_improved_diffusion_signatures():
    # improved-diffusion's fp16_util takes the plain list of model parameters and one flat master
    from improved_diffusion import fp16_util as F

    model = fp16_model()
    params = list(model.parameters())
    masters = F.make_master_params(params)
    assert len(masters) == 1 and masters[0].shape == (sum(p.numel() for p in params),)
    for p in params:
        p.grad = torch.ones_like(p)
    F.model_grads_to_master_grads(params, masters)
    assert torch.equal(masters[0].grad, torch.ones_like(masters[0]))
    with torch.no_grad():
        masters[0].mul_(2)
    F.master_params_to_model_params(params, masters)
    assert all(torch.equal(v, p) for v, p in zip(F.unflatten_master_params(params, masters), params))
    F.zero_grad(params)
    assert all(torch.all(p.grad == 0) for p in params)


def test_check_overflow_and_grad_or_zeros():
    from guided_diffusion.fp16_util import check_overflow, param_grad_or_zeros

    assert check_overflow(float("inf")) and check_overflow(-float("inf")) and check_overflow(float("nan"))
    assert not check_overflow(3.0) and not check_overflow(torch.tensor(1.0))
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(param_grad_or_zeros(p), torch.zeros(3))


def test_mixed_precision_trainer_standalone_fp16_dynamic_loss_scale(tmp_path):
    # upstream usage: masters for the optimizer, a loss scale of 2**20 that overflows float16
    # gradients (max 65504) and halves until it fits (2**15), each overflow skipping the step
    from guided_diffusion import logger
    from guided_diffusion.fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer

    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    model = fp16_model()
    mp = MixedPrecisionTrainer(model=model, use_fp16=True, fp16_scale_growth=1e-3)
    assert model[0].weight.dtype == torch.float16 and mp.lg_loss_scale == INITIAL_LOG_LOSS_SCALE
    before = [p.detach().float().clone() for p in model.parameters()]
    opt = torch.optim.SGD(mp.master_params, lr=0.25)
    results = []
    for _ in range(6):
        mp.zero_grad()
        mp.backward(sum(p.float().sum() for p in model.parameters()))  # d loss / d p = 1
        results.append(mp.optimize(opt))
    assert results == [False] * 5 + [True]
    assert mp.lg_loss_scale == pytest.approx(15 + 1e-3)
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(p.float(), b - 0.25, atol=1e-3)  # one SGD step, copied back
    assert all(m.grad is None for m in mp.master_params)
    sd = mp.master_params_to_state_dict(mp.master_params)
    assert sd["0.weight"].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(mp.state_dict_to_master_params(sd), mp.master_params))


def test_mixed_precision_trainer_fp32_is_plain():
    from guided_diffusion.fp16_util import MixedPrecisionTrainer

    model = fp16_model()
    mp = MixedPrecisionTrainer(model=model)
    assert mp.master_params is mp.model_params and not mp.use_fp16
    opt = torch.optim.SGD(mp.master_params, lr=0.1)
    x = torch.randn(4, 2, 3, 3)
    mp.zero_grad()
    mp.backward(model(x).pow(2).mean())
    w = model[3].weight.detach().clone()
    assert mp.optimize(opt) and not torch.equal(w, model[3].weight)


# -------------------------------------------------------------------------------- TrainLoop


def make_loop(folder, cls=None, **overrides):
    """A tiny TrainLoop in ``folder`` (2 steps, a checkpoint at the end; resumes what is there)."""
    from guided_diffusion import logger
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from guided_diffusion.train_util import TrainLoop

    logger.configure(dir=str(folder), format_strs=["csv"])
    args = model_and_diffusion_defaults()
    args.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
                learn_sigma=False, diffusion_steps=50, dropout=0.0)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args)

    def data():
        while True:
            yield torch.rand(2, 3, 8, 8) * 2 - 1, {}

    kwargs = dict(model=model, diffusion=diffusion, data=data(), batch_size=2, microbatch=-1, lr=1e-3,
                  ema_rate="0.9", log_interval=1, save_interval=0, log_dir=str(folder), total_steps=2)
    kwargs.update(overrides)
    return (cls or TrainLoop)(**kwargs)


@pytest.fixture
def loop(tmp_path):
    return make_loop(tmp_path)


def test_ddp_model_is_the_model_in_one_process(loop):
    assert loop.use_ddp is False and loop.ddp_model is loop.model
    loop.run_loop()  # microbatch sync contexts follow use_ddp, not ddp_model
    assert loop.step == 2


def test_mp_trainer_interface_steps_the_loop_parameters(loop):
    mp = loop.mp_trainer
    assert mp.master_params is mp.model_params and mp.model_params == loop.model_params
    assert mp.use_fp16 is False
    t = torch.tensor([3, 37])
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mp.zero_grad()
    mp.backward(loop.diffusion.training_losses(loop.model, x, t)["loss"].mean())
    before = [p.detach().clone() for p in loop.model_params]
    assert mp.optimize(loop.opt) is True
    assert any(not torch.equal(a, p) for a, p in zip(before, loop.model_params))
    # a non-finite gradient: the step is skipped and the host knows it (CPU, unfused)
    mp.zero_grad()
    mp.backward(loop.diffusion.training_losses(loop.model, x, t)["loss"].mean())
    loop.model_params[0].grad.fill_(float("nan"))
    before = [p.detach().clone() for p in loop.model_params]
    assert mp.optimize(loop.opt) is False
    assert all(torch.equal(a, p) for a, p in zip(before, loop.model_params))
    # the state_dict views map one tensor per parameter
    sd = mp.master_params_to_state_dict(mp.master_params)
    assert set(sd) == set(loop.model.state_dict())
    assert all(a is b for a, b in zip(mp.state_dict_to_master_params(sd), mp.master_params))


def test_update_ema_and_log_step(loop, tmp_path):
    from guided_diffusion import logger

    with torch.no_grad():
        for p in loop.model_params:
            p.add_(1.0)
    ema_before = [e.detach().clone() for e in loop.ema_params[0]]
    loop._update_ema()
    for e, b, p in zip(loop.ema_params[0], ema_before, loop.model_params):
        assert torch.allclose(e, 0.9 * b + 0.1 * p)
    loop.step = 5
    loop.log_step()
    kvs = logger.getkvs()
    assert kvs["step"] == 5 and kvs["samples"] == 6 * loop.global_batch


def test_upstream_style_run_step_override(loop):
    # upstream's run_step, ported verbatim in spirit: forward_backward, mp_trainer.optimize,
    # then the EMA, the lr and the log keys
    calls = []

    def run_step(self, batch, cond):
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
        self._anneal_lr()
        self.log_step()
        calls.append(took_step)

    loop.run_step = run_step.__get__(loop)
    loop.run_loop()
    assert calls == [True, True] and loop.step == 2


# ------------------------------------------------------ TrainLoop's resume hooks (called as upstream)


@pytest.fixture
def trained(tmp_path):
    """A folder with the checkpoint set of step 2 (model, EMA 0.9, optimizer, state)."""
    make_loop(tmp_path).run_loop()
    return tmp_path


def hook_spy(calls):
    from guided_diffusion.train_util import TrainLoop

    class Spy(TrainLoop):
        def _load_and_sync_parameters(self):
            calls.append("params")
            super()._load_and_sync_parameters()

        def _setup_fp16(self):
            calls.append("fp16")
            super()._setup_fp16()

        def _load_optimizer_state(self):
            calls.append("opt")
            super()._load_optimizer_state()

        def _load_ema_parameters(self, rate):
            calls.append(("ema", rate))
            return super()._load_ema_parameters(rate)

    return Spy


def test_load_hooks_are_called_where_upstream_calls_them(trained, tmp_path_factory):
    calls = []
    make_loop(tmp_path_factory.mktemp("fresh"), hook_spy(calls))
    assert calls == ["params"]  # a fresh run: the parameters are synced, nothing is loaded
    calls.clear()
    loop = make_loop(trained, hook_spy(calls), total_steps=4)
    assert calls == ["params", "opt", ("ema", 0.9)]  # resuming: upstream's order
    assert loop.resume_step == loop.step == 2


def test_load_and_sync_parameters_loads_the_checkpoint(trained):
    loop = make_loop(trained, total_steps=4)
    saved = torch.load(trained / "model000002.pt")
    assert all(torch.equal(saved[k], v) for k, v in loop.model.state_dict().items())
    with torch.no_grad():
        for p in loop.model_params:
            p.zero_()
    loop._load_and_sync_parameters()  # again, by hand: the checkpoint's weights are back
    assert all(torch.equal(saved[k], v) for k, v in loop.model.state_dict().items())
    assert loop.resume_step == 2


def test_load_optimizer_state_override_runs_on_resume(trained):
    from guided_diffusion.train_util import TrainLoop

    seen = []

    class OwnOptimizerState(TrainLoop):
        def _load_optimizer_state(self):  # e.g. a port that keeps its optimizer elsewhere
            seen.append(self.resume_step)

    loop = make_loop(trained, OwnOptimizerState, total_steps=4)
    assert seen == [2] and loop.opt.state == {}  # its override ran, instead of the default's load
    loop = make_loop(trained, total_steps=4)  # the default loads the moments
    saved = torch.load(trained / "opt000002.pt")
    assert torch.equal(loop.opt.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def test_load_ema_parameters_returns_the_rates_weights_and_an_override_sets_them(trained):
    from guided_diffusion.train_util import TrainLoop

    loop = make_loop(trained, total_steps=4)
    ema = torch.load(trained / "ema_0.9_000002.pt")
    params = loop._load_ema_parameters(0.9)
    names = [n for n, _ in loop.model.named_parameters()]
    assert all(torch.equal(p, ema[n]) for n, p in zip(names, params))
    assert not all(torch.equal(p, m) for p, m in zip(params, loop.model_params))  # not the model's

    class EmaFromModel(TrainLoop):
        def _load_ema_parameters(self, rate):  # upstream-style: a list of tensors, here the model's
            return [p.detach().clone() for p in self.model_params]

    loop = make_loop(trained, EmaFromModel, total_steps=4)
    assert all(torch.equal(e, p) for e, p in zip(loop.ema_params[0], loop.model_params))


# --------------------------------------------------------- Improved-Diffusion's fp16 and update methods


def test_setup_fp16_builds_the_loss_scale(tmp_path):
    from guided_diffusion.fp16_util import INITIAL_LOG_LOSS_SCALE

    calls = []
    loop = make_loop(tmp_path, hook_spy(calls), use_fp16=True, fp16_scale_growth=0.25)
    assert calls == ["params", "fp16"] and loop.mp_trainer.scaler is loop.scaler
    assert loop.scaler.get_scale() == 2.0 ** INITIAL_LOG_LOSS_SCALE and loop.scaler.get_growth_interval() == 4
    assert loop.mp_trainer.lg_loss_scale == INITIAL_LOG_LOSS_SCALE
    assert make_loop(tmp_path / "fp32").scaler is None


def improved_run_step(self, batch, cond):
    # Improved-Diffusion's run_step, as a port would keep it
    self.forward_backward(batch, cond)
    if self.use_fp16:
        self.optimize_fp16()
    else:
        self.optimize_normal()
    self.log_step()


def test_optimize_normal_is_the_update_with_its_grad_norm(tmp_path):
    from guided_diffusion import logger

    loop = make_loop(tmp_path, total_steps=1)
    loop.run_step = improved_run_step.__get__(loop)
    before = [p.detach().clone() for p in loop.model_params]
    ema_before = [e.detach().clone() for e in loop.ema_params[0]]
    loop._seed_step(0)
    loop.forward_backward(torch.rand(2, 3, 8, 8) * 2 - 1, {})
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in loop.model_params])).item()
    assert loop.optimize_normal() is True
    assert logger.getkvs()["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert logger.getkvs()["samples"] == 2 and logger.getkvs()["step"] == 0
    moved = [not torch.equal(a, p) for a, p in zip(before, loop.model_params)]
    assert any(moved)
    for e, b, p in zip(loop.ema_params[0], ema_before, loop.model_params):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)
    loop.run_loop()  # and as the loop's step
    assert loop.step == 1


def test_optimize_fp16_skips_overflows_and_shrinks_the_scale(tmp_path):
    loop = make_loop(tmp_path, use_fp16=True, total_steps=3)
    loop.run_step = improved_run_step.__get__(loop)
    loop._seed_step(0)
    loop.forward_backward(torch.rand(2, 3, 8, 8) * 2 - 1, {})
    loop.model_params[0].grad.fill_(float("inf"))  # an overflow, as a too-large loss scale makes
    before = [p.detach().clone() for p in loop.model_params]
    assert loop.optimize_fp16() is False
    assert all(torch.equal(a, p) for a, p in zip(before, loop.model_params))  # skipped
    assert loop.mp_trainer.lg_loss_scale == 19.0  # halved
    loop.run_loop()
    assert loop.step == 3


def test_master_params_state_dict_round_trip(loop):
    sd = loop._master_params_to_state_dict(loop.ema_params[0])
    assert set(sd) == set(loop.model.state_dict())
    names = [n for n, _ in loop.model.named_parameters()]
    assert all(sd[n] is e for n, e in zip(names, loop.ema_params[0]))
    back = loop._state_dict_to_master_params(sd)
    assert all(a is b for a, b in zip(back, loop.ema_params[0]))
    assert len(back) == len(loop.mp_trainer.master_params)


# --------------------------------------------------------------------- nn, dist_util, logger


def test_checkpoint_function_matches_the_plain_gradients():
    from guided_diffusion.nn import CheckpointFunction

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.SiLU(), torch.nn.Linear(6, 3))
    x = torch.randn(5, 4, requires_grad=True)
    frozen = torch.randn(5, 3)  # an input that needs no gradient

    def f(a, b):
        return layer(a) * b

    params = list(layer.parameters())
    out = CheckpointFunction.apply(f, 2, x, frozen, *params)
    out.pow(2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = None
    layer.zero_grad()
    f(x, frozen).pow(2).sum().backward()
    for a, b in zip(ours, [x.grad] + [p.grad for p in params]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the forward kept no graph
        assert CheckpointFunction.apply(f, 2, x, frozen, *params).grad_fn is None
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # recomputed under the forward's autocast
        y = CheckpointFunction.apply(layer, 1, x, *params)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # would fail on a float32 recomputation (dtype of the gradient)
    mixed = x.grad.clone()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    torch.testing.assert_close(mixed, x.grad)
    # dropout: the recomputation draws the forward's masks (the gradient is the plain one)
    drop = torch.nn.Sequential(layer, torch.nn.Dropout(0.5)).train()
    x.grad = None
    torch.manual_seed(3)
    y = CheckpointFunction.apply(drop, 1, x, *params)
    torch.rand(7)  # the global stream moves on before the backward
    y.pow(2).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    y2 = drop(x)
    y2.pow(2).sum().backward()
    assert torch.equal(y, y2)
    torch.testing.assert_close(ours, x.grad)


def test_dist_util_constants():
    from guided_diffusion import dist_util

    assert dist_util.GPUS_PER_NODE == 8 and dist_util.SETUP_RETRY_COUNT == 3


def test_get_rank_without_mpi_import(monkeypatch, tmp_path):
    from guided_diffusion import logger

    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert logger.get_rank_without_mpi_import() == 0
    monkeypatch.setenv("RANK", "5")  # torchrun's, after the MPI launchers'
    assert logger.get_rank_without_mpi_import() == 5
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert logger.get_rank_without_mpi_import() == 3
    monkeypatch.setenv("PMI_RANK", "2")
    assert logger.get_rank_without_mpi_import() == 2  # upstream's order: PMI_RANK first
    # rank 2 of an MPI launch before any process group: configure writes nothing
    logger.configure(dir=str(tmp_path / "rank2"), format_strs=["csv", "log"])
    logger.logkv("a", 1)
    logger.dumpkvs()
    assert not (tmp_path / "rank2").exists()
    monkeypatch.delenv("PMI_RANK")
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK")
    monkeypatch.delenv("RANK")
    logger.configure(dir=str(tmp_path / "rank0"), format_strs=["csv"])
    assert (tmp_path / "rank0").is_dir()


# ---------------------------------------------------------------------------------- datasets


def test_image_dataset_items(tmp_path):
    from guided_diffusion.image_datasets import ImageDataset

    paths = []
    for i in range(5):
        arr = np.zeros((12, 20, 3), dtype=np.uint8)
        arr[:, :10] = 255  # left half white
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    ds = ImageDataset(8, paths, classes=[0, 1, 2, 3, 4], shard=1, num_shards=2, random_flip=False)
    assert len(ds) == 2 and isinstance(ds, torch.utils.data.Dataset)
    x, cond = ds[1]
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x[:, :, 0].min() == 1.0 and x[:, :, -1].max() == -1.0
    assert cond["y"].dtype == np.int64 and int(cond["y"]) == 3  # paths[1::2][1] is image 3
    # flips: random (Python's random, seedable), left-right only
    flip = ImageDataset(8, paths)
    random.seed(0)
    seen = {float(flip[0][0][0, 0, 0]) for _ in range(20)}
    assert seen == {1.0, -1.0} and flip[0][1] == {}
    crop = ImageDataset(8, paths, random_crop=True, random_flip=False)
    assert crop[0][0].shape == (3, 8, 8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 8, 8) and batch[1]["y"].tolist() == [1, 3]


# ------------------------------------------------------------------------------------ logger


def test_scoped_configure_restores_the_previous_logger(tmp_path):
    from guided_diffusion import logger

    logger.configure(dir=str(tmp_path / "outer"), format_strs=["csv", "json"])
    outer = logger.get_current()
    with logger.scoped_configure(dir=str(tmp_path / "inner"), format_strs=["csv"]):
        assert logger.get_dir() == str(tmp_path / "inner")
        logger.logkv("a", 1)
        logger.dumpkvs()
    assert logger.get_current() is outer and logger.get_dir() == str(tmp_path / "outer")
    logger.logkv("b", 2)
    logger.dumpkvs()  # the outer logger's files are still open
    assert (tmp_path / "inner" / "progress.csv").read_text().splitlines() == ["a", "1"]
    assert (tmp_path / "outer" / "progress.csv").read_text().splitlines() == ["b", "2"]
    assert '"b": 2' in (tmp_path / "outer" / "progress.json").read_text()


def test_reset_and_profile(tmp_path):
    from guided_diffusion import logger

    logger.configure(dir=str(tmp_path), format_strs=["csv"])

    @logger.profile("nap")
    def nap(x):
        time.sleep(0.01)
        return x + 1

    assert nap(1) == 2 and nap.__name__ == "nap"
    assert logger.getkvs()["wait_nap"] >= 0.01
    logger.reset()
    assert logger.get_dir() is None and "wait_nap" not in logger.getkvs()


def test_mpi_weighted_mean():
    from guided_diffusion import logger

    class Comm:
        def __init__(self, rank, everything):
            self.rank, self.everything = rank, everything

        def gather(self, mine):
            return self.everything if self.rank == 0 else None

    ranks = [{"a": (1.0, 1), "b": (2.0, 3)}, {"a": (4.0, 2)}]
    assert logger.mpi_weighted_mean(Comm(0, ranks), ranks[0]) == {"a": 3.0, "b": 2.0}
    assert logger.mpi_weighted_mean(Comm(1, ranks), ranks[1]) == {}


def test_adopting_a_parameter_list_of_the_wrong_length_is_refused():
    from guided_diffusion.train_state import adopt_parameters

    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="one tensor per model parameter"):
        adopt_parameters(module, [torch.zeros(2, 2)])
    adopt_parameters(module, [torch.ones(2, 2), torch.ones(2)])
    assert float(module.weight.detach().sum()) == 4.0
