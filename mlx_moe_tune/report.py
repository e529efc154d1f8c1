"""`mlx-moe-tune report RESULTS.csv`: a sweep as a markdown table, ready to paste into a discussion.

One table per problem shape (a sweep preset may hold several, e.g. N=1408 and N=704), one line
per m: the stock gather_qmm GB/s, the best tuned kernel's GB/s and config, the speedup and the
tuned kernel's share of the bandwidth roofline measured in the same run (`ref.bandwidth`).
Only rows with status "ok" count; a kernel that failed at some m simply does not compete there.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

# Columns that identify one problem shape in a sweep CSV (H-sweep's schema); those missing from
# a file are ignored.
SHAPE_COLUMNS = ("experts", "top_k", "k", "n", "mode", "bits", "group_size", "dtype", "router")
REQUIRED = ("kernel", "m", "gbps", "status")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="sweep results (CSV written by `mlx-moe-tune sweep`)")
    p.add_argument(
        "--stock",
        default=None,
        help="stock kernel to compare against (default: the faster stock.gather_qmm* layout per m)",
    )
    p.add_argument("-o", "--output", default=None, help="write the markdown here instead of stdout")


def _fmt(x: float, digits: int = 0) -> str:
    """`digits` decimals, more where that would show fewer than 3 significant digits: GB/s
    over 10 as integers (2,430), a CPU's 0.0542 GB/s as 0.0542, not 0."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    if x != 0 and math.isfinite(x) and abs(x) < 10:
        digits = max(digits, 2 - math.floor(math.log10(abs(x))))
    return f"{x:,.{digits}f}"


def _speedup(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{_fmt(x)}x"


def _best(rows, column: str = "gbps"):
    """The row with the highest `column`, or None."""
    if rows.empty:
        return None
    return rows.loc[rows[column].idxmax()]


def _v(x):
    """Shape value as written: 128 rather than 128.0 (a column with gaps is read as float)."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def shape_title(key: dict) -> str:
    key = {k: _v(v) for k, v in key.items()}
    parts = []
    if "experts" in key:
        parts.append(f"E={key['experts']}")
    if "top_k" in key:
        parts.append(f"top-{key['top_k']}")
    if "k" in key and "n" in key:
        parts.append(f"K={key['k']} N={key['n']}")
    if "bits" in key:
        mode = key.get("mode", "affine")
        gs = f" gs{key['group_size']}" if "group_size" in key else ""
        parts.append(f"{mode} {key['bits']}-bit{gs}")
    for name in ("dtype", "router"):
        if name in key:
            parts.append(str(key[name]))
    return ", ".join(parts)


def table(df, stock: str | None = None) -> str:
    """Markdown for one problem shape's rows (all m)."""
    ok = df[df["status"].astype(str) == "ok"]
    has_roof = "pct_roofline" in ok.columns
    lines = [
        "| m | stock GB/s | best tuned GB/s | tuned config | speedup | % of roofline |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for m in sorted(df["m"].unique()):
        at = ok[ok["m"] == m]
        if stock is not None:
            st = _best(at[at["kernel"] == stock])
        else:
            st = _best(at[at["kernel"].astype(str).str.startswith("stock.gather_qmm")])
        tu = _best(at[at["kernel"].astype(str).str.startswith("tuned.")])
        stock_gbps = float(st["gbps"]) if st is not None else float("nan")
        if tu is not None:
            config = str(tu.get("config", "") or "")
            name = str(tu["kernel"])[len("tuned."):]
            label = f"`{name} {config}`" if config else f"`{name}`"
            tuned_gbps = float(tu["gbps"])
            roof = float(tu["pct_roofline"]) if has_roof else float("nan")
        else:
            label, tuned_gbps, roof = "-", float("nan"), float("nan")
        speedup = tuned_gbps / stock_gbps if stock_gbps > 0 else float("nan")
        speed = _speedup(speedup)
        lines.append(
            f"| {m:g} | {_fmt(stock_gbps)} | {_fmt(tuned_gbps)} | {label} | {speed} | {_fmt(roof, 1)} |"
        )
    return "\n".join(lines)


def render(df, stock: str | None = None) -> str:
    import pandas as pd  # noqa: F401  (df is a DataFrame)

    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"not a sweep CSV: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise ValueError("the sweep CSV has no rows")
    if stock is not None:
        present = sorted({str(k) for k in df["kernel"].dropna().unique() if str(k) not in ("ref.bandwidth", "*")})
        if stock not in present:
            raise ValueError(f"--stock {stock!r}: no such kernel in this CSV; expected one of {', '.join(present)}")
    out = []
    head = []
    for col in ("device", "backend"):
        if col in df.columns:
            vals = sorted({str(v) for v in df[col].dropna().unique()})
            if vals:
                head.append(f"{col}: {', '.join(vals)}")
    if head:
        out.append("**" + "; ".join(head) + "**\n")
    # The bandwidth probe does not depend on the shape (its shape columns may be empty).
    bw = df[(df["kernel"] == "ref.bandwidth") & (df["status"].astype(str) == "ok")]
    if not bw.empty:
        out.append(f"Measured bandwidth (ref.bandwidth): {_fmt(float(bw['gbps'].median()))} GB/s\n")
    df = df[df["kernel"] != "ref.bandwidth"]
    keys = [c for c in SHAPE_COLUMNS if c in df.columns]
    groups = df.groupby(keys, sort=True, dropna=False) if keys else [((), df)]
    for vals, sub in groups:
        vals = vals if isinstance(vals, tuple) else (vals,)
        key = {k: v for k, v in zip(keys, vals) if not (isinstance(v, float) and math.isnan(v))}
        if key:
            out.append(f"### {shape_title(key)}\n")
        out.append(table(sub, stock) + "\n")
    return "\n".join(out)


def run(args) -> int:
    import pandas as pd

    path = Path(args.csv)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable CSV ({msg})") from None
    if "gbps" in df.columns:  # a torn or hand-edited value must not make the column text
        df["gbps"] = pd.to_numeric(df["gbps"], errors="coerce")
    if "pct_roofline" in df.columns:
        df["pct_roofline"] = pd.to_numeric(df["pct_roofline"], errors="coerce")
    text = render(df, args.stock)
    if args.output:
        from .safeio import atomic_write_text

        out = Path(args.output)
        if out.is_dir():
            raise ValueError(f"-o {out}: is a directory; expected a file name for the markdown")
        if not out.parent.exists():
            raise ValueError(f"-o {out}: directory {out.parent} does not exist")
        atomic_write_text(out, text)
    else:
        print(text)
    return 0
