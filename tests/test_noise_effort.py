"""docs/study/effort: what each method spends where, recomputed from the library (issue 32, item 4)."""
import re
from pathlib import Path

import numpy as np
import pytest

from experiments import noise_effort as E
from experiments.study import SCALES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study" / "effort"


def _parse(md: str):
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| ([\w.]+) \| ([\d. |]+)\|$", line)
        if m and m.group(1) != "arm":
            rows[m.group(1)] = [float(x) for x in m.group(2).split("|")]
    return rows


def test_committed_effort_table_is_recomputed():
    committed = _parse((DOCS / "effort.md").read_text())
    fresh = E.effort_table(SCALES["cpu_long"], loss=E.probe_loss(SCALES["cpu_long"]))
    assert list(committed) == [r["arm"] for r in fresh] == list(E.EFFORT_ARMS)
    for r in fresh:
        want = [100 * v for k, v in r.items() if k != "arm"]
        # one decimal printed: a recomputation on another machine may round the last digit the other way
        assert np.allclose(committed[r["arm"]], want, atol=0.051), r["arm"]


def test_effort_is_p_times_w_normalised():
    scale = SCALES["cpu_long"]
    e = E.arm_effort("edm", scale)
    np.testing.assert_allclose(e["pw"], e["p"] * e["w"] / np.sum(e["p"] * e["w"]), rtol=1e-12)
    # uniform sampling without a weight spends as it draws
    b = E.arm_effort("baseline", scale)
    np.testing.assert_allclose(b["pw"], np.full(1000, 1e-3), rtol=1e-12)


def test_clts_effort_is_the_run_average():
    """sigma 0.1 CLTS after its target (1/5 of the run) draws almost nothing at t > 0.6 T; the floor keeps half of uniform's."""
    rows = {r["arm"]: r for r in E.effort_table(SCALES["cpu_long"], ("baseline", "clts_s0.1", "clts_s0.1_floor0.5"))}
    base = rows["baseline"]["draws_t>0.6T"]
    # ramp: the first fifth averages half-way between uniform and Gaussian; then ~0 (the Gaussian's tail)
    assert rows["clts_s0.1"]["draws_t>0.6T"] == pytest.approx(base * 0.1, abs=0.005)
    assert rows["clts_s0.1_floor0.5"]["draws_t>0.6T"] == pytest.approx(base * (0.5 + 0.5 * 0.1), abs=0.005)


def test_effort_files_written(tmp_path):
    scale = SCALES["test"]
    paths = E.write_effort(str(tmp_path), scale, arms=("baseline", "laplace", "speed"))
    header = Path(paths["csv"]).read_text().splitlines()[0].split(",")
    assert header[:4] == ["t", "baseline:p", "baseline:w", "baseline:pw"]
    assert len(Path(paths["csv"]).read_text().splitlines()) == scale.diffusion_steps + 1
    assert Path(paths["png"]).stat().st_size > 1000
    assert "| laplace |" in Path(paths["md"]).read_text()


def test_readme_quotes_the_committed_effort_table():
    """The README's sentence on CLTS's draws at t > 0.6T quotes docs/study/effort/effort.md."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"draws ([\d.]+)% of its steps at t > 0\.6T \(uniform: ([\d.]+)%\)", readme)
    assert m, "README.md lost its sentence on the effort table"
    rows = _parse((DOCS / "effort.md").read_text())
    assert float(m.group(1)) == rows["clts_s0.1"][0] and float(m.group(2)) == rows["baseline"][0]


def test_a_folded_arm_spends_as_its_weighted_form_with_weights_of_one():
    scale = SCALES["cpu_long"]
    rows = {r["arm"]: r for r in E.effort_table(scale, ("baseline", "edm", "edm_folded"))}
    for anchor in ("edm", "logit_normal"):
        weighted, folded = E.arm_effort(anchor, scale), E.arm_effort(f"{anchor}_folded", scale)
        np.testing.assert_allclose(folded["pw"], weighted["pw"], rtol=1e-12)
        np.testing.assert_allclose(folded["p"], weighted["pw"], rtol=1e-12)
        assert np.all(folded["w"] == 1.0)
    assert rows["baseline"]["effective batch, w"] == pytest.approx(1.0)
    assert rows["edm_folded"]["effective batch, w"] == pytest.approx(1.0)
    assert rows["edm"]["effective batch, w"] < 0.01  # by its weights alone, a batch of 128 weighs like one draw


def test_folded_docstring_quotes_the_committed_effective_batches():
    """guided_diffusion/folded.py's numbers are the committed table's (w alone; w times the baseline's epsilon-MSE)."""
    from guided_diffusion import folded

    rows = _parse((DOCS / "effort.md").read_text())
    doc = " ".join(folded.__doc__.split())
    assert f"weighs like {rows['edm'][4]:.1f}% of its size, SD3's like {rows['logit_normal'][4]:.0f}%" in doc
    assert (f"weighted EDM form keeps {rows['edm'][5]:.0f}% (baseline: {rows['baseline'][5]:.0f}%) and the folded "
            f"one {rows['edm_folded'][5]:.0f}%; SD3's {rows['logit_normal'][5]:.0f}% and "
            f"{rows['logit_normal_folded'][5]:.0f}%") in doc


def test_readme_and_study_page_quote_edms_effective_batch():
    """The README and docs/study.md quote the committed table's effective batch of EDM's weights alone."""
    rows = _parse((DOCS / "effort.md").read_text())
    root = Path(__file__).resolve().parents[1]
    for page in (root / "README.md", root / "docs" / "study.md"):
        text = " ".join(page.read_text().split())
        m = re.search(r"EDM's (?:batch|draws) weighs like ([\d.]+)%", text)
        assert m, f"{page.name} lost its sentence on EDM's effective batch"
        assert float(m.group(1)) == rows["edm"][4]
