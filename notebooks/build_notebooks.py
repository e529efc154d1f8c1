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
%matplotlib inline
import json, os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from mlx_moe_tune import plot, tables

ROOT = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
RESULTS = Path(os.environ.get("MLX_MOE_TUNE_RESULTS", ROOT / "sweeps" / "results" / "h100"))
TUNE = RESULTS / "tune"  # the tuner run behind the shipped tables (tune.csv, rechecks, heuristic gap)
print("results:", RESULTS)
'''

LOAD_SWEEPS = '''\
def load_sweeps(folder):
    """Every sweep CSV of the folder with its JSON sidecar, plus the tuner's candidate list
    (tune.csv: every config of every family at every m, timed by the same timer)."""
    frames, metas = [], {}
    for csv in sorted(Path(folder).glob("*.csv")):
        df = plot.load(csv)
        df["source"] = csv.stem
        frames.append(df)
        if csv.with_suffix(".json").exists():
            metas[csv.stem] = json.loads(csv.with_suffix(".json").read_text())
    if not frames:
        raise FileNotFoundError(f"no sweep CSV in {folder}")
    return pd.concat(frames, ignore_index=True), metas

df, metas = load_sweeps(RESULTS)
print(f"{len(df)} rows from {', '.join(sorted(df.source.unique()))}")
print(df.groupby("kernel").status.value_counts().unstack(fill_value=0).to_string())
for name, meta in metas.items():
    dev = meta.get("device", {})
    dev = dev.get("device_name", dev) if isinstance(dev, dict) else dev
    print(f"{name}: device={dev} mlx={meta.get('mlx_version', meta.get('mlx'))} date={meta.get('date')}")
'''

CLIFF_MD = """\
# The regime cliff: stock vs tuned gather_qmm on an H100

A MoE layer multiplies each expert's rows by that expert's quantized weights. With `m` rows per
expert, a kernel that reuses each dequantized weight tile for all `m` rows stays bound by
streaming the weights, so its GB/s (bytes of the active experts' weights / median time) stays
flat as `m` grows. MLX's stock kernels re-read the weights per row (CUDA) or per row tile:
their time grows with `m` and their GB/s falls off a cliff. The tuned kernels (`tuned.*`, best
tile config per `m`) should stay near the bandwidth measured in the same run (`ref.bandwidth`).

Data: the committed H100 sweeps (`sweeps/results/h100/*.csv` + JSON sidecars) and the tuner's
candidate list (`tune.csv`)."""

CLIFF_TABLE = '''\
sp = plot.speedups(df)  # per shape and m: best tuned config vs stock
probe = plot.probe_gbps(df)
print(f"measured read bandwidth (ref.bandwidth): {probe:,.0f} GB/s" if probe else "no bandwidth probe rows")
if probe and len(sp):
    sp["tuned_pct_of_probe"] = 100 * sp.tuned_gbps / probe
sp.round(2)
'''

CLIFF_PLOTS = '''\
groups = plot.shapes(df)
fig, axes = plt.subplots(len(groups), 1, figsize=(12, 5 * len(groups)), squeeze=False, constrained_layout=True)
for ax, (key, d) in zip(axes[:, 0], groups):
    plot.plot_cliff(d, ax=ax)
plt.show()
'''

SPEEDUP_PLOT = '''\
fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
plot.plot_speedup(df, ax=ax)
plt.show()
'''

BASELINE_CHECK = '''\
# DESIGN.md's stock baselines (E=128, top-8, K=2816, N=1408, 4-bit gs64, bf16, H100): the
# committed sweep should reproduce them within noise.
design = {1: 841, 4: 302, 16: 87, 64: 23}
st = df[(df.kernel == "stock.gather_qmm") & (df.k == 2816) & (df.n == 1408) & (df.status == "ok")]
st = st.groupby("m").gbps.median()
pd.DataFrame([dict(m=m, design_gbps=g, measured_gbps=st.get(m), ratio=st.get(m, float("nan")) / g)
              for m, g in design.items()]).round(3)
'''

REPORT_MD = """\
# Tuning report: the shipped H100 tables

`mlx-moe-tune tune` searched every kernel family's valid tile space at each m bucket, verified
every candidate against the reference before timing it, and wrote the winners to the tables
shipped in `mlx_moe_tune/tables/` (schema: `docs/tuning.md`). Below: the tables, the GB/s of
every (config, m) the tuner measured, the speedup over stock `mx.gather_qmm`, the rerun check
(does each table reproduce its recorded GB/s on fresh inputs?) and how far the untuned
heuristic falls behind the tuned choice on shapes held back from it."""

LOAD_TABLES = '''\
TABLES = Path(os.environ.get("MLX_MOE_TUNE_REPORT_TABLES", tables.SHIPPED_DIR))
shipped = [t for t, err in tables.load_dir(TABLES) if t is not None]
if (TUNE / "tune.csv").exists():  # tables of the device these results come from (H100, H200, ...)
    devices = set(pd.read_csv(TUNE / "tune.csv", usecols=["device"]).device.dropna())
    shipped = [t for t in shipped if t.device in devices] or shipped
if not shipped:
    print(f"No tuning table is shipped in {TABLES} yet: the H100 tune run was not made in this session.\\n"
          "The sections below fall back to the committed per-config H100 sweeps where they can.")
table_df = pd.DataFrame([dict(E=t.E, K=t.K, N=t.N, m=b.m, family=b.family, config=b.to_json()["config_id"],
                              gbps=b.gbps, stock_gbps=b.stock_gbps, speedup=b.speedup)
                         for t in shipped for b in t.buckets],
                        columns=["E", "K", "N", "m", "family", "config", "gbps", "stock_gbps", "speedup"]).sort_values(["K", "N", "m"])
for t in shipped:
    print(f"{t.path.name}\\n  mlx {t.mlx_version}, {t.meta.get('created')}, candidates per bucket "
          f"{ {m: c for m, c in t.meta.get('candidates', {}).items()} }")
table_df.round(2)
'''

LOAD_TUNE = '''\
if (TUNE / "tune.csv").exists():
    cands = plot.load(TUNE / "tune.csv")
else:  # no tuner run committed: every (config, m) of the committed per-config sweeps
    cands = pd.concat([plot.load(f) for f in sorted(RESULTS.glob("*.csv"))], ignore_index=True)
    print("no tune.csv: using the committed sweeps' per-config rows")
tuned = cands[cands.kernel.str.startswith("tuned.") & (cands.config.astype(str).str.len() > 0)
              & (cands.config.astype(str) != "auto")]
print(f"{len(tuned)} candidate measurements (shape x m x config):")
print(tuned.status.value_counts().to_string())
bad = tuned[tuned.status.isin(["wrong", "error"])]
bad[[c for c in ("k", "n", "m", "kernel", "config", "status", "message") if c in bad.columns]].drop_duplicates(
    ["kernel", "config", "status"]).head(10)
'''

HEATMAPS = '''\
# one heatmap per shape: every family's configs as rows ("qmv FN1_WN2_WK1"), m as columns
hm = tuned[(tuned.status == "ok") & tuned.gbps.notna() & (tuned.get("router", "balanced") == "balanced")]
hm = hm.assign(config=hm.kernel.str.replace("tuned.", "", regex=False) + " " + hm.config.astype(str), kernel="tuned")
groups = [(k, d) for k, d in plot.shapes(hm) if len(d)]
fig, axes = plt.subplots(len(groups), 1, figsize=(9, 7 * len(groups)), squeeze=False, constrained_layout=True)
for ax, (key, d) in zip(axes[:, 0], groups):
    plot.plot_heatmap(d, "tuned", ax=ax)
plt.show()
'''

TABLE_SPEEDUP = '''\
# the tables' chosen config vs stock mx.gather_qmm (both as recorded by the tuner); without a
# shipped table, the best config per m of the per-config rows vs the stock rows beside them
rows = []
for t in shipped:
    for b in t.buckets:
        base = dict(matrix=f"K={t.K}", experts=t.E, k=t.K, n=t.N, m=b.m, mode=t.mode, bits=t.bits,
                    group_size=t.group_size, dtype=t.dtype, device=t.device, backend=t.backend, status="ok")
        rows.append(dict(base, kernel=f"tuned.{b.family}", config=b.to_json()["config_id"], gbps=b.gbps))
        if b.stock_gbps:
            rows.append(dict(base, kernel="stock.gather_qmm", config="", gbps=b.stock_gbps))
sp_rows = pd.DataFrame(rows) if rows else pd.concat([tuned, cands[cands.kernel == "stock.gather_qmm"]])
fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
plot.plot_speedup(sp_rows, ax=ax)
ax.set_yscale("log")
plt.show()
'''

RECHECK = '''\
# tune-recheck.json: right after the tune, same process; tune-check.json: `mlx-moe-tune tune --check`
# in a separate process on the tables as shipped
reruns = []
for name, what in (("tune-recheck.json", "same process"), ("tune-check.json", "separate process")):
    path = TUNE / name
    if not path.exists():
        print(f"no rerun committed ({name}): run `mlx-moe-tune tune ... --recheck -o DIR` / `tune --check -o DIR`")
        continue
    r = pd.DataFrame(json.loads(path.read_text())).assign(run=what)
    print(f"{what}: {int(r.within_10pct.sum())}/{len(r)} buckets reproduce their recorded GB/s within 10% "
          f"(rerun / recorded: min {r.ratio.min():.3f}, median {r.ratio.median():.3f}, max {r.ratio.max():.3f})")
    reruns.append(r)
if reruns:
    display(pd.concat(reruns)[["run", "K", "N", "m", "family", "config", "recorded_gbps", "rerun_gbps", "ratio",
                               "within_10pct"]].round(3))
'''

GAP = '''\
gap_path = TUNE / "tune-gap.json"
if gap_path.exists():
    gap = pd.DataFrame(json.loads(gap_path.read_text()))
    for name in ("heuristic", "rule"):
        g = gap[f"{name}_gap"].dropna()
        if len(g):
            print(f"{name}: mean gap {g.mean():.1%}, median {g.median():.1%}, worst {g.max():.1%} over {len(g)} buckets")
    cols = ["K", "N", "m", "tuned_config", "tuned_gbps", "heuristic_source", "heuristic_config",
            "heuristic_gbps", "heuristic_gap", "rule_config", "rule_gbps", "rule_gap"]
    display(gap[[c for c in cols if c in gap.columns]].round(3))
else:
    print(f"no heuristic-gap run committed ({gap_path.name}): run `mlx-moe-tune tune ... --heuristic-gap -o DIR`")
'''

LOOKUP = '''\
# what mlx_moe_tune.gather_qmm picks on this device for a batch of tokens: m is estimated from
# shapes only (expected active experts under uniform top-k routing, no host sync), then the
# nearest m bucket (log2) of the table wins
from mlx_moe_tune.kernels.family import Problem

if shipped:
    t = shipped[0]
    top_k = int(t.meta.get("top_k", 8))
    demo = []
    for tokens in (1, 4, 32, 256, 1024):
        p = Problem(experts=t.E, k=t.K, n=t.N, rows=tokens * top_k, bits=t.bits, group_size=t.group_size,
                    mode=t.mode, dtype=t.dtype)
        m = tables.estimate_m(p, top_k=top_k)
        b = t.bucket(m)
        demo.append(dict(tokens=tokens, rows=p.rows, m_estimate=round(m, 2), bucket=b.m, family=b.family,
                         config=b.to_json()["config_id"], table_gbps=b.gbps))
    print(f"{t.device}, E={t.E} K={t.K} N={t.N}")
    display(pd.DataFrame(demo))
else:
    p = Problem(experts=128, k=2816, n=1408, rows=32 * 8)
    print("no shipped table: m estimate for 32 tokens, top-8, E=128:", round(tables.estimate_m(p, top_k=8), 2))
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
