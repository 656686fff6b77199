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
    fresh = E.effort_table(SCALES["cpu_long"])
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
