"""Every analysis script and fid_curve.py takes a checkpoint as the sample scripts do: ``--model_path``,
or ``--run_dir`` with ``--step`` / ``--ema_rate`` / ``--use_ema`` (resolved by sample_util.resolve_checkpoint,
a DCGAN run's ``generator_NNNNNN.pt`` besides); the older spellings (``--ckpt``, ``--models``, ``--a/--b``,
fid_curve's positional RUN_DIR) are aliases that give the same files. Here only the flags are parsed and
resolved, on run folders of empty files; tests/test_analysis_scripts.py runs the scripts on real ones."""
import importlib.util
from pathlib import Path

import pytest

from guided_diffusion.checkpoint import checkpoint_file_step, weight_files
from guided_diffusion.sample_util import resolve_checkpoint, sample_defaults

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(Path(name).stem, SCRIPTS / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(f"{name}.py")
            for name in ("hessian_spectrum", "structure_timesteps", "consistency", "loss_landscape", "fid_curve")}


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


@pytest.fixture
def run(tmp_path):
    """A diffusion run: raw models at steps 100 and 200, EMA 0.9999 at both, EMA 0.999 only at 200."""
    d = tmp_path / "run"
    _touch(d, "model000100.pt", "model000200.pt", "ema_0.9999_000100.pt", "ema_0.9999_000200.pt",
           "ema_0.999_000200.pt", "opt000200.pt")
    (d / "config.yaml").write_text('ema_rate: "0.9999,0.999"\n')
    return d


@pytest.fixture
def run2(tmp_path):
    d = tmp_path / "run2"
    _touch(d, "model000100.pt", "model000200.pt", "ema_0.9999_000100.pt", "ema_0.9999_000200.pt")
    (d / "config.yaml").write_text('ema_rate: "0.9999"\n')
    return d


@pytest.fixture
def gan_run(tmp_path):
    d = tmp_path / "gan"
    _touch(d, "generator_000010.pt", "discriminator_000010.pt", "generator_000020.pt", "discriminator_000020.pt")
    (d / "gan_config.yaml").write_text("nz: 8\n")
    return d


def resolve(scripts, name, argv):
    """The checkpoint file(s) a script's flags name, as its main() resolves them."""
    mod = scripts[name]
    args = mod.create_argparser().parse_args(argv)
    return mod.resolve_checkpoints(args) if hasattr(mod, "resolve_checkpoints") else [mod.resolve_checkpoint(args)]


SINGLE = ["hessian_spectrum", "structure_timesteps"]


@pytest.mark.parametrize("name", SINGLE)
def test_single_checkpoint_scripts_ckpt_is_model_path(scripts, run, name):
    f = str(run / "ema_0.9999_000100.pt")
    assert resolve(scripts, name, ["--ckpt", f]) == resolve(scripts, name, ["--model_path", f]) == [f]
    with pytest.raises(FileNotFoundError, match="--model_path: checkpoint not found: .*nope.pt"):
        resolve(scripts, name, ["--ckpt", str(run / "nope.pt")])


@pytest.mark.parametrize("name", SINGLE)
@pytest.mark.parametrize("flags, expected", [
    ([], "ema_0.9999_000200.pt"),  # the newest step, the run's first EMA rate
    (["--step", "100"], "ema_0.9999_000100.pt"),
    (["--ema_rate", "0.999"], "ema_0.999_000200.pt"),
    (["--ema_rate", "0.99990"], "ema_0.9999_000200.pt"),  # spelled differently from the file name
    (["--use_ema", "False", "--step", "100"], "model000100.pt"),
    (["--use_ema", "False"], "model000200.pt"),
])
def test_single_checkpoint_scripts_run_dir(scripts, run, name, flags, expected):
    got = resolve(scripts, name, ["--run_dir", str(run), *flags])
    assert got == [str(run / expected)]
    # exactly the sample scripts' rule
    args = scripts[name].create_argparser().parse_args(["--run_dir", str(run), *flags])
    step = int(args.step) if args.step else -1
    assert got[0] == resolve_checkpoint("", args.run_dir, step, args.ema_rate, args.use_ema)


@pytest.mark.parametrize("name", SINGLE)
def test_single_checkpoint_scripts_errors_name_the_flag_and_what_exists(scripts, run, name):
    with pytest.raises(FileNotFoundError, match=r"--step 150: .*steps with an EMA checkpoint: 100, 200"):
        resolve(scripts, name, ["--run_dir", str(run), "--step", "150"])
    with pytest.raises(FileNotFoundError, match=r"--step 150: .*steps with a model file: 100, 200"):
        resolve(scripts, name, ["--run_dir", str(run), "--step", "150", "--use_ema", "False"])
    with pytest.raises(FileNotFoundError, match=r"--ema_rate 0.5: .*the run's EMA rates: 0.9999, 0.999"):
        resolve(scripts, name, ["--run_dir", str(run), "--ema_rate", "0.5"])
    with pytest.raises(FileNotFoundError, match=r"--ema_rate 0.999: .*\(at step 100: 0.9999\)"):
        resolve(scripts, name, ["--run_dir", str(run), "--step", "100", "--ema_rate", "0.999"])
    with pytest.raises(ValueError, match="either --model_path or --run_dir, not both"):
        resolve(scripts, name, ["--ckpt", str(run / "model000100.pt"), "--run_dir", str(run)])
    with pytest.raises(ValueError, match="--model_path .* or --run_dir .* is required"):
        resolve(scripts, name, [])
    with pytest.raises(ValueError, match="--step: one step"):
        resolve(scripts, name, ["--run_dir", str(run), "--step", "100,200"])
    with pytest.raises(ValueError, match="--step: expected a training step"):
        resolve(scripts, name, ["--run_dir", str(run), "--step", "last"])


def test_hessian_run_dir_of_a_gan_run_gives_its_generator(scripts, gan_run):
    assert resolve(scripts, "hessian_spectrum", ["--run_dir", str(gan_run)]) == [str(gan_run / "generator_000020.pt")]
    assert resolve(scripts, "hessian_spectrum", ["--run_dir", str(gan_run), "--step", "10"]) == \
        [str(gan_run / "generator_000010.pt")]
    with pytest.raises(FileNotFoundError, match=r"--step 15: generator_000015.pt not found; steps with a generator "
                                                r"file: 10, 20"):
        resolve(scripts, "hessian_spectrum", ["--run_dir", str(gan_run), "--step", "15"])
    with pytest.raises(ValueError, match="--ema_rate 0.9999: .* is a DCGAN run"):
        resolve(scripts, "hessian_spectrum", ["--run_dir", str(gan_run), "--ema_rate", "0.9999"])


def test_loss_landscape_spellings(scripts, run, gan_run):
    a, b = str(run / "model000100.pt"), str(run / "model000200.pt")
    old = resolve(scripts, "loss_landscape", ["--a", a, "--b", b])
    assert old == resolve(scripts, "loss_landscape", ["--model_path", a, b]) == [a, b]
    assert resolve(scripts, "loss_landscape", ["--run_dir", str(run), "--step", "100,200", "--use_ema", "False"]) \
        == [a, b]
    assert resolve(scripts, "loss_landscape", ["--run_dir", str(run), "--step", "100,200"]) == \
        [str(run / "ema_0.9999_000100.pt"), str(run / "ema_0.9999_000200.pt")]
    assert resolve(scripts, "loss_landscape", ["--run_dir", str(gan_run), "--step", "10,20"]) == \
        [str(gan_run / "generator_000010.pt"), str(gan_run / "generator_000020.pt")]
    # messages name the flags the user gave
    args = scripts["loss_landscape"].create_argparser().parse_args(["--a", a, "--b", b])
    scripts["loss_landscape"].resolve_checkpoints(args)
    assert args.labels == ("--a", "--b")


def test_loss_landscape_errors(scripts, run, tmp_path):
    a, b = str(run / "model000100.pt"), str(run / "model000200.pt")
    with pytest.raises(ValueError, match="--a and --b go together"):
        resolve(scripts, "loss_landscape", ["--a", a])
    with pytest.raises(ValueError, match="--a/--b .* not both"):
        resolve(scripts, "loss_landscape", ["--a", a, "--b", b, "--model_path", a, b])
    with pytest.raises(FileNotFoundError, match="--b: checkpoint not found"):
        resolve(scripts, "loss_landscape", ["--a", a, "--b", str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match=r"expected 2 checkpoints \(--model_path A B, or --run_dir DIR --step A,B\), "
                                         "got 1"):
        resolve(scripts, "loss_landscape", ["--run_dir", str(run), "--step", "100"])
    with pytest.raises(ValueError, match="expected 2 checkpoints .* got 3"):
        resolve(scripts, "loss_landscape", ["--model_path", a, b, a])
    with pytest.raises(FileNotFoundError, match=r"--step 300: .*steps with a model file: 100, 200"):
        resolve(scripts, "loss_landscape", ["--run_dir", str(run), "--step", "100,300", "--use_ema", "False"])


def test_consistency_spellings(scripts, run, run2):
    files = [str(run / "ema_0.9999_000200.pt"), str(run2 / "ema_0.9999_000200.pt")]
    assert resolve(scripts, "consistency", ["--models", *files]) == \
        resolve(scripts, "consistency", ["--model_path", *files]) == files
    assert resolve(scripts, "consistency", ["--run_dir", str(run), str(run2)]) == files
    assert resolve(scripts, "consistency", ["--run_dir", str(run), str(run2), "--step", "100", "--ema_rate",
                                            "0.9999"]) == [str(run / "ema_0.9999_000100.pt"),
                                                           str(run2 / "ema_0.9999_000100.pt")]
    assert resolve(scripts, "consistency", ["--run_dir", str(run), str(run2), "--step", "100,200", "--use_ema",
                                            "False"]) == [str(run / "model000100.pt"), str(run2 / "model000200.pt")]
    assert resolve(scripts, "consistency", ["--run_dir", str(run), "--step", "100,200"]) == \
        [str(run / "ema_0.9999_000100.pt"), str(run / "ema_0.9999_000200.pt")]
    with pytest.raises(ValueError, match="--step 100,200,300: 3 steps for 2 --run_dir folders"):
        resolve(scripts, "consistency", ["--run_dir", str(run), str(run2), "--step", "100,200,300"])
    with pytest.raises(FileNotFoundError, match=r"--ema_rate 0.999: .*the run's EMA rates: 0.9999\b"):
        resolve(scripts, "consistency", ["--run_dir", str(run), str(run2), "--ema_rate", "0.999"])


def test_consistency_needs_two_checkpoints(scripts, run):
    with pytest.raises(ValueError, match="--model_path: need at least two checkpoints"):
        scripts["consistency"].main(["--run_dir", str(run)])


def test_fid_curve_run_dir_flag(scripts, run, tmp_path):
    parse = scripts["fid_curve"].parse_args
    assert parse([str(run), "--ref", "x"]).run_dir == parse(["--run_dir", str(run), "--ref", "x"]).run_dir == str(run)
    assert parse(["--ref", "x", str(run)]).run_dir == str(run)
    assert parse([str(run), "--run_dir", str(run) + "/"]).run_dir  # the same folder twice is fine
    with pytest.raises(ValueError, match="RUN_DIR .* and --run_dir .* differ"):
        parse([str(run), "--run_dir", str(tmp_path / "other")])
    with pytest.raises(ValueError, match=r"RUN_DIR \(or --run_dir DIR\) is required"):
        parse(["--ref", "x"])
    with pytest.raises(FileNotFoundError, match="RUN_DIR: folder not found"):
        scripts["fid_curve"].main(["--run_dir", str(tmp_path / "missing"), "--ref", "x"])


def test_image_nll_takes_the_sample_scripts_flags():
    """image_nll.py starts like the sample scripts (sample_util.start_sampling): the same checkpoint flags."""
    flags = {"model_path", "run_dir", "step", "ema_rate", "use_ema"}
    assert flags <= set(sample_defaults())
    nll = load_script("image_nll.py").create_argparser_defaults()
    assert {k: nll[k] for k in flags} == {k: sample_defaults()[k] for k in flags}


def test_checkpoint_step_is_the_checkpoint_modules_rule():
    # one rule for the step in a file name (checkpoint.checkpoint_file_step); checkpoint_step, kept by
    # model_loading and sample_util for earlier callers, is its weights-only form
    from guided_diffusion import model_loading, sample_util
    from guided_diffusion.checkpoint import checkpoint_file_step

    assert sample_util.checkpoint_step is model_loading.checkpoint_step
    names = {"model000012.pt": 12, "ema_0.9999_000012.pt": 12, "ema_1e-3_000007.pt": 7, "opt000012.pt": None,
             "state000012.pt": None, "model12.pt.tmp": None, "progress.csv": None, "/run/model000003.pt": 3}
    for name, step in names.items():
        assert model_loading.checkpoint_step(name) == step, name
        assert checkpoint_file_step(name, weights_only=True) == step, name
    assert checkpoint_file_step("opt000012.pt") == 12 and checkpoint_file_step("state000012.pt") == 12
    assert checkpoint_file_step("model000012.pt") == 12 and checkpoint_file_step("notes.txt") is None


def test_weight_files_reads_model_and_ema_names_with_the_checkpoint_rules():
    names = ["model000400.pt", "model000100.pt", "opt000400.pt", "state000400.pt", "ema_0.9999_000400.pt",
             "ema_0.9999_000100.pt", "ema_0.995_000400.pt", "config.yaml", "model000400.pt.tmp", "log.txt"]
    steps, ema = weight_files(names)
    assert steps == [100, 400]
    assert ema == {"0.995": [400], "0.9999": [100, 400]}
    # the same rules as the step parser: every name it lists has the step it reads
    assert all(checkpoint_file_step(n, weights_only=True) == int(n[-9:-3]) for n in names
               if n.startswith(("model", "ema_")) and n.endswith(".pt"))
    assert weight_files([]) == ([], {})
