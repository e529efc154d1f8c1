"""`mlx-moe-tune plot RESULTS.csv -o cliff.png [--kind cliff|heatmap|speedup]` and the same plots
as functions for notebooks: `plot_cliff(df, ax=None)`, `plot_heatmap(df, kernel, ax=None)`,
`plot_speedup(df, ax=None)`. `df` is a sweep CSV read with pandas (`load(path)`).

The cliff: GB/s vs m (rows per expert, log2 axis), one line per kernel (tuned kernels: the best
config at each m, optionally every config faint), the bandwidth measured in the same run and
the device's published peak as horizontal lines, and the two regimes marked: few rows per
expert (qmv: a weight is used by one row, nothing to reuse) and many (qmm: a kernel must reuse
each weight tile for all m rows, or its time grows with m and GB/s falls off the cliff).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

SHAPE_COLUMNS = ("matrix", "experts", "top_k", "k", "n", "mode", "bits", "group_size", "dtype", "router")
REGIME_M = 4  # MLX's stock Metal dispatch switches to its reuse kernel at m >= 4 rows per expert
KINDS = ("cliff", "heatmap", "speedup")


def load(path) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file") from None
    missing = [c for c in ("kernel", "m", "gbps", "status") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a sweep CSV (missing column(s) {', '.join(missing)})")
    df["config"] = df["config"].fillna("").astype(str) if "config" in df.columns else ""
    return df


def _ok(df):
    return df[(df["status"].astype(str) == "ok") & df["gbps"].notna()]


def shapes(df) -> list[tuple[dict, "pd.DataFrame"]]:  # noqa: F821
    """(shape key, rows) per problem shape; ref.bandwidth rows go with every shape."""
    probe = df[df["kernel"] == "ref.bandwidth"]
    rest = df[df["kernel"] != "ref.bandwidth"]
    keys = [c for c in SHAPE_COLUMNS if c in rest.columns and rest[c].notna().any()]
    if rest.empty:
        return []
    if not keys:
        return [({}, df)]
    out = []
    for vals, sub in rest.groupby(keys, sort=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        key = dict(zip(keys, vals))
        pr = probe
        if "matrix" in key and "matrix" in probe.columns:  # the probe measured beside this matrix
            same = probe[probe["matrix"] == key["matrix"]]
            pr = same if not same.empty else probe
        out.append((key, _concat(sub, pr)))
    return out


def _concat(a, b):
    import pandas as pd

    return pd.concat([a, b], ignore_index=True)


def _v(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def title(df, key: dict | None = None) -> str:
    """'NVIDIA H100 80GB HBM3 (cuda) | E=128 top-8 K=2816 N=1408 (gate_up) | affine 4-bit gs64 bfloat16'."""
    first = df.iloc[0]
    dev = str(first.get("device", "")) if "device" in df.columns else ""
    be = str(first.get("backend", "")) if "backend" in df.columns else ""
    key = key or {c: first[c] for c in SHAPE_COLUMNS if c in df.columns and not _isnan(first[c])}
    key = {k: _v(v) for k, v in key.items()}
    shape = " ".join(f"{lbl}{key[c]}" for c, lbl in (("experts", "E="), ("top_k", "top-"), ("k", "K="), ("n", "N="))
                     if c in key)
    if key.get("matrix") not in (None, ""):
        shape += f" ({key['matrix']})"
    fmt = " ".join(str(x) for x in (key.get("mode"), f"{key['bits']}-bit" if "bits" in key else None,
                                        f"gs{key['group_size']}" if "group_size" in key else None,
                                        key.get("dtype")) if x)
    if key.get("router") not in (None, "", "balanced"):
        fmt += f", {key['router']} routing"
    parts = [p for p in (f"{dev} ({be})" if dev else be, shape, fmt) if p]
    return " | ".join(parts)


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _new_ax(ax, figsize=(12, 5.5)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return ax


def _log2_x(ax, ms):
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ms = sorted({int(m) for m in ms})
    ax.xaxis.set_major_locator(FixedLocator(ms))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("m = rows per expert (log2)")


def probe_gbps(df) -> float | None:
    """Median over points of the best read probe (ref.bandwidth sum/rowsum) in these rows."""
    pr = _ok(df[df["kernel"] == "ref.bandwidth"])
    if pr.empty:
        return None
    read = pr[pr["config"].isin(("sum", "rowsum"))]
    read = read if not read.empty else pr
    keys = [c for c in ("matrix", "m") if c in read.columns]
    best = read.groupby(keys)["gbps"].max() if keys else read["gbps"]
    return float(best.median())


def best_per_m(rows):
    """The best (highest GB/s) row at each m."""
    rows = _ok(rows)
    if rows.empty:
        return rows
    return rows.loc[rows.groupby("m")["gbps"].idxmax()].sort_values("m")


def plot_cliff(df, ax=None, configs: bool = False, peak: bool = True):
    """GB/s vs m for every kernel in `df` (one problem shape; with several, labels carry the
    matrix name). Returns the axes."""
    ax = _new_ax(ax)
    groups = shapes(df)
    if not groups:
        raise ValueError("no kernel rows to plot")
    many = len(groups) > 1
    styles = ["-", "--", ":", "-."]
    all_m = []
    for gi, (key, sub) in enumerate(groups):
        sfx = f" [{key.get('matrix', gi)}]" if many else ""
        for kname in [k for k in dict.fromkeys(sub["kernel"]) if k != "ref.bandwidth"]:
            rows = _ok(sub[sub["kernel"] == kname])
            if rows.empty:
                continue
            tuned = rows["config"].astype(str).str.len().gt(0).any()
            if tuned:
                if configs:
                    for cid, cr in rows.groupby("config"):
                        cr = cr.sort_values("m")
                        ax.plot(cr["m"], cr["gbps"], color="gray", alpha=0.25, lw=0.8)
                best = best_per_m(rows)
                line = ax.plot(best["m"], best["gbps"], styles[gi % 4], marker="o", lw=2,
                               label=f"{kname} (best config per m){sfx}")
            else:
                r = rows.groupby("m", as_index=False)["gbps"].median().sort_values("m")
                line = ax.plot(r["m"], r["gbps"], styles[gi % 4], marker="o", ms=4, label=f"{kname}{sfx}")
            all_m.extend(rows["m"].tolist())
            del line
    bw = probe_gbps(df)
    if bw:
        ax.axhline(bw, color="black", ls="--", lw=1, label=f"measured read bandwidth (ref.bandwidth): {bw:,.0f} GB/s")
    dev = str(df["device"].dropna().iloc[0]) if "device" in df.columns and df["device"].notna().any() else ""
    if peak and dev:
        from .info import peak_bandwidth

        pk = peak_bandwidth(dev)
        if pk:
            ax.axhline(pk[0], color="firebrick", ls=":", lw=1.2, label=f"published peak ({pk[1]}): {pk[0]:,.0f} GB/s")
    _log2_x(ax, all_m)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.3g}"))
    ax.set_ylabel("GB/s (weight bytes of active experts / median time)")
    if all_m and min(all_m) < REGIME_M <= max(all_m):
        ax.axvline(REGIME_M, color="gray", lw=0.8, ls="-.")
        ax.axvspan(min(all_m) / 1.2, REGIME_M, color="tab:blue", alpha=0.05)
        y = 0.02
        ax.text(REGIME_M / 1.1, y, "qmv regime:\nno reuse needed", transform=ax.get_xaxis_transform(), ha="right",
                va="bottom", fontsize=8, color="dimgray")
        ax.text(REGIME_M * 1.1, y, "qmm regime: each weight tile must be\nreused for all m rows (or GB/s falls)",
                transform=ax.get_xaxis_transform(), ha="left", va="bottom", fontsize=8, color="dimgray")
    ax.set_title(title(df, groups[0][0] if not many else {k: v for k, v in groups[0][0].items()
                                                           if k not in ("matrix", "n", "k")}), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    # outside the axes: inside, it would hide the probe/peak lines or the m=1 points
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return ax


def plot_heatmap(df, kernel: str, ax=None):
    """GB/s of every config (rows) at every m (columns) of one kernel and problem shape."""
    import numpy as np

    rows = _ok(df[df["kernel"] == kernel])
    if rows.empty:
        raise ValueError(f"no ok rows for kernel {kernel!r}; kernels here: {', '.join(sorted(set(df['kernel'])))}")
    groups = shapes(rows)
    key, rows = groups[0]
    piv = rows.pivot_table(index="config", columns="m", values="gbps", aggfunc="median")
    piv = piv.loc[piv.max(axis=1).sort_values(ascending=False).index]
    ax = _new_ax(ax, figsize=(max(6, 0.8 * piv.shape[1] + 3), max(3, 0.28 * piv.shape[0] + 1.5)))
    im = ax.imshow(piv.values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(piv.shape[1]), [str(_v(float(m))) for m in piv.columns])
    ax.set_yticks(range(piv.shape[0]), [c or "(default)" for c in piv.index], fontsize=7)
    ax.set_xlabel("m = rows per expert")
    ax.set_ylabel("config")
    if piv.size <= 400:
        vmax = np.nanmax(piv.values)
        for i in range(piv.shape[0]):
            for j in range(piv.shape[1]):
                v = piv.values[i, j]
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 * vmax else "white")
    ax.figure.colorbar(im, ax=ax, label="GB/s")
    ax.set_title(f"{kernel}: GB/s by config and m\n{title(rows, key)}", fontsize=9)
    return ax


def speedups(df, stock: str = "stock.gather_qmm"):
    """Per shape and m: best tuned GB/s / stock GB/s (a DataFrame)."""
    import pandas as pd

    out = []
    for key, sub in shapes(df):
        ok = _ok(sub)
        st = ok[ok["kernel"] == stock].groupby("m")["gbps"].max()
        tu = best_per_m(ok[ok["kernel"].astype(str).str.startswith("tuned.")]).set_index("m")
        for m in sorted(set(st.index) & set(tu.index)):
            out.append(dict(key, m=m, stock_gbps=st[m], tuned_gbps=tu.loc[m, "gbps"], kernel=tu.loc[m, "kernel"],
                            config=tu.loc[m, "config"], speedup=tu.loc[m, "gbps"] / st[m]))
    return pd.DataFrame(out)


def plot_speedup(df, ax=None, stock: str = "stock.gather_qmm"):
    """Best tuned kernel's GB/s over the stock kernel's, per m (one line per shape)."""
    sp = speedups(df, stock)
    if sp.empty:
        raise ValueError(f"no m where both a tuned.* kernel and {stock} have ok rows: nothing to compare")
    ax = _new_ax(ax)
    label_col = "matrix" if "matrix" in sp.columns else None
    for name, sub in (sp.groupby(label_col, sort=False) if label_col else [("", sp)]):
        sub = sub.sort_values("m")
        n = f" N={_v(sub['n'].iloc[0])}" if "n" in sub.columns else ""
        ax.plot(sub["m"], sub["speedup"], marker="o", label=f"{name}{n}".strip() or None)
    ax.axhline(1.0, color="black", lw=0.8)
    _log2_x(ax, sp["m"])
    ax.set_ylabel(f"speedup: best tuned / {stock}")
    ax.set_title(f"speedup vs {stock}\n{title(df)}", fontsize=9)
    ax.grid(True, alpha=0.3)
    if label_col:
        ax.legend(fontsize=8)
    return ax


# --- CLI -----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="sweep results (CSV from `mlx-moe-tune sweep`)")
    p.add_argument("-o", "--output", default=None, help="image file (.png, .svg, .pdf); default: CSV name + kind")
    p.add_argument("--kind", default="cliff", choices=KINDS)
    p.add_argument("--kernel", help="heatmap: which kernel (default: the first tuned.* kernel)")
    p.add_argument("--configs", action="store_true", help="cliff: also draw every tuned config faintly")


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    df = load(args.csv)
    out = Path(args.output) if args.output else Path(args.csv).with_name(Path(args.csv).stem + f"-{args.kind}.png")
    if out.is_dir():
        raise ValueError(f"-o {out}: is a directory; give an image file name")
    if out.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise ValueError(f"-o {out}: unsupported image type {out.suffix!r} (use .png, .svg or .pdf)")
    if args.kind == "cliff":
        groups = shapes(df)
        if not groups:
            raise ValueError(f"{args.csv}: no kernel rows to plot")
        fig, axes = plt.subplots(len(groups), 1, figsize=(12, 5 * len(groups)), squeeze=False, constrained_layout=True)
        for ax, (key, sub) in zip(axes[:, 0], groups):
            plot_cliff(sub, ax=ax, configs=args.configs)
    elif args.kind == "heatmap":
        kernel = args.kernel
        if kernel is None:
            tuned = [k for k in dict.fromkeys(df["kernel"]) if str(k).startswith("tuned.")]
            if not tuned:
                raise ValueError("heatmap: no tuned.* kernel in this CSV (pass --kernel NAME)")
            kernel = tuned[0]
        ax = plot_heatmap(df, kernel)
        fig = ax.figure
    else:
        fig = plot_speedup(df).figure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=130)
    except OSError as e:
        raise ValueError(f"-o {out}: cannot write ({e.strerror or e})") from None
    plt.close(fig)
    print(f"wrote {out}")
    return 0
