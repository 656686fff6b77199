"""
Behaviour reference: a tiny CPU run (CLTS + MDLRC + min-SNR, two EMA rates, a ``--stop_at`` in the
middle resumed with ``--resume auto`` to the end, then ``image_sample.py`` and ``fid_curve.py``)
must give the same numbers as the recorded run in ``tests/fixtures/behaviour_reference/``.

The fixture was recorded before the training loop was reshaped (issue 21), so this test is what
proves a refactor changed no behaviour: byte-identical checkpoint tensors, progress rows and
samples when the CPU capability and torch version match the recorded ones, else a tight
tolerance (other kernels round differently).

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
from typing import Any, Dict, List, Tuple

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


def _run_commands(work: Path) -> None:
    """The reference commands, as a user would type them (scripts' ``main``)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import fid_curve
    import image_sample
    import image_train
    import numpy as np

    from guided_diffusion.image_datasets import synthetic_images

    run = work / "run"
    image_train.main(TRAIN_FLAGS + ["--log_dir", str(run), "--stop_at", "3"])
    image_train.main(TRAIN_FLAGS + ["--log_dir", str(run), "--resume", "auto"])
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


def summarize(work: Path) -> Dict[str, Any]:
    """Everything the reference compares, from a finished run in ``work``."""
    import numpy as np
    import torch

    run = work / "run"
    out: Dict[str, Any] = {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "progress": _rows(run / "progress.csv"),
        "checkpoints": _pack({p.name: _summarize_pt(p) for p in sorted(run.glob("*.pt"))}),
    }
    npz = sorted((work / "samples").glob("*.npz"))
    with np.load(npz[0]) as f:
        arrays = {k: f[k] for k in f.files}
    out["samples"] = {k: {"sha": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:20],
                          "shape": list(v.shape), "dtype": str(v.dtype), "mean": float(np.asarray(v, np.float64).mean())}
                      for k, v in arrays.items()}
    curve = run / "fid_curve.csv"
    out["fid_curve"] = _rows(curve) if curve.exists() else None
    return out


def run_reference(work: Path) -> Dict[str, Any]:
    """Run the reference commands in a fresh single-threaded subprocess and summarize them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OPENAI_LOGDIR"):
        env.pop(v, None)
    proc = subprocess.run([sys.executable, __file__, "summarize", str(work)], env=env, cwd=str(work),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"the reference run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads((work / "summary.json").read_text())


# ------------------------------------------------------------------ the comparison


def _close(a: Any, b: Any, rtol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return abs(x - y) <= rtol * max(abs(x), abs(y)) + 1e-12


def compare(got: Dict[str, Any], ref: Dict[str, Any]) -> List[str]:
    """Differences between two summaries (empty: the same behaviour)."""
    exact = (got["cpu_capability"], got["torch_version"]) == (ref["cpu_capability"], ref["torch_version"])
    problems: List[str] = []

    def rows(name: str, a: List[Dict[str, str]], b: List[Dict[str, str]]) -> None:
        if a is None or b is None:
            return  # fid_curve: no offline Inception on one side
        if len(a) != len(b):
            problems.append(f"{name}: {len(a)} rows, reference {len(b)}")
            return
        for i, (ra, rb) in enumerate(zip(a, b)):
            if set(ra) != set(rb):
                problems.append(f"{name} row {i}: columns {sorted(set(ra) ^ set(rb))} differ")
            for k in sorted(set(ra) & set(rb)):
                same = ra[k] == rb[k] if exact else _close(ra[k], rb[k], 1e-6)
                if not same:
                    problems.append(f"{name} row {i} {k}: {ra[k]!r} != reference {rb[k]!r}")

    rows("progress.csv", got["progress"], ref["progress"])
    rows("fid_curve.csv", got["fid_curve"], ref["fid_curve"])
    gc, rc = _unpack(got["checkpoints"]), _unpack(ref["checkpoints"])
    if set(gc) != set(rc):
        problems.append(f"checkpoint files {sorted(gc)} != reference {sorted(rc)}")
    for name in sorted(set(gc) & set(rc)):
        g, r = gc[name], rc[name]
        if g["values"] != r["values"]:
            diff = sorted(k for k in set(g["values"]) | set(r["values"]) if g["values"].get(k) != r["values"].get(k))
            problems.append(f"{name}: values {diff[:5]} differ")
        if g["layout"] != r["layout"]:
            problems.append(f"{name}: tensor keys, dtypes or shapes differ")
            continue
        for (key, _, _), gs, rs, gn, rn in zip(r["layout"], g["sha"], r["sha"], g["norm"], r["norm"]):
            if exact or rn is None:
                if gs != rs:
                    problems.append(f"{name} {key}: bytes differ")
            elif not _close(gn, rn, 1e-5):
                problems.append(f"{name} {key}: norm {gn} vs reference {rn}")
    for k in sorted(set(got["samples"]) | set(ref["samples"])):
        a, b = got["samples"].get(k), ref["samples"].get(k)
        if a is None or b is None or (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
            problems.append(f"samples {k}: {a} != reference {b}")
        elif exact and a["sha"] != b["sha"]:
            problems.append(f"samples {k}: bytes differ")
        elif not exact and abs(a["mean"] - b["mean"]) > 1.0:
            problems.append(f"samples {k}: mean {a['mean']} vs {b['mean']}")
    return problems


def test_behaviour_matches_the_reference(tmp_path):
    if not FIXTURE.exists():
        pytest.skip(f"no reference recorded at {FIXTURE}")
    ref = json.loads(FIXTURE.read_text())
    got = run_reference(tmp_path)
    problems = compare(got, ref)
    assert not problems, "behaviour changed:\n" + "\n".join(problems[:40])
    if (got["cpu_capability"], got["torch_version"]) == (ref["cpu_capability"], ref["torch_version"]):
        assert got["progress"] == ref["progress"] and got["samples"] == ref["samples"]


def test_the_comparison_sees_a_one_bit_change():
    if not FIXTURE.exists():
        pytest.skip(f"no reference recorded at {FIXTURE}")
    ref = json.loads(FIXTURE.read_text())
    assert compare(ref, ref) == []
    changed = json.loads(FIXTURE.read_text())
    name = sorted(changed["checkpoints"]["files"])[-1]
    changed["checkpoints"]["files"][name]["sha"][0] = "0" * 16
    changed["progress"][-1]["loss"] = "0.5"
    problems = compare(changed, ref)
    assert any("bytes differ" in p for p in problems) and any("loss" in p for p in problems)
    # another CPU: the tolerant comparison (norms, 6 significant digits) passes the same numbers ...
    elsewhere = dict(json.loads(FIXTURE.read_text()), cpu_capability="elsewhere")
    assert compare(elsewhere, ref) == []
    # ... and refuses a changed one
    elsewhere["progress"][-1]["loss"] = str(float(ref["progress"][-1]["loss"]) * (1 + 1e-4))
    assert any("loss" in p for p in compare(elsewhere, ref))


if __name__ == "__main__":
    # summarize WORK: run the commands in WORK and write WORK/summary.json (the test's subprocess)
    # record: run in a temporary folder and write the fixture
    import torch

    torch.set_num_threads(1)
    if sys.argv[1] == "summarize":
        work = Path(sys.argv[2])
        _run_commands(work)
        (work / "summary.json").write_text(json.dumps(summarize(work)))
    elif sys.argv[1] == "record":
        with tempfile.TemporaryDirectory() as d:
            summary = run_reference(Path(d))
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(summary, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    else:
        raise SystemExit(f"usage: {sys.argv[0]} record | summarize WORK")
