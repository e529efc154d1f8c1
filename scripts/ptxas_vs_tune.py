"""Join the H200 tuner's measurements (every candidate, N=704) with the ptxas report of the same
configs: does GB/s follow occupancy? Writes the joined rows and prints, per m, the correlation of
GB/s with theoretical occupancy and with registers, and the best config; draws GB/s against
registers per m (the .png beside the CSV).

    python scripts/ptxas_vs_tune.py [-o sweeps/results/nvrtc/ptxas-vs-h200-tune-n704.csv]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "sweeps/results/h200/tune-v2/tune-n704.csv"
# the report from before the W-in-flight rule: it still lists every config the tuner measured
PTXAS = ROOT / "sweeps/results/nvrtc/ptxas-gemma-26b-a4b-before-w-rule.csv"


def joined() -> pd.DataFrame:
    t = pd.read_csv(TUNE)
    t = t[(t.status == "ok") & t.kernel.str.startswith("tuned.")].copy()
    t["family"] = t.kernel.str.removeprefix("tuned.")
    r = pd.read_csv(PTXAS)
    r = r[(r.matrix == "up") & (r.status == "ok")].copy()
    # the tune ran before PF and WS existed: its ids are the PF=0, WS=0 kernels
    r["config"] = r.config.str.replace("_PF0", "").str.replace("_WS0", "")
    cols = ["family", "config", "registers", "spill_stores", "blocks_per_sm", "occupancy", "limited_by"]
    j = t.merge(r[cols], on=["family", "config"], how="left", validate="many_to_one")
    missing = j.registers.isna().sum()
    if missing:
        raise SystemExit(f"{missing} tuned rows have no ptxas row: regenerate {PTXAS.name}")
    return j[["m", "family", "config", "time_us", "gbps", *cols[2:]]]


def plot(j: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted(j.m.unique())
    fig, axes = plt.subplots(1, len(ms), figsize=(2.6 * len(ms), 3.2), sharey=True)
    for ax, m in zip(axes, ms):
        g = j[j.m == m]
        sc = ax.scatter(g.registers, g.gbps, c=g.blocks_per_sm, cmap="viridis", vmin=1, vmax=6, s=18)
        ax.set_title(f"m={m}")
        ax.set_xlabel("registers / thread")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("H200 GB/s (tuner, N=704)")
    fig.colorbar(sc, ax=axes, label="blocks per SM (registers)")
    fig.suptitle("Measured GB/s vs ptxas registers, every tuned candidate (gemma-26b-a4b up, 4-bit)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default=str(ROOT / "sweeps/results/nvrtc/ptxas-vs-h200-tune-n704.csv"))
    args = ap.parse_args()
    j = joined()
    j.to_csv(args.out, index=False)
    plot(j, Path(args.out).with_suffix(".png"))
    for m, g in j.groupby("m"):
        best = g.sort_values("gbps", ascending=False).iloc[0]
        g = g[g.family == best.family]  # within the winning family: qmv at m >= 4 loses for other reasons
        print(f"m={m:<3} {best.family} configs={len(g):<3} corr(GB/s, occupancy)={np.corrcoef(g.gbps, g.occupancy)[0, 1]:+.2f} "
              f"corr(GB/s, registers)={np.corrcoef(g.gbps, g.registers)[0, 1]:+.2f}  best "
              f"{best.config} {best.gbps:.0f} GB/s, {best.registers} regs, {best.blocks_per_sm} blocks/SM")


if __name__ == "__main__":
    main()
