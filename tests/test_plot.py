"""Plots: files are written (PNG), the drawn data are the CSV's, speedups are tuned/stock."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mlx_moe_tune import plot  # noqa: E402
from mlx_moe_tune.cli import main  # noqa: E402

H100 = Path(__file__).resolve().parent.parent / "sweeps" / "results" / "h100" / "gemma-26b-a4b-stock.csv"
PNG = b"\x89PNG\r\n\x1a\n"


def _df():
    """A small synthetic sweep: stock falls with m, a tuned kernel with two configs does not."""
    rows = []
    base = dict(matrix="w", experts=8, top_k=2, k=256, n=128, mode="affine", bits=4, group_size=64,
                dtype="bfloat16", router="balanced", status="ok", backend="cuda", device="NVIDIA H100 80GB HBM3")
    for m in (1, 2, 4, 8):
        rows.append(dict(base, kernel="stock.gather_qmm", config="", m=m, gbps=800.0 / m))
        rows.append(dict(base, kernel="tuned.qmm", config="BM16", m=m, gbps=2000.0 + m))
        rows.append(dict(base, kernel="tuned.qmm", config="BM32", m=m, gbps=1500.0 + 100 * m))
        rows.append(dict(base, kernel="ref.bandwidth", config="sum", m=m, gbps=3000.0))
    rows.append(dict(base, kernel="tuned.qmm", config="BM64", m=8, gbps=None, status="failed: boom"))
    return pd.DataFrame(rows)


def test_cliff_draws_best_config_probe_and_peak():
    df = _df()
    ax = plot.plot_cliff(df, configs=True)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    best = lines["tuned.qmm (best config per m)"]
    assert list(best.get_xdata()) == [1, 2, 4, 8]
    assert list(best.get_ydata()) == [2001.0, 2002.0, 2004.0, 2300.0]  # BM32 wins at m=8
    assert list(lines["stock.gather_qmm"].get_ydata()) == [800.0, 400.0, 200.0, 100.0]
    hlines = [ln for lbl, ln in lines.items() if "bandwidth" in lbl or "peak" in lbl]
    assert sorted(ln.get_ydata()[0] for ln in hlines) == [3000.0, 3350.0]
    assert ax.get_xscale() == "log"
    assert "H100" in ax.get_title() and "K=256 N=128" in ax.get_title() and "4-bit gs64" in ax.get_title()
    plt.close("all")


def test_speedup_is_best_tuned_over_stock():
    sp = plot.speedups(_df())
    assert sp["speedup"].tolist() == pytest.approx([2001 / 800, 2002 / 400, 2004 / 200, 2300 / 100])
    ax = plot.plot_speedup(_df())
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(sp["speedup"].tolist())
    plt.close("all")


def test_heatmap_values():
    ax = plot.plot_heatmap(_df(), "tuned.qmm")
    data = ax.images[0].get_array()
    assert data.shape == (2, 4)  # BM16 and BM32 (the failed BM64 row is not data)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["BM32", "BM16"]  # best first
    plt.close("all")


@pytest.mark.parametrize("kind", ["cliff", "heatmap", "speedup"])
def test_plot_cli_writes_png(tmp_path, kind):
    csv = tmp_path / "s.csv"
    _df().to_csv(csv, index=False)
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(csv), "-o", str(out), "--kind", kind]) == 0
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


def test_plot_committed_h100_results(tmp_path):
    out = tmp_path / "h100.png"
    assert main(["plot", str(H100), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    df = plot.load(H100)
    assert len(plot.shapes(df)) == 2  # N=1408 and N=704


def test_plot_cli_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "x.png")]) == 2
    csv = tmp_path / "s.csv"
    _df().query("not kernel.str.startswith('tuned')", engine="python").to_csv(csv, index=False)
    capsys.readouterr()
    assert main(["plot", str(csv), "-o", str(tmp_path / "x.png"), "--kind", "speedup"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to compare" in err
    assert main(["plot", str(csv), "-o", str(tmp_path / "x.txt")]) == 2
