"""bench/gpu_check.py --smoke: the GPU check's code paths on CPU with tiny shapes, so it never rots.

The smoke run is the same program as the H200 check (every section in its own subprocess, the
guards, the table) with CPU kernels. Expected rows are listed here independently of the script:
every registered backend x layer kind x dtype must have a passing correctness row (tolerances of
tests/test_attention.py, applied by the script and shown in the table), every attention and model
row must be present with a number or a stated reason. A wrong backend output fails a correctness
row and so this test. Takes a few minutes on a busy 2-core machine (mostly flex compiling on CPU).
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("sdpa", "sdpa-math", "flex")
DTYPES = ("bfloat16", "float32")
FRAMES = (9, 13)  # the smoke's stand-ins for F = 81 and 241


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "table.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1700, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in proc.stdout  # the table printed is the table written
    header, *rows = [line for line in text.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    parsed = {}
    for line in rows:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["row"] not in parsed, f"row listed twice: {cells['row']}"
        parsed[cells["row"]] = cells
    return parsed


def _row(table, prefix):
    hits = [r for label, r in table.items() if label.startswith(prefix)]
    assert len(hits) == 1, f"expected one row starting {prefix!r}, found {len(hits)}"
    return hits[0]


def test_backends_are_the_expected_ones():
    from freeloc_dist.attention import BACKENDS as registered

    assert set(registered) - {"reference"} == set(BACKENDS), "a new backend needs rows here and in the check"


def test_correctness_rows_pass(table):
    for dtype in DTYPES:
        for mask in ("no mask", "band mask"):
            assert _row(table, f"lse.attend vs matmul, {dtype}, {mask}")["result"].startswith("pass")
    for kind in ("vrpr", "tsa"):
        for backend in BACKENDS:
            for dtype in DTYPES:
                r = _row(table, f"{kind} {backend} {dtype} (")
                assert r["result"].startswith("pass"), r
                err, tol = r["rel err (tol)"].split()
                assert float(err) < float(tol.strip("()")) <= 1e-2


def test_attention_rows_present_with_numbers_or_reasons(table):
    for i, f in enumerate(FRAMES):
        dense = _row(table, f"dense SDPA flash F={f} ")
        assert float(dense["seconds"]) > 0 and dense["x dense"] == "1.000"
        assert _row(table, f"dense SDPA cuDNN F={f} ")["result"].startswith("skipped: no cuDNN")
        for backend in BACKENDS:
            for kind in ("vrpr", "tsa"):
                r = _row(table, f"{kind} {backend} F={f} ")
                if i == 0 or r["result"].startswith("ok"):  # F=9 always runs; F=13 may be skipped by a guard
                    assert r["result"].startswith("ok"), r
                    assert float(r["seconds"]) > 0 and float(r["x dense"]) > 0 and float(r["TFLOP/s"]) > 0
                else:
                    assert r["result"].startswith("skipped: ") and len(r["result"]) > 20, r


def test_model_rows(table):
    for f in FRAMES:
        eager = _row(table, f"Wan 3-layer bf16 eager, F={f}")
        assert eager["result"].startswith("ok") and float(eager["seconds"]) > 0, eager
        assert eager["planner"].startswith(">= ") and "TFLOP/s" in eager["planner"]
        compiled = _row(table, f"Wan 3-layer bf16 compiled, F={f}")
        # torch.compile with FreeLOC installed is issue 12: a number, or the reason it has none
        status = compiled["result"].split(":")[0].split(" (")[0]
        assert status in ("ok", "failed", "skipped", "not reached") and len(compiled["result"]) > 10, compiled


def test_calls_rows(table):
    """Section d (issue 26): kernel calls and host ms per layer on one rank's shard; the smoke runs sdpa only."""
    for f in FRAMES:
        for kind in ("tsa", "vrpr", "vrpr+long"):
            r = _row(table, f"calls {kind} sdpa F={f},")
            assert r["result"].startswith("ok: ") and "kernel calls" in r["result"] and "host" in r["result"], r
            assert int(r["result"].split()[1].replace(",", "")) > 0 and float(r["seconds"]) > 0
            assert _row(table, f"calls {kind} flex F={f},")["result"].startswith("skipped: --smoke")
        assert _row(table, f"calls: faster backend F={f}")["result"].startswith("no verdict: measured sdpa")
