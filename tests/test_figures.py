"""
The figures harness (experiments/figures/, issue #19): at the test scale it trains every model,
writes a complete ledger and docs section, reuses the study's finished runs, trains and measures
nothing on a rerun, reprints from the ledger alone; Table 1's numbers are Eq. 1 on the uint8
samples; and the committed ledger (docs/figures/) is complete and reproduces its Table 1.
"""
import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_quotes_only, hand_written_block
from experiments import figures, study
from guided_diffusion.image_datasets import synthetic_images, write_npz

REPO = Path(__file__).resolve().parents[1]
# table1.csv keeps figures.STABLE_DIGITS significant digits
CSV_RTOL = 10.0 ** (1 - figures.STABLE_DIGITS)
COMMITTED = REPO / "docs" / "figures"
DOC = REPO / "docs" / "figures.md"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def outside_section(text):
    """The hand-written part of a doc: everything but the generated section."""
    start = text.find("<!-- figures:measured:begin")
    end = text.find(figures.MARK_END)
    assert start >= 0 and end > start, "the generated section's markers are missing"
    return text[:start] + text[end + len(figures.MARK_END):]


def mtimes(folder, pattern):
    return {str(p): p.stat().st_mtime_ns for p in Path(folder).rglob(pattern)}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The harness run once at the test scale, with the CPU study's baseline-s1 already finished."""
    root = tmp_path_factory.mktemp("figures")
    source = root / "cifar.npz"
    write_npz(str(source), synthetic_images(64, 32, seed=0)[0])
    settings = figures.settings_for("test")
    study_out = root / "study"
    train, _ = study.prepare_data(str(study_out), settings.diffusion, str(source))
    spec = figures.RUN_BY_NAME["baseline-s1"]
    flags = figures.diffusion_flags(spec, settings, train, str(study_out / "runs" / spec.name))
    figures.call_script("image_train.py", figures.flags_to_argv(flags), str(root / "study-train.log"), settings)
    doc = root / "figures.md"
    shutil.copyfile(DOC, doc)
    out, ledger = root / "out", root / "ledger"
    first = figures.run_figures(str(out), settings, str(ledger), str(doc), study_out=str(study_out))
    return {"root": root, "settings": settings, "study_out": study_out, "out": out, "ledger": ledger, "doc": doc,
            "first": first, "study_run": study_out / "runs" / spec.name}


def test_harness_writes_a_complete_ledger_and_the_docs_section(harness):
    s, ledger, first = harness["settings"], harness["ledger"], harness["first"]
    assert first["status"]["missing"] == []
    tasks = figures.build_tasks(s)
    assert sorted(first["ran"]) == sorted(t.key for t in tasks)
    for t in tasks:
        for f in t.files:
            assert (ledger / f).is_file(), f
    for name in figures.DERIVED:
        assert (ledger / name).is_file(), name
    # the study's finished baseline-s1 is reused, everything else trained here
    assert sorted(first["trained"]) == sorted(r.name for r in figures.RUNS if r.name != "baseline-s1")
    book = json.loads((ledger / "ledger.json").read_text())
    assert book["runs"]["baseline-s1"]["source"] == "study"
    assert book["runs"]["baseline-s2"]["source"] == "figures"
    assert all("command" in book["tasks"][t.key] for t in tasks)
    assert "consistency.py" in book["tasks"][tasks[0].key]["command"]
    # Table 1: every pair at three checkpoints, a replicate, DDIM for diffusion, the nulls
    rows = read_csv(ledger / "table1.csv")
    eps = [r for r in rows if r["type"] == "pair" and r["model_a"] == "baseline-s1" and r["model_b"] == "baseline-s2"]
    assert sorted({int(r["step"]) for r in eps}) == s.steps("diffusion") and len(s.steps("diffusion")) == 3
    assert {r["sampler"] for r in eps} == {"ddpm4", "ddim2"}
    assert {r["model_a"] for r in rows if r["type"] == "null"} == {n for g in figures.GROUPS.values() for n in g}
    gan = [r for r in rows if r["type"] == "pair" and r["group"] == "dcgan"]
    assert sorted({int(r["step"]) for r in gan}) == s.steps("gan") == [1, 3, 5]
    for r in first["table1"]:
        assert r["pooled_db"] is not None and r["verdict"] and len(r["over_training"]) == 3
    for key in ("fig2", "fig3", "fig4"):
        assert first[key].get("verdict"), key
    with np.load(ledger / figures.build_tasks(s)[0].files[0]) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (3, s.num_samples, 8, 8, 3)
    # the doc: the generated section between the markers, the hand-written rest untouched
    text = harness["doc"].read_text()
    assert outside_section(text) == outside_section(DOC.read_text())
    section = text[text.find(figures.MARK_BEGIN):text.find(figures.MARK_END)]
    for what in ("### Table 1", "20.14 dB", "10.48 dB", "### Fig. 1", "fig1_grid.png", "### Fig. 2", "### Fig. 3",
                 "eigenvalue divided by the loss", "### Fig. 4", "python scripts/consistency.py",
                 "python scripts/hessian_spectrum.py", "python scripts/loss_landscape.py", "Verdict"):
        assert what in section, what
    assert "Not measured yet" not in section


def test_rerun_trains_nothing_and_measures_nothing(harness, capsys):
    ledger, out = harness["ledger"], harness["out"]
    results = mtimes(ledger, "*.npz") | mtimes(ledger / "fig3", "*") | mtimes(ledger / "fig4", "*")
    checkpoints = mtimes(out / "runs", "*.pt") | mtimes(harness["study_run"], "*.pt")
    doc_before = harness["doc"].read_text()
    again = figures.run_figures(str(out), harness["settings"], str(ledger), str(harness["doc"]),
                                study_out=str(harness["study_out"]))
    assert again["trained"] == {} and again["ran"] == []
    assert "nothing to train or measure" in capsys.readouterr().out
    assert (mtimes(ledger, "*.npz") | mtimes(ledger / "fig3", "*") | mtimes(ledger / "fig4", "*")) == results
    assert (mtimes(out / "runs", "*.pt") | mtimes(harness["study_run"], "*.pt")) == checkpoints
    assert harness["doc"].read_text() == doc_before  # the section is a function of the ledger alone
    assert again["table1"] == harness["first"]["table1"]


def test_fresh_clone_reprints_from_the_ledger_without_checkpoints(harness, tmp_path, capsys):
    ledger, doc = tmp_path / "docs" / "figures", tmp_path / "docs" / "figures.md"
    shutil.copytree(harness["ledger"], ledger)
    shutil.copyfile(harness["doc"], doc)
    new_out = tmp_path / "no-runs-here"
    rep = figures.run_figures(str(new_out), harness["settings"], str(ledger), str(doc),
                              study_out=str(tmp_path / "no-study"))
    printed = capsys.readouterr().out
    assert rep["trained"] == {} and rep["ran"] == [] and not new_out.exists()
    assert "Table 1" in printed and "eps-prediction, two initialisations" in printed
    assert rep["table1"] == harness["first"]["table1"]
    assert rep["fig3"] == harness["first"]["fig3"] and rep["fig4"] == harness["first"]["fig4"]
    assert outside_section(doc.read_text()) == outside_section(DOC.read_text())


def test_table1_is_eq1_on_the_uint8_samples(harness):
    """The ledger's PSNRs against a direct computation on the saved uint8 images."""
    check_table1_against_samples(harness["ledger"], harness["settings"])


def check_table1_against_samples(ledger, settings):
    rows = read_csv(Path(ledger) / "table1.csv")
    n = settings.num_samples
    checked = 0
    for t in figures.build_tasks(settings):
        if t.kind != "table1":
            continue
        with np.load(Path(ledger) / t.files[0]) as f:
            images, names = f["images"], [str(x) for x in f["names"]]
        assert images.dtype == np.uint8
        seeds = f"{t.params['seed0']}-{t.params['seed0'] + n - 1}"
        for i in range(len(names)):  # identical images: infinite PSNR, capped at 100 dB as the scripts do
            for j in range(i + 1, len(names)):
                a, b = images[i].astype(np.float64), images[j].astype(np.float64)
                with np.errstate(divide="ignore"):
                    pooled = min(100.0, 10 * np.log10(255.0 ** 2 / ((a - b) ** 2).mean()))
                    per = [min(100.0, 10 * np.log10(255.0 ** 2 / ((a[k] - b[k]) ** 2).mean())) for k in range(n)]
                row = [r for r in rows if r["type"] == "pair" and r["sampler"] == t.params["sampler"]
                       and r["seeds"] == seeds and int(r["step"]) == t.params["step"] and r["model_a"] == names[i]
                       and r["model_b"] == names[j]]
                assert len(row) == 1, (t.key, names[i], names[j])
                assert float(row[0]["pooled_psnr_db"]) == pytest.approx(pooled, rel=CSV_RTOL)
                assert float(row[0]["mean_psnr_db"]) == pytest.approx(np.mean(per), rel=CSV_RTOL)
                checked += 1
    assert checked > 0
    return checked


def check_ledger(ledger, doc, settings):
    """A ledger is complete, its table1.csv is what its samples give, and the doc's section is what it renders."""
    ledger = Path(ledger)
    status = figures.ledger_status(str(ledger), settings)
    assert status["missing"] == [], f"analyses missing from the ledger: {status['missing']}"
    for name in figures.DERIVED:
        assert (ledger / name).is_file(), name
    check_table1_against_samples(ledger, settings)
    rows = figures.table1_rows(str(ledger), settings)
    committed = read_csv(ledger / "table1.csv")
    assert len(rows) == len(committed)
    for r, c in zip(rows, committed):
        assert (c["model_a"], c["model_b"], c["sampler"], int(c["step"])) == (r["model_a"], r["model_b"],
                                                                              r["sampler"], r["step"])
        assert float(c["pooled_psnr_db"]) == pytest.approx(r["pooled_psnr_db"], rel=CSV_RTOL)
        assert float(c["mean_psnr_db"]) == pytest.approx(r["mean_psnr_db"], rel=CSV_RTOL)
    t1 = figures.table1_summary(rows, settings)
    md = figures.render_markdown(str(ledger), settings, status, t1, figures.fig2_summary(str(ledger), settings),
                                 figures.fig3_summary(str(ledger)), figures.fig4_summary(str(ledger)), str(doc))
    text = Path(doc).read_text()
    section = text[text.find(figures.MARK_BEGIN) + len(figures.MARK_BEGIN):text.find(figures.MARK_END)]
    assert section.strip() == md.strip(), f"{doc}'s section is not what {ledger} renders: run make figures"


def test_the_ledger_check_passes_on_the_harness_ledger(harness):
    check_ledger(harness["ledger"], harness["doc"], harness["settings"])


def test_committed_ledger_is_complete_and_reproduces_table1():
    """docs/figures/: every analysis's files, Table 1 recomputed from its samples, the doc section from the ledger."""
    if not (COMMITTED / figures.LEDGER_JSON).is_file():
        pytest.skip("docs/figures/ holds no measured results yet: `make figures` (about 70 min on two CPU cores) "
                    "writes and the commit adds them")
    check_ledger(COMMITTED, DOC, figures.settings_for("cpu"))


def test_the_hand_written_reading_quotes_only_measured_numbers():
    """docs/figures.md's reading by hand: every number in it is one of the generated section's."""
    reading = hand_written_block(DOC, "figures:reading")
    if not reading:
        pytest.skip("docs/figures.md has no hand-written reading yet")
    assert (COMMITTED / figures.LEDGER_JSON).is_file(), "docs/figures.md has a reading but docs/figures/ no results"
    text = DOC.read_text()
    assert_quotes_only(reading, text[text.index(figures.MARK_BEGIN):text.index(figures.MARK_END)],
                       "the generated section")


def test_a_ledger_of_other_settings_is_refused(tmp_path):
    settings = figures.settings_for("test")
    figures.save_ledger(str(tmp_path), {"settings": figures.settings_for("test", num_samples=8).fingerprint()})
    with pytest.raises(ValueError, match="other settings.*num_samples"):
        figures.run_figures(str(tmp_path / "out"), settings, str(tmp_path))


def test_replace_section_keeps_the_hand_written_text(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# Title\n\nintro\n\n## First\n\nbody\n")
    figures.replace_section(str(doc), "generated 1\n")
    text = doc.read_text()
    assert text.startswith("# Title\n\nintro\n\n## Measured here\n\n" + figures.MARK_BEGIN + "\ngenerated 1\n")
    assert text.endswith(figures.MARK_END + "\n\n## First\n\nbody\n")
    figures.replace_section(str(doc), "generated 2\n")
    assert doc.read_text() == text.replace("generated 1", "generated 2")


def test_line_metrics():
    a = np.linspace(-0.5, 1.5, 41)
    line = figures.line_metrics(a, 2.0 - a)
    assert line["turns"] == 0 and line["roughness"] == pytest.approx(0.0, abs=1e-9)
    bowl = figures.line_metrics(a, (a - 0.5) ** 2 + 1.0)
    assert bowl["turns"] == 1 and bowl["roughness"] < 0.5 and bowl["barrier"] == pytest.approx(0.0, abs=1e-12)
    zig = figures.line_metrics(a, 1.0 + 0.1 * (-1.0) ** np.arange(41))
    assert zig["turns"] == 39 and zig["roughness"] > 1.5
    bump = figures.line_metrics(a, 1.0 + np.exp(-((a - 0.5) / 0.1) ** 2))
    assert bump["barrier"] == pytest.approx(1.0, rel=1e-6)  # peak 2 over ends of 1
    # an undefined loss (NaN, e.g. BatchNorm with a negative interpolated variance) is left out and counted
    holed = (a - 0.5) ** 2 + 1.0
    holed[:8] = np.nan
    m = figures.line_metrics(a, holed)
    assert m["nonfinite"] == 8 and bowl["nonfinite"] == 0
    assert m["turns"] == 1 and m["roughness"] < 0.5 and math.isfinite(m["roughness"])
    assert math.isnan(figures.line_metrics(a[:2], [1.0, np.nan])["roughness"])


def test_cpu_settings_are_the_study_scale():
    s = figures.settings_for("cpu")
    assert s.diffusion == study.preset("cpu")
    assert s.steps("diffusion") == [400, 1200, 2000] and s.steps("gan") == [400, 1200, 2000]
    assert s.steps("diffusion", s.fig4_fractions) == [400, 2000]
    # the baseline is the study's own arm, flag for flag, so its finished runs can be reused
    theirs = next(a for a in getattr(study, "ARMS", ()) if a.name == "baseline")
    assert figures.BASELINE.flags == theirs.flags
    base = figures.diffusion_flags(figures.RUN_BY_NAME["baseline-s1"], s, "d", "r")
    assert base == study.arm_flags(theirs, study.preset("cpu"), 1, "d", "r")
    deep = figures.diffusion_flags(figures.RUN_BY_NAME["deep-s3"], s, "d", "r")
    x0 = figures.diffusion_flags(figures.RUN_BY_NAME["x0_pred-s2"], s, "d", "r")
    assert {k for k in deep if deep[k] != base.get(k)} == {"num_res_blocks", "seed"} and deep["num_res_blocks"] == 2
    assert {k for k in x0 if x0[k] != base.get(k)} == {"predict_xstart", "seed"} and x0["predict_xstart"] is True
    assert os.path.relpath(figures.ROOT, REPO) == "."


def test_replace_section_under_an_existing_heading(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("# T\n\n## Measured here\n\nhand-written\n\n## Next\n\nx\n")
    figures.replace_section(str(doc), "gen\n")
    assert doc.read_text() == ("# T\n\n## Measured here\n\nhand-written\n\n" + figures.MARK_BEGIN + "\ngen\n"
                               + figures.MARK_END + "\n\n## Next\n\nx\n")


def test_ledger_files_are_not_git_ignored():
    """.gitignore's `runs/` matches a folder of that name at any depth: the ledger must avoid such names."""
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(COMMITTED / f) for t in figures.build_tasks(figures.settings_for("cpu")) for f in t.files]
    files += [str(COMMITTED / n) for n in (figures.LEDGER_JSON, *figures.DERIVED)]
    proc = subprocess.run(["git", "check-ignore", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "", f"ignored by git: {proc.stdout}"


def test_a_run_made_with_other_flags_is_not_reused(tmp_path):
    settings = figures.settings_for("cpu")
    flags = figures.diffusion_flags(figures.RUN_BY_NAME["baseline-s1"], settings, "d", str(tmp_path))
    (tmp_path / "config.yaml").write_text("".join(f"{k}: {v!r}\n" if isinstance(v, str) else f"{k}: {v}\n"
                                                  for k, v in flags.items()))
    assert figures.config_mismatches(str(tmp_path), flags) == []
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("lr: 0.0003", "lr: 0.0001"))
    assert figures.config_mismatches(str(tmp_path), flags) == ["lr: has 0.0001, wants 0.0003"]
    assert figures.config_mismatches(str(tmp_path / "none"), flags) == ["no config.yaml"]


def test_written_floats_do_not_depend_on_the_machines_last_bits():
    # a PSNR's 16th digit depends on the summation order (vector width, BLAS): what is committed is rounded
    noisy = {"a": [24.46666942549736, 24.466669425497364], "b": (float("nan"), 7.470781618464961), "c": "x",
             "d": 3, "e": np.float64(1 / 3), "f": True}
    out = figures.stable_floats(noisy)
    assert out["a"] == [24.46666943, 24.46666943]
    assert math.isnan(out["b"][0]) and out["b"][1] == 7.470781618 and isinstance(out["b"], tuple)
    assert (out["c"], out["d"], out["f"]) == ("x", 3, True) and out["e"] == 0.3333333333


def test_the_committed_figures_files_are_in_the_stable_form():
    ledger = REPO / "docs" / "figures"
    with open(ledger / "table1.csv") as f:
        values = [v for row in csv.DictReader(f) for k, v in row.items() if k.endswith("_db")]
    summary = json.loads((ledger / "summary.json").read_text())

    def floats(obj):
        if isinstance(obj, dict):
            return [x for v in obj.values() for x in floats(v)]
        if isinstance(obj, list):
            return [x for v in obj for x in floats(v)]
        return [obj] if isinstance(obj, float) else []

    assert values and floats(summary)
    for x in [float(v) for v in values if v] + floats(summary):
        assert not math.isfinite(x) or x == float(f"{x:.{figures.STABLE_DIGITS}g}"), x
