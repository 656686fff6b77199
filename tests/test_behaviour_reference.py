"""
Behaviour reference: a tiny CPU run (CLTS + MDLRC + min-SNR, two EMA rates, a ``--stop_at`` in the
middle resumed with ``--resume auto`` to the end, then ``image_sample.py`` and ``fid_curve.py``)
must give the same numbers as the recorded run in ``tests/fixtures/behaviour_reference/``.

The fixture was recorded before the training loop was reshaped (issue 21), so this test is what
proves a refactor changed no behaviour. On the recording machine (``machine_matches``: every
fingerprint key the fixture records -- CPU vector ISA and torch version, in newer recordings also
the CPU model, BLAS, numpy and scipy -- is the same) the checkpoint tensors, progress rows and
samples must be byte-identical. Elsewhere kernels sum in another order, and the comparison uses
tolerances that reordering cannot exceed but a behaviour change cannot stay inside:

- progress.csv numbers to relative ``ROWS_RTOL`` = 1e-4. They are float32 reductions that
  reordering moves by ~1e-7 (measured: AVX512 recording vs an AVX2 EPYC); a behaviour change moves
  them by 1e-3 or more (a 1 % higher lr: loss 1e-3; min-SNR gamma 4.5: loss 6e-3), and the lr and
  beta1 columns are exact Python arithmetic.
- fid_curve.csv to relative ``FID_RTOL`` = 1e-3: FID/KID of 4 uint8 samples move by ~1e-7 with
  identical samples, by ~1e-4 when a few pixels round to the neighbouring level.
- samples: identical bytes, or a mean within ``SAMPLE_MEAN_ATOL`` = 0.02 levels (15 one-level flips
  of the 768 values; reordering shifts the float image by ~1e-6 of a level, so a flip needs a value
  that close to a rounding boundary).
- model/EMA tensor norms (only norms are recorded) within ``NORM_RTOL`` = 1e-7 of the norm (float32
  resolution) plus a share of Adam's reach R = sqrt(n) * sum of the lr's of the steps taken: Adam
  moves an element by about lr per step, so R is how far the tensor can be from its init. An
  absolute gradient error d changes an Adam step by lr * d / (sqrt(v) + eps) <= lr * d / eps;
  rounding leaves d ~ 1e-10 at most here, so ordinary tensors differ by ~1e-6 R (measured <= 3e-6 R)
  and are held to ``WEIGHT_RHO`` = 1e-4 R, while one step of a changed MDLRC beta1 moves them by
  1e-3..1e-2 R. The exception are tensors whose gradient is *only* rounding noise (a bias right
  before a GroupNorm that cancels it exactly, e.g. ``output_blocks.3.0.out_layers.3.bias``; they
  cannot change the loss or the samples): Adam turns that noise into steps of any direction, so they
  are only held to ``ROUNDING_REACH`` = 4 R (|m|/sqrt(v) <= ~1.5 over these steps, twice for the
  two runs). "Rounding-driven" is read from the optimizer state of either run: the RMS of the Adam
  first moment at some saved step <= k is above 0 but below ``ROUNDING_LEVEL`` = 1e-6 of the
  model's RMS first moment (they sit at <= 2e-7, real gradients at >= 1e-5; exact zeros are exact).
- optimizer moments within ``NORM_RTOL`` of the norm plus ``MOMENT_RHO`` = 1e-6 of the file's
  global norm of that moment: rounding errors of a float32 backward pass are absolute, a few ulps
  of the gradient's scale (measured <= 1.1e-8); a behaviour change moves them by 1e-4 or more.
- integer tensors, RNG states, step counts and every non-tensor value (config, lr, beta1, data
  position): exact. A flag newer than the reference must be at its default; another state field
  the reference does not have (newer bookkeeping) is not compared.

``test_a_changed_training_default_fails_the_tolerant_comparison`` and
``test_one_step_of_drift_fails_the_tolerant_comparison`` prove the other direction.

The run happens in one fresh subprocess with one thread (thread count and global state of the
test process must not leak into the numbers). Re-record after an *intended* change with

    OMP_NUM_THREADS=1 python tests/test_behaviour_reference.py record
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "behaviour_reference" / "reference.json"

# progress.csv / fid_curve.csv columns that measure wall-clock time or memory, not behaviour
TIMING_COLUMNS = {"time", "time_elapsed", "it_per_s", "img_per_s", "gpu_hours", "time_remaining_s",
                  "peak_mem_gib", "peak_mem", "walltime", "seconds"}
# state-file entries that measure wall-clock time
TIMING_KEYS = {"gpu_hours"}

TRAIN_FLAGS = [
    "--data_dir", "synthetic", "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
    "--channel_mult", "1,2", "--attention_resolutions", "4", "--num_heads", "2", "--dropout", "0.1",
    "--learn_sigma", "True", "--diffusion_steps", "40", "--noise_schedule", "linear",
    "--rescale_learned_sigmas", "True", "--use_scale_shift_norm", "True",
    "--batch_size", "4", "--lr", "1e-3", "--ema_rate", "0.9,0.99",
    # sigma 1.0: the CLTS default when the reference was recorded (0.1 since 2026-12-03), pinned so
    # the fixture keeps proving that refactors change nothing
    "--schedule_sampler", "clts", "--clts_std", "1.0", "--clts_target_steps", "5",
    "--momentum_decay", "True", "--lr_compensation", "True", "--beta1_min", "0.5",
    "--loss_weighting", "min_snr", "--total_steps", "5", "--save_interval", "2", "--log_interval", "1",
    "--precision", "fp32", "--seed", "3",
]


# ------------------------------------------------------------------ the run (in the subprocess)


def _run_commands(work: Path, extra: Sequence[str] = ()) -> None:
    """The reference commands, as a user would type them (scripts' ``main``); ``extra`` flags are
    appended to both training commands (the last occurrence of a flag wins)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import fid_curve
    import image_sample
    import image_train
    import numpy as np

    from guided_diffusion.image_datasets import synthetic_images

    run = work / "run"
    image_train.main(TRAIN_FLAGS + list(extra) + ["--log_dir", str(run), "--stop_at", "3"])
    image_train.main(TRAIN_FLAGS + list(extra) + ["--log_dir", str(run), "--resume", "auto"])
    image_sample.main(["--run_dir", str(run), "--num_samples", "4", "--batch_size", "4", "--use_ddim", "True",
                       "--timestep_respacing", "ddim5", "--out_dir", str(work / "samples"), "--progress", "False"])
    ref = work / "ref.npz"
    np.savez(ref, synthetic_images(4, 8, seed=1)[0])
    try:
        from evaluations.evaluator import get_extractor

        get_extractor("offline", device="cpu")
    except Exception:  # noqa: BLE001 - no offline Inception: the curve is not part of this run
        return
    fid_curve.main([str(run), "--ref", str(ref), "--steps", "5", "--num_samples", "4", "--batch_size", "4",
                    "--timestep_respacing", "ddim3", "--extractor", "offline", "--metrics", "fid,kid",
                    "--cache_dir", str(work / "cache"), "--progress", "False"])


def _leaves(obj: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """(dotted key, leaf) for every leaf of nested dicts/lists/tuples, in a stable order."""
    if isinstance(obj, dict):
        out = []
        for k in sorted(obj, key=str):
            out += _leaves(obj[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)) and not (len(obj) > 8 and all(isinstance(v, (int, float)) for v in obj)):
        out = []  # (a long run of numbers, e.g. Python's RNG state, is one leaf)
        for i, v in enumerate(obj):
            out += _leaves(v, f"{prefix}[{i}]")
        return out
    return [(prefix, obj)]


def _kind(name: str) -> str:
    """The file kind whose tensors share one layout: model, ema_<rate>, opt or state."""
    return re.sub(r"_?\d+\.pt$", "", name)


def _summarize_pt(path: Path) -> Dict[str, Any]:
    """Per tensor (sorted keys): a sha256 of its raw bytes and, for floats, its norm; the other leaves
    in clear (long ones, RNG states, hashed); ``layout`` = (key, dtype, shape) per tensor."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    layout, shas, norms, values = [], [], [], {}
    for key, leaf in _leaves(obj):
        if key.split(".")[0] in TIMING_KEYS or key.endswith("log_dir"):
            continue  # wall-clock hours; the folder differs between the recording and the test
        if torch.is_tensor(leaf):
            t = leaf.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            layout.append([key, str(t.dtype).replace("torch.", ""), list(t.shape)])
            shas.append(hashlib.sha256(raw).hexdigest()[:16])
            norms.append(float(f"{float(t.double().norm()):.10g}") if t.is_floating_point() and t.numel() else None)
        else:
            text = repr(leaf)
            values[key] = text if len(text) <= 80 else "sha:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return {"layout": layout, "sha": shas, "norm": norms, "values": values}


def _pack(checkpoints: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Store each kind's layout once (it is the same at every step)."""
    layouts: Dict[str, Any] = {}
    files = {}
    for name, c in checkpoints.items():
        layouts.setdefault(_kind(name), c["layout"])
        same = layouts[_kind(name)] == c["layout"]
        files[name] = {k: v for k, v in c.items() if k != "layout" or not same}
    return {"layouts": layouts, "files": files}


def _unpack(packed: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {name: dict(c, layout=c.get("layout", packed["layouts"][_kind(name)])) for name, c in packed["files"].items()}


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


def _fingerprint() -> Dict[str, Any]:
    """What decides the bytes a run gives: torch and its kernels for this CPU (vector ISA, CPU model,
    BLAS), numpy and scipy (FID)."""
    import platform

    import numpy as np
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    blas = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:
        scipy_version = None
    return {"torch_version": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": model, "blas": blas.group(1) if blas else None, "numpy_version": np.__version__,
            "scipy_version": scipy_version}


def summarize(work: Path) -> Dict[str, Any]:
    """Everything the reference compares, from a finished run in ``work``."""
    import numpy as np
    import torch

    run = work / "run"
    out: Dict[str, Any] = dict(
        _fingerprint(),
        progress=_rows(run / "progress.csv"),
        checkpoints=_pack({p.name: _summarize_pt(p) for p in sorted(run.glob("*.pt"))}),
        # the model's parameter names in optimizer order (opt files number them)
        param_order=list(torch.load(sorted(run.glob("model*.pt"))[0], map_location="cpu", weights_only=True)),
    )
    npz = sorted((work / "samples").glob("*.npz"))
    with np.load(npz[0]) as f:
        arrays = {k: f[k] for k in f.files}
    out["samples"] = {k: {"sha": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:20],
                          "shape": list(v.shape), "dtype": str(v.dtype), "mean": float(np.asarray(v, np.float64).mean())}
                      for k, v in arrays.items()}
    curve = run / "fid_curve.csv"
    out["fid_curve"] = _rows(curve) if curve.exists() else None
    return out


def run_reference(work: Path, extra: Sequence[str] = ()) -> Dict[str, Any]:
    """Run the reference commands (plus ``extra`` training flags) in a fresh single-threaded
    subprocess and summarize them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OPENAI_LOGDIR"):
        env.pop(v, None)
    proc = subprocess.run([sys.executable, __file__, "summarize", str(work), *extra], env=env, cwd=str(work),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"the reference run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads((work / "summary.json").read_text())


# ------------------------------------------------------------------ the comparison

# Tolerances of the comparison on another machine (the module docstring gives the reasons)
ROWS_RTOL = 1e-4          # progress.csv numbers
FID_RTOL = 1e-3           # fid_curve.csv numbers (FID/KID of 4 uint8 samples)
SAMPLE_MEAN_ATOL = 0.02   # mean of the uint8 samples, in intensity levels (15 one-level flips of 768)
WEIGHT_RHO = 1e-4         # model/EMA tensors: share of Adam's reach sqrt(n) * sum(lr)
ROUNDING_REACH = 4.0      # rounding-driven tensors: anywhere within 4 x Adam's reach
ROUNDING_LEVEL = 1e-6     # a tensor's RMS first moment below this share of the model's: rounding noise
MOMENT_RHO = 1e-6         # optimizer moments: share of the file's global norm of that moment
NORM_RTOL = 1e-7          # float32 resolution of a norm (one ulp on every element)
# what must match for the exact comparison: the CPU's vector ISA, torch (kernels), the CPU model and
# BLAS (kernel choice), numpy/scipy (FID); only the keys the reference records are asked for
FINGERPRINT = ("cpu_capability", "torch_version", "cpu_model", "blas", "numpy_version", "scipy_version")


def machine_matches(got: Dict[str, Any], ref: Dict[str, Any]) -> bool:
    """True when every fingerprint key the reference records (at least the CPU capability and the
    torch version) is the same in ``got``: the bytes must then be identical."""
    keys = [k for k in FINGERPRINT if k in ref]
    if not {"cpu_capability", "torch_version"} <= set(keys):
        return False
    return all(got.get(k) == ref[k] for k in keys)


def _close(a: Any, b: Any, rtol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return abs(x - y) <= rtol * max(abs(x), abs(y)) + 1e-12


def _step_of(name: str) -> int:
    return int(re.search(r"(\d+)\.pt$", name).group(1))


def _lr_sum(summary: Dict[str, Any], step: int) -> float:
    """The sum of the learning rates of the optimizer steps 0..step-1 (progress.csv's lr column)."""
    return sum(float(row["lr"]) for row in summary["progress"] if int(row["step"]) < step)


def _rounding_driven(summary: Dict[str, Any], order: List[str]) -> Dict[int, set]:
    """step k -> the parameters whose gradient was rounding noise at some saved step <= k: RMS of the
    Adam first moment above 0 but below ROUNDING_LEVEL x the model's RMS first moment (``order``: the
    model's parameter names in optimizer order)."""
    files = _unpack(summary["checkpoints"])
    sizes = {key: math.prod(shape) for key, _, shape in summary["checkpoints"]["layouts"].get("model", [])}
    found: Dict[int, set] = {}
    for name in sorted((n for n in files if _kind(n) == "opt"), key=_step_of):
        c = files[name]
        m = {key: (norm, math.prod(shape)) for (key, _, shape), norm in zip(c["layout"], c["norm"])
             if key.endswith(".exp_avg")}
        if [m.get(f"state.{i}.exp_avg", (0, -1))[1] for i in range(len(order))] != [sizes.get(k) for k in order]:
            return {}  # not the optimizer order of these parameters: classify nothing (all held tightly)
        total = math.sqrt(sum(v[0] ** 2 for v in m.values())) / math.sqrt(sum(v[1] for v in m.values()))
        noisy = {order[i] for i in range(len(order))
                 if 0.0 < m[f"state.{i}.exp_avg"][0] / math.sqrt(m[f"state.{i}.exp_avg"][1]) < ROUNDING_LEVEL * total}
        found[_step_of(name)] = noisy | set().union(*found.values())
    return found


def _config_defaults() -> Dict[str, str]:
    """``config.<flag>`` -> repr of the flag's current default (what a state file stores)."""
    from guided_diffusion.training import create_argparser_defaults

    return {f"config.{k}": repr(v) for k, v in create_argparser_defaults().items()}


def compare(got: Dict[str, Any], ref: Dict[str, Any], exact: Optional[bool] = None) -> List[str]:
    """
    Differences between two summaries (empty: the same behaviour). ``exact``: bytes and progress
    rows identical (default: when the machines match, ``machine_matches``), else the tolerances of
    the module docstring.
    """
    if exact is None:
        exact = machine_matches(got, ref)
    problems: List[str] = []

    def rows(name: str, a: List[Dict[str, str]], b: List[Dict[str, str]], rtol: float) -> None:
        if a is None or b is None:
            return  # fid_curve: no offline Inception on one side
        if len(a) != len(b):
            problems.append(f"{name}: {len(a)} rows, reference {len(b)}")
            return
        for i, (ra, rb) in enumerate(zip(a, b)):
            if set(ra) != set(rb):
                problems.append(f"{name} row {i}: columns {sorted(set(ra) ^ set(rb))} differ")
            for k in sorted(set(ra) & set(rb)):
                same = ra[k] == rb[k] if exact else _close(ra[k], rb[k], rtol)
                if not same:
                    problems.append(f"{name} row {i} {k}: {ra[k]!r} != reference {rb[k]!r}")

    rows("progress.csv", got["progress"], ref["progress"], ROWS_RTOL)
    rows("fid_curve.csv", got["fid_curve"], ref["fid_curve"], FID_RTOL)
    gc, rc = _unpack(got["checkpoints"]), _unpack(ref["checkpoints"])
    if set(gc) != set(rc):
        problems.append(f"checkpoint files {sorted(gc)} != reference {sorted(rc)}")
    order = got.get("param_order") or ref.get("param_order") or []
    rounding: Dict[int, set] = {}
    if not exact and order:
        a, b = _rounding_driven(got, order), _rounding_driven(ref, order)
        rounding = {k: a.get(k, set()) | b.get(k, set()) for k in set(a) | set(b)}
    defaults: Optional[Dict[str, str]] = None
    for name in sorted(set(gc) & set(rc)):
        g, r = gc[name], rc[name]
        diff = sorted(k for k in set(g["values"]) | set(r["values"]) if g["values"].get(k) != r["values"].get(k))
        if any(k not in r["values"] for k in diff):
            # newer than the reference: a flag is fine at its default (the same run), another state
            # field (new bookkeeping) is not the reference's to judge
            defaults = _config_defaults() if defaults is None else defaults
            diff = [k for k in diff
                    if k in r["values"] or (k.startswith("config.") and g["values"][k] != defaults.get(k))]
        if diff:
            problems.append(f"{name}: values {diff[:5]} differ")
        if g["layout"] != r["layout"]:
            problems.append(f"{name}: tensor keys, dtypes or shapes differ")
            continue
        kind, step = _kind(name), _step_of(name)
        if kind == "opt":  # the global norm of each moment in this file
            scale = {m: math.sqrt(sum(n ** 2 for (key, _, _), n in zip(r["layout"], r["norm"]) if key.endswith(m)))
                     for m in (".exp_avg", ".exp_avg_sq")}
        for (key, _, shape), gs, rs, gn, rn in zip(r["layout"], g["sha"], r["sha"], g["norm"], r["norm"]):
            if exact or rn is None or key.endswith(".step"):  # integers, RNG states, step counts: exact
                if gs != rs:
                    problems.append(f"{name} {key}: bytes differ")
                continue
            if kind == "opt":
                moment = ".exp_avg_sq" if key.endswith(".exp_avg_sq") else ".exp_avg"
                tol = NORM_RTOL * rn + MOMENT_RHO * scale[moment]
            elif kind == "model" or kind.startswith("ema_"):
                reach = math.sqrt(math.prod(shape)) * _lr_sum(ref, step)
                rho = ROUNDING_REACH if key in rounding.get(step, ()) else WEIGHT_RHO
                tol = NORM_RTOL * rn + rho * reach
            else:
                tol = NORM_RTOL * rn
            if not abs(gn - rn) <= tol:
                problems.append(f"{name} {key}: norm {gn} vs reference {rn} (tolerance {tol:.3g})")
    for k in sorted(set(got["samples"]) | set(ref["samples"])):
        a, b = got["samples"].get(k), ref["samples"].get(k)
        if a is None or b is None or (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
            problems.append(f"samples {k}: {a} != reference {b}")
        elif exact and a["sha"] != b["sha"]:
            problems.append(f"samples {k}: bytes differ")
        elif not exact and a["sha"] != b["sha"] and abs(a["mean"] - b["mean"]) > SAMPLE_MEAN_ATOL:
            problems.append(f"samples {k}: mean {a['mean']} vs {b['mean']}")
    return problems


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def reference() -> Dict[str, Any]:
    if not FIXTURE.exists():
        pytest.skip(f"no reference recorded at {FIXTURE}")
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def this_run(reference, tmp_path_factory) -> Dict[str, Any]:
    """The reference commands run once on this machine (shared by the tests of this module)."""
    return run_reference(tmp_path_factory.mktemp("behaviour_reference"))


def test_behaviour_matches_the_reference(reference, this_run):
    problems = compare(this_run, reference)
    assert not problems, "behaviour changed:\n" + "\n".join(problems[:40])
    # the tolerant comparison holds as well, whichever machine this is
    problems = compare(this_run, reference, exact=False)
    assert not problems, "behaviour changed (tolerant comparison):\n" + "\n".join(problems[:40])
    if machine_matches(this_run, reference):
        assert this_run["progress"] == reference["progress"] and this_run["samples"] == reference["samples"]


def test_a_changed_training_default_fails_the_tolerant_comparison(reference, this_run, tmp_path):
    """--beta1_min 0.7 instead of 0.5: MDLRC's beta1 (0.9 -> 0.64 over these 5 steps) is floored at
    0.7 in the last step only, so steps 1-4 are the same and the step-5 weights differ by about a
    hundredth of an update; the tolerant comparison must say so in the numbers themselves, not only
    in the recorded flag."""
    changed = run_reference(tmp_path, ["--beta1_min", "0.7"])
    problems = compare(changed, reference, exact=False)
    numeric = [p for p in problems if "values" not in p]
    assert any(p.startswith("model000005.pt") and ": norm " in p for p in numeric), problems
    assert any(p.startswith("opt000005.pt") and ": norm " in p for p in numeric), problems
    assert any("progress.csv row 4 lr" in p for p in numeric), problems
    # steps 1-4 are the same run: the tolerant comparison finds nothing there
    assert not [p for p in numeric if re.match(r"(model|ema_[\d.]+_|opt)00000[234]\.pt", p)], problems
    # and this machine's unchanged run, compared the same way, is clean (the noise floor)
    assert compare(this_run, reference, exact=False) == []


def test_one_step_of_drift_fails_the_tolerant_comparison(reference, this_run):
    """What a behaviour change looks like in the numbers, without another run: every tensor one
    optimizer step ahead (step k's norms replaced by step k+1's), or a loss off by 1e-3 (the size a
    1 % learning-rate change makes)."""
    ahead = json.loads(json.dumps(this_run))
    files = ahead["checkpoints"]["files"]
    for name in sorted(files, key=_step_of):
        nxt = re.sub(r"\d+(\.pt)$", lambda m: f"{_step_of(name) + 1:06d}{m.group(1)}", name)
        if nxt in files:
            files[name]["norm"] = list(this_run["checkpoints"]["files"][nxt]["norm"])
    problems = compare(ahead, reference, exact=False)
    for kind in ("model", "ema_0.9_", "opt"):
        hits = [p for p in problems if p.startswith(kind) and ": norm " in p]
        assert len(hits) >= 10, (kind, problems[:20])
    off = json.loads(json.dumps(this_run))
    off["progress"][2]["loss"] = str(float(off["progress"][2]["loss"]) * (1 + 1e-3))
    assert [p for p in compare(off, reference, exact=False) if "loss" in p] == \
        [f"progress.csv row 2 loss: {off['progress'][2]['loss']!r} != reference {reference['progress'][2]['loss']!r}"]


def test_a_new_flag_passes_at_its_default_and_fails_changed(reference, this_run):
    older = json.loads(json.dumps(reference))  # a reference recorded before --clts_floor existed
    states = [n for n in older["checkpoints"]["files"] if _kind(n) == "state"]
    for n in states:
        older["checkpoints"]["files"][n]["values"].pop("config.clts_floor", None)
    assert not [p for p in compare(this_run, older, exact=False) if "values" in p]
    changed = json.loads(json.dumps(this_run))
    for n in states:
        changed["checkpoints"]["files"][n]["values"]["config.clts_floor"] = "0.1"
    assert any("config.clts_floor" in p for p in compare(changed, older, exact=False))
    assert any("config.clts_floor" in p for p in compare(changed, reference, exact=False))


def test_the_comparison_sees_a_one_bit_change(reference):
    ref = reference
    assert compare(ref, ref) == [] and compare(ref, ref, exact=True) == []
    changed = json.loads(json.dumps(ref))
    name = sorted(changed["checkpoints"]["files"])[-1]
    changed["checkpoints"]["files"][name]["sha"][0] = "0" * 16
    changed["progress"][-1]["loss"] = "0.5"
    problems = compare(changed, ref, exact=True)
    assert any("bytes differ" in p for p in problems) and any("loss" in p for p in problems)
    # another CPU: the tolerant comparison passes the same numbers ...
    elsewhere = dict(json.loads(FIXTURE.read_text()), cpu_capability="elsewhere")
    assert not machine_matches(elsewhere, ref) and compare(elsewhere, ref) == []
    # ... and refuses a changed one (ten times its tolerance)
    elsewhere["progress"][-1]["loss"] = str(float(ref["progress"][-1]["loss"]) * (1 + 10 * ROWS_RTOL))
    assert any("loss" in p for p in compare(elsewhere, ref))


def test_the_machine_fingerprint():
    ref = {"cpu_capability": "AVX512", "torch_version": "2.14.1"}
    assert machine_matches(dict(ref, cpu_model="X", blas="mkl"), ref)  # only what the reference records
    assert not machine_matches(dict(ref, cpu_capability="AVX2"), ref)
    assert not machine_matches(dict(ref, torch_version="2.15.0"), ref)
    full = dict(ref, cpu_model="AMD EPYC", blas="mkl")
    assert not machine_matches(dict(full, cpu_model="Intel Xeon"), full)
    assert not machine_matches(dict(full, blas="openblas"), full)
    assert not machine_matches(ref, {"torch_version": "2.14.1"})  # too little recorded: tolerant


if __name__ == "__main__":
    # summarize WORK: run the commands in WORK and write WORK/summary.json (the test's subprocess)
    # record: run in a temporary folder and write the fixture
    import torch

    torch.set_num_threads(1)
    if sys.argv[1] == "summarize":
        work = Path(sys.argv[2])
        _run_commands(work, sys.argv[3:])
        (work / "summary.json").write_text(json.dumps(summarize(work)))
    elif sys.argv[1] == "record":
        with tempfile.TemporaryDirectory() as d:
            summary = run_reference(Path(d))
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(summary, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    else:
        raise SystemExit(f"usage: {sys.argv[0]} record | summarize WORK [TRAINING FLAGS...]")
