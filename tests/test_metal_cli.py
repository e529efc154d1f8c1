"""`mlx-moe-tune report` and `mlx-moe-tune selftest` through the CLI dispatcher."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from mlx_moe_tune import cli, selftest

ROWS = [
    # kernel, config, m, n, gbps, pct_roofline, status
    ("stock.gather_qmm", "", 1, 1408, 700.0, 22.9, "ok"),
    ("stock.gather_qmm_unsorted", "", 1, 1408, 841.0, 27.5, "ok"),
    ("tuned.qmv", "RPS4_SG2_VPT8_PR4", 1, 1408, 2523.0, 82.4, "ok"),
    ("tuned.qmm", "BM16_BN64_BK32_WM1_WN2", 1, 1408, 1900.0, 62.0, "ok"),
    ("stock.gather_qmm", "", 16, 1408, 87.0, 2.8, "ok"),
    ("tuned.qmm", "BM16_BN64_BK32_WM1_WN2", 16, 1408, 2436.0, 79.6, "ok"),
    ("tuned.qmm", "BM32_BN64_BK64_WM2_WN2", 16, 1408, 9999.0, 99.0, "error"),  # failed: ignored
    ("stock.gather_qmm", "", 16, 704, 60.0, 2.0, "ok"),
    ("tuned.qmm", "BM16_BN32_BK32_WM1_WN2", 16, 704, 1200.0, 39.2, "ok"),
    ("ref.bandwidth", "", None, None, 3062.0, 100.0, "ok"),
]


@pytest.fixture
def sweep_csv(tmp_path):
    df = pd.DataFrame(ROWS, columns=["kernel", "config", "m", "n", "gbps", "pct_roofline", "status"])
    df["experts"], df["top_k"], df["k"], df["bits"], df["group_size"] = 128, 8, 2816, 4, 64
    df["mode"], df["dtype"], df["router"] = "affine", "bfloat16", "balanced"
    df["backend"], df["device"] = "cuda", "NVIDIA H100 80GB HBM3"
    path = tmp_path / "sweep.csv"
    df.to_csv(path, index=False)
    return path


def _table_rows(text: str, heading: str) -> dict[int, list[str]]:
    block = text.split(heading, 1)[1].split("###", 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and re.fullmatch(r"\d+", cells[0]):
            rows[int(cells[0])] = cells
    return rows


def test_report_markdown(sweep_csv, capsys):
    assert cli.main(["report", str(sweep_csv)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "3,062 GB/s" in out
    big = _table_rows(out, "K=2816 N=1408")
    # m=1: stock = the faster stock layout (841), best tuned = qmv 2523
    assert big[1][1:] == ["841", "2,523", "`qmv RPS4_SG2_VPT8_PR4`", f"{2523 / 841:.2f}x", "82.4"]
    # m=16: the failed 9999 row does not win
    assert big[16][1:] == ["87", "2,436", "`qmm BM16_BN64_BK32_WM1_WN2`", f"{2436 / 87:.2f}x", "79.6"]
    small = _table_rows(out, "K=2816 N=704")
    assert list(small) == [16] and small[16][2] == "1,200"


def test_report_pinned_stock_and_output_file(sweep_csv, tmp_path):
    out = tmp_path / "r.md"
    assert cli.main(["report", str(sweep_csv), "--stock", "stock.gather_qmm", "-o", str(out)]) == 0
    assert _table_rows(out.read_text(), "K=2816 N=1408")[1][1] == "700"


def test_report_bad_input(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing.csv")]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert cli.main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "missing column" in err


def test_selftest_cli_passes_and_fails(monkeypatch, capsys):
    args = ["selftest", "--backend", "emulator-metal", "--family", "qmv", "--max-configs", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    n = len(selftest.default_cases())
    assert f"{n}/{n} passed" in out and "FAIL" not in out
    # an impossible tolerance turns every line into a failure and the exit code non-zero
    monkeypatch.setattr(selftest, "TOLERANCE", {k: -1.0 for k in selftest.TOLERANCE})
    assert cli.main([*args, "-j", "1"]) == 1  # in this process, where the patch applies
    assert "FAIL" in capsys.readouterr().out


def test_selftest_unknown_family(capsys):
    assert cli.main(["selftest", "--backend", "emulator-metal", "--family", "nope"]) == 2
    assert "unknown kernel family" in capsys.readouterr().err
