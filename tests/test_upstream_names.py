"""
Upstream's public names, for users porting guided-diffusion / improved-diffusion code: every
name this project claims to provide imports from the module upstream has it in, and the ones
added for porting behave as upstream documents (fp16_util, TrainLoop's hooks and ``mp_trainer``,
``ImageDataset``, the logger's ``scoped_configure``/``reset``/``profile``).

Upstream names this project does not provide (reported, not listed below):
``dist_util.GPUS_PER_NODE`` / ``SETUP_RETRY_COUNT`` (process setup is torch.distributed's here),
``nn.CheckpointFunction`` (``checkpoint`` is torch.utils.checkpoint), TrainLoop's ``_load_and_sync_parameters`` /
``_load_ema_parameters`` / ``_load_optimizer_state`` (resume happens in ``__init__``),
improved-diffusion's ``TrainLoop._master_params_to_state_dict`` / ``optimize_fp16`` (use
``mp_trainer``).
"""
import importlib
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

GUIDED = {
    "dist_util": ["setup_dist", "dev", "load_state_dict", "sync_params"],
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
    ],
    "losses": ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"],
    "nn": [
        "SiLU", "GroupNorm32", "conv_nd", "linear", "avg_pool_nd", "update_ema", "zero_module", "scale_module",
        "mean_flat", "normalization", "timestep_embedding", "checkpoint",
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


@pytest.mark.parametrize("package, table", [("guided_diffusion", GUIDED), ("improved_diffusion", IMPROVED)])
def test_upstream_names_exist(package, table):
    missing = []
    for module, names in table.items():
        mod = importlib.import_module(f"{package}.{module}")
        missing += [f"{package}.{module}.{n}" for n in names if not hasattr(mod, n)]
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


@pytest.fixture
def loop(tmp_path):
    from guided_diffusion import logger
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from guided_diffusion.train_util import TrainLoop

    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    args = model_and_diffusion_defaults()
    args.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
                learn_sigma=False, diffusion_steps=50, dropout=0.0)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args)

    def data():
        while True:
            yield torch.rand(2, 3, 8, 8) * 2 - 1, {}

    return TrainLoop(model=model, diffusion=diffusion, data=data(), batch_size=2, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=1, save_interval=0, log_dir=str(tmp_path), total_steps=2)


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
