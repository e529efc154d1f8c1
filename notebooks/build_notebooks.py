"""Write (and with --execute, run and save with outputs) the notebooks of this folder.

The notebooks are generated so their code stays reviewable as plain Python here:
  python notebooks/build_notebooks.py --execute
Both load the committed H100 results (sweeps/results/h100/, mlx_moe_tune/tables/); set
MLX_MOE_TUNE_RESULTS to point them at another results folder (e.g. a CPU sweep while developing).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import json, os
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # headless in CI; inline display still works in Jupyter
import matplotlib.pyplot as plt
import pandas as pd

from mlx_moe_tune import plot, tables

ROOT = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
RESULTS = Path(os.environ.get("MLX_MOE_TUNE_RESULTS", ROOT / "sweeps" / "results" / "h100"))
print("results:", RESULTS)
'''

LOAD_SWEEPS = '''\
def load_sweeps(folder):
    """Every sweep CSV of the folder (rows = (kernel, config, m) measurements) with its JSON sidecar."""
    frames, metas = [], {}
    for csv in sorted(Path(folder).glob("*.csv")):
        df = pd.read_csv(csv)
        if csv.stem.startswith("tune") or not {"kernel", "m", "gbps", "status", "router"} <= set(df.columns):
            continue  # not a sweep (the tuner's candidate list is read by tuning_report)
        df["source"] = csv.stem
        frames.append(df)
        side = csv.with_suffix(".json")
        if side.exists():
            metas[csv.stem] = json.loads(side.read_text())
    if not frames:
        raise FileNotFoundError(f"no sweep CSV in {folder}")
    return pd.concat(frames, ignore_index=True), metas

sweeps, metas = load_sweeps(RESULTS)
ok = sweeps[sweeps.status == "ok"]
print(f"{len(sweeps)} rows from {sweeps.source.nunique()} files; kernels: {', '.join(sorted(sweeps.kernel.unique()))}")
for name, meta in metas.items():
    dev = meta.get("device", {})
    dev = dev.get("device_name", dev) if isinstance(dev, dict) else dev
    print(f"  {name}: device={dev} mlx={meta.get('mlx_version', meta.get('mlx'))} date={meta.get('date')}")
'''

CLIFF_MD = """\
# The regime cliff: stock vs tuned gather_qmm on an H100

A MoE layer multiplies each expert's rows by that expert's quantized weights. With `m` rows per
expert, a kernel that reuses each dequantized weight tile for all `m` rows stays bound by
streaming the weights, so its GB/s (bytes of the active experts' weights / time) stays flat as
`m` grows. MLX's stock kernels re-read the weights per row (CUDA) or per row tile: their time
grows with `m` and their GB/s falls off a cliff. The tuned kernels (`tuned.*`, best tile config
per `m`) should stay near the measured bandwidth roofline (`ref.bandwidth`).

This notebook loads the committed H100 sweeps (`sweeps/results/h100/*.csv` + JSON sidecars)."""

CLIFF_TABLE = '''\
def best_per_m(df):
    """Per (shape, m): stock GB/s, the best tuned config and its GB/s, the roofline."""
    rows = []
    for (E, K, N, m), g in df.groupby(["experts", "k", "n", "m"]):
        stock = g[g.kernel == "stock.gather_qmm"].gbps.max()
        tuned = g[g.kernel.str.startswith("tuned.") & (g.kernel != "tuned.auto")]
        best = tuned.loc[tuned.gbps.idxmax()] if len(tuned) else None
        roof = g[(g.kernel == "ref.bandwidth")].gbps.max()
        rows.append(dict(E=E, K=K, N=N, m=m, stock_gbps=stock,
                         tuned_kernel=None if best is None else best.kernel,
                         tuned_config=None if best is None else best.config,
                         tuned_gbps=None if best is None else best.gbps,
                         roofline_gbps=roof,
                         speedup=None if best is None or not stock else best.gbps / stock))
    return pd.DataFrame(rows)

summary = best_per_m(ok)
summary.round(2)
'''

CLIFF_PLOTS = '''\
shapes = ok[["experts", "k", "n"]].drop_duplicates().sort_values(["k", "n"], ascending=[False, False])
fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.5), squeeze=False)
for ax, (_, s) in zip(axes[0], shapes.iterrows()):
    d = ok[(ok.experts == s.experts) & (ok.k == s.k) & (ok.n == s.n)]
    plot.plot_cliff(d, ax=ax)
fig.tight_layout()
plt.show()
'''

SPEEDUP_PLOT = '''\
fig, ax = plt.subplots(figsize=(6.5, 4))
plot.plot_speedup(ok, ax=ax)
fig.tight_layout()
plt.show()
'''

BASELINE_CHECK = '''\
# DESIGN.md's stock baselines (E=128, top-8, K=2816, N=1408, 4-bit gs64): the committed sweep
# should reproduce them within noise.
design = {1: 841, 4: 302, 16: 87, 64: 23}
seed = summary[(summary.K == 2816) & (summary.N == 1408)].set_index("m")
pd.DataFrame([dict(m=m, design_gbps=g, measured_gbps=seed.stock_gbps.get(m),
                   ratio=(seed.stock_gbps.get(m) or float("nan")) / g) for m, g in design.items()]).round(3)
'''

REPORT_MD = """\
# Tuning report: the shipped H100 tables

`mlx-moe-tune tune` searched every kernel family's valid tile space at each m bucket, verified
every candidate against the reference before timing it, and wrote the winners to the tables
shipped in `mlx_moe_tune/tables/` (schema: `docs/tuning.md`). This notebook shows the tables,
the GB/s of every (config, m) the tuner measured, the speedup over stock `mx.gather_qmm`, the
rerun check (does each table reproduce its recorded GB/s?) and how far the untuned heuristic
falls behind the tuned choice on shapes held back from it."""

LOAD_TABLES = '''\
shipped = [t for t, err in tables.load_dir(tables.SHIPPED_DIR) if t is not None and t.backend == "cuda"]
if not shipped:
    raise FileNotFoundError(f"no shipped CUDA tables in {tables.SHIPPED_DIR}")
rows = []
for t in shipped:
    for b in t.buckets:
        rows.append(dict(device=t.device, E=t.E, K=t.K, N=t.N, m=b.m, family=b.family,
                         config=tables.Bucket.to_json(b)["config_id"], gbps=b.gbps,
                         stock_gbps=b.stock_gbps, speedup=b.speedup))
table_df = pd.DataFrame(rows).sort_values(["K", "N", "m"])
print(f"{len(shipped)} tables, device {shipped[0].device}, MLX {shipped[0].mlx_version}")
table_df.round(2)
'''

LOAD_TUNE = '''\
tune_csv = RESULTS / "tune.csv"
cands = pd.read_csv(tune_csv)
print(cands.status.value_counts().to_string())
cands.groupby(["k", "n", "m"]).status.value_counts().unstack(fill_value=0).head(12)
'''

HEATMAPS = '''\
tuned = cands[cands.kernel.str.startswith("tuned.") & (cands.status == "ok")].copy()
shapes = tuned[["experts", "k", "n"]].drop_duplicates().sort_values(["k", "n"])
fig, axes = plt.subplots(len(shapes), 1, figsize=(9, 5.5 * len(shapes)), squeeze=False)
for ax, (_, s) in zip(axes[:, 0], shapes.iterrows()):
    d = tuned[(tuned.experts == s.experts) & (tuned.k == s.k) & (tuned.n == s.n)]
    plot.plot_heatmap(d, ax=ax)
fig.tight_layout()
plt.show()
'''

TABLE_SPEEDUP = '''\
# speedup of the tuned choice over stock mx.gather_qmm, per shape, from the tables
as_rows = pd.concat([
    table_df.assign(kernel="tuned", config=table_df.config, gbps=table_df.gbps),
    table_df.assign(kernel="stock.gather_qmm", config="", gbps=table_df.stock_gbps),
]).rename(columns={"E": "experts", "K": "k", "N": "n"})
as_rows["status"] = "ok"
fig, ax = plt.subplots(figsize=(6.5, 4))
plot.plot_speedup(as_rows, ax=ax)
fig.tight_layout()
plt.show()
'''

RECHECK = '''\
recheck = pd.DataFrame(json.loads((RESULTS / "tune-recheck.json").read_text()))
print(f"{recheck.within_10pct.sum()}/{len(recheck)} buckets reproduce their recorded GB/s within 10%")
recheck[["K", "N", "m", "family", "config", "recorded_gbps", "rerun_gbps", "ratio", "within_10pct"]].round(3)
'''

GAP = '''\
gap = pd.DataFrame(json.loads((RESULTS / "tune-gap.json").read_text()))
cols = ["K", "N", "m", "tuned_config", "tuned_gbps", "heuristic_source", "heuristic_config",
        "heuristic_gbps", "heuristic_gap", "rule_config", "rule_gbps", "rule_gap"]
print("heuristic (nearest other shape's table): mean gap "
      f"{gap.heuristic_gap.mean():.1%}, worst {gap.heuristic_gap.max():.1%}")
print(f"rule (no table at all): mean gap {gap.rule_gap.mean():.1%}, worst {gap.rule_gap.max():.1%}")
gap[[c for c in cols if c in gap.columns]].round(3)
'''

LOOKUP = '''\
# what mlx_moe_tune.gather_qmm picks at run time (no host sync: m comes from shapes)
from mlx_moe_tune.backend import CUDA
from mlx_moe_tune.kernels.family import Problem

t = shipped[0]
demo = []
for tokens in (1, 4, 32, 256, 1024):
    p = Problem(experts=t.E, k=t.K, n=t.N, rows=tokens * 8, bits=t.bits, group_size=t.group_size,
                mode=t.mode, dtype=t.dtype)
    m = tables.estimate_m(p, top_k=8)
    c = tables.choose(p, CUDA, top_k=8, table_dir=ROOT / "no-user-tables")
    demo.append(dict(tokens=tokens, rows=p.rows, m_estimate=round(m, 2), bucket=c.bucket.m if c.bucket else None,
                     family=c.family, config=tables.Bucket(0, c.family, c.config).to_json()["config_id"],
                     source=c.source))
pd.DataFrame(demo)
'''


def regime_cliff():
    return new_notebook(cells=[
        new_markdown_cell(CLIFF_MD),
        new_code_cell(SETUP),
        new_code_cell(LOAD_SWEEPS),
        new_markdown_cell("## Best tuned config vs stock, per m"),
        new_code_cell(CLIFF_TABLE),
        new_markdown_cell("## The cliff: GB/s vs m (log2), stock vs tuned vs the bandwidth roofline"),
        new_code_cell(CLIFF_PLOTS),
        new_markdown_cell("## Speedup of the best tuned kernel over stock `mx.gather_qmm`"),
        new_code_cell(SPEEDUP_PLOT),
        new_markdown_cell("## Stock baselines vs DESIGN.md"),
        new_code_cell(BASELINE_CHECK),
    ])


def tuning_report():
    return new_notebook(cells=[
        new_markdown_cell(REPORT_MD),
        new_code_cell(SETUP),
        new_markdown_cell("## The shipped tables"),
        new_code_cell(LOAD_TABLES),
        new_markdown_cell("## Every candidate the tuner measured\n\nStatus `wrong` (failed verification) "
                          "and `error` (raised) candidates are recorded and never chosen."),
        new_code_cell(LOAD_TUNE),
        new_markdown_cell("## GB/s per (config, m)"),
        new_code_cell(HEATMAPS),
        new_markdown_cell("## Speedup over stock, per shape"),
        new_code_cell(TABLE_SPEEDUP),
        new_markdown_cell("## Rerun check: fresh inputs, no cache, the chosen configs only"),
        new_code_cell(RECHECK),
        new_markdown_cell("## Heuristic vs tuned on held-back shapes\n\nEach shape is held back in turn: "
                          "the heuristic borrows the nearest *other* tuned shape's choice (what a user with an "
                          "untuned model gets), the rule uses no table at all. Gap = 1 - its GB/s / tuned GB/s."),
        new_code_cell(GAP),
        new_markdown_cell("## Run-time lookup"),
        new_code_cell(LOOKUP),
    ])


NOTEBOOKS = {"regime_cliff.ipynb": regime_cliff, "tuning_report.ipynb": tuning_report}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--execute", action="store_true", help="run them and save the outputs")
    args = ap.parse_args(argv)
    for name, make in NOTEBOOKS.items():
        nb = make()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = HERE / name
        if args.execute:
            from nbclient import NotebookClient

            NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
