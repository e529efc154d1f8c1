"""Tuning tables: which kernel family and tile config to run for a gather_qmm problem.

A table holds the tuner's decision for one (backend, device, format, shape) key, per m bucket
(m = rows per active expert). `lookup(problem, backend)` is what `mlx_moe_tune.gather_qmm`
calls on every op, so after the first call it does no I/O: every table directory is indexed
once and kept in memory (`clear_cache()` forgets it, e.g. after a tune wrote a new table).

Schema (version 1), one JSON file per key
-----------------------------------------
File name, self-describing like vLLM's fused-MoE configs (device name with every character
outside [A-Za-z0-9.-] replaced by "_"):

    E=128,K=2816,N=1408,device=NVIDIA_H100_80GB_HBM3,backend=cuda,mode=affine,bits=4,gs=64,dtype=bfloat16.json

Content:

    {
      "schema": "mlx-moe-tune/table",     # constant: what this file is
      "version": 1,                       # bumped on any incompatible change; readers reject others
      "key": {                            # what the table applies to
        "backend": "cuda",                # metal | cuda | emulator-metal | emulator-cuda
        "device": "NVIDIA H100 80GB HBM3",# mx.device_info()["device_name"] ("cpu" for the emulator)
        "mlx_version": "0.32.4",          # MLX the table was measured with (informational for lookup)
        "mode": "affine", "bits": 4, "group_size": 64, "dtype": "bfloat16",
        "E": 128, "K": 2816, "N": 1408
      },
      "buckets": [                        # sorted by m; at run time the nearest m (log2) wins
        {"m": 1, "family": "qmv", "config": {"BN": 8, ...}, "config_id": "BN8_...",
         "time_us": 95.1, "gbps": 2301.0, "stock_gbps": 841.0, "speedup": 2.74},
        ...
      ],
      "meta": {...}                       # free-form provenance: date, top_k, router, budget,
    }                                     # package version, commit, candidates tried per bucket

`stock_gbps` and `speedup` may be null when the stock kernel failed or was not measured.

Lookup order: a directory passed as `table_dir`, else `$MLX_MOE_TUNE_TABLES`, else
`~/.cache/mlx-moe-tune/tables/` (the user's tables, written by `mlx-moe-tune tune`); then the
tables shipped in this package (`mlx_moe_tune/tables/`); then `heuristic()` for shapes and
devices no table covers. Within a source, a table whose `mlx_version` matches the running MLX
is preferred over one that does not.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

SCHEMA = "mlx-moe-tune/table"
VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "tables"
ENV_VAR = "MLX_MOE_TUNE_TABLES"

_KEY_FIELDS = ("backend", "device", "mode", "bits", "group_size", "dtype", "E", "K", "N")


def user_dir(table_dir: str | os.PathLike | None = None) -> Path:
    """The user's table directory: the argument, else $MLX_MOE_TUNE_TABLES, else ~/.cache/..."""
    if table_dir is not None:
        return Path(table_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/mlx-moe-tune/tables").expanduser()


@lru_cache(maxsize=None)
def device_name(backend_name: str) -> str:
    """The device a table is keyed by: MLX's device name on a GPU, "cpu" for the emulator."""
    if backend_name.startswith("emulator"):
        return "cpu"
    import mlx.core as mx

    return str(mx.device_info().get("device_name", backend_name))


def mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]", "_", str(text))


@dataclass
class Bucket:
    m: int
    family: str
    config: dict[str, int] | None
    gbps: float | None = None
    time_us: float | None = None
    stock_gbps: float | None = None
    speedup: float | None = None

    def to_json(self) -> dict[str, Any]:
        from .kernels.family import config_id

        return {
            "m": self.m,
            "family": self.family,
            "config": self.config,
            "config_id": config_id(self.config) if self.config else "",
            "time_us": self.time_us,
            "gbps": self.gbps,
            "stock_gbps": self.stock_gbps,
            "speedup": self.speedup,
        }


@dataclass
class Table:
    backend: str
    device: str
    mode: str
    bits: int
    group_size: int
    dtype: str
    E: int
    K: int
    N: int
    mlx_version: str = ""
    buckets: list[Bucket] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was read from (not serialized)

    @property
    def key(self) -> tuple:
        return tuple(getattr(self, f) for f in _KEY_FIELDS)

    @property
    def filename(self) -> str:
        return (
            f"E={self.E},K={self.K},N={self.N},device={safe(self.device)},backend={self.backend},"
            f"mode={self.mode},bits={self.bits},gs={self.group_size},dtype={self.dtype}.json"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "key": {
                "backend": self.backend,
                "device": self.device,
                "mlx_version": self.mlx_version,
                "mode": self.mode,
                "bits": self.bits,
                "group_size": self.group_size,
                "dtype": self.dtype,
                "E": self.E,
                "K": self.K,
                "N": self.N,
            },
            "buckets": [b.to_json() for b in sorted(self.buckets, key=lambda b: b.m)],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], path: Path | None = None) -> "Table":
        where = f" in {path}" if path else ""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a tuning table (schema {data.get('schema')!r}){where}")
        if data.get("version") != VERSION:
            raise ValueError(f"tuning table version {data.get('version')!r} is not {VERSION}{where}")
        key = data["key"]
        missing = [f for f in _KEY_FIELDS if f not in key]
        if missing:
            raise ValueError(f"tuning table key lacks {missing}{where}")
        buckets = []
        for b in data.get("buckets", []):
            if "m" not in b or "family" not in b:
                raise ValueError(f"tuning table bucket {b!r} lacks m or family{where}")
            buckets.append(
                Bucket(
                    m=int(b["m"]),
                    family=str(b["family"]),
                    config={k: int(v) for k, v in b["config"].items()} if b.get("config") else None,
                    gbps=b.get("gbps"),
                    time_us=b.get("time_us"),
                    stock_gbps=b.get("stock_gbps"),
                    speedup=b.get("speedup"),
                )
            )
        return cls(
            backend=str(key["backend"]),
            device=str(key["device"]),
            mode=str(key["mode"]),
            bits=int(key["bits"]),
            group_size=int(key["group_size"]),
            dtype=str(key["dtype"]),
            E=int(key["E"]),
            K=int(key["K"]),
            N=int(key["N"]),
            mlx_version=str(key.get("mlx_version", "")),
            buckets=sorted(buckets, key=lambda b: b.m),
            meta=dict(data.get("meta", {})),
            path=path,
        )

    def bucket(self, m: float) -> Bucket | None:
        return nearest_bucket(self.buckets, m)


def nearest_bucket(buckets: Sequence[Bucket], m: float) -> Bucket | None:
    """The bucket nearest to m on a log2 scale (m buckets are powers of two); ties go to the
    smaller m, whose tiles waste less on rows that are not there."""
    if not buckets:
        return None
    lm = math.log2(max(float(m), 1e-9))
    return min(buckets, key=lambda b: (abs(math.log2(b.m) - lm), b.m))


def write_table(table: Table, directory: str | os.PathLike) -> Path:
    """Write atomically: a temp file in the same directory, then os.replace, so a reader (or a
    crash) never sees half a table."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / table.filename
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    clear_cache()  # the same directory may be indexed under several spellings
    return path


def read_table(path: str | os.PathLike) -> Table:
    path = Path(path)
    with open(path) as f:
        return Table.from_json(json.load(f), path=path)


# --- lookup ---------------------------------------------------------------------------------

_INDEX: dict[str, dict[tuple, list[Table]]] = {}  # dir as given -> key -> tables (best first)


def _index(directory: Path) -> dict[tuple, list[Table]]:
    """All readable tables of a directory by key, loaded once. Unreadable files are skipped
    (a user's broken table must not break every gather_qmm call); `load_dir` reports them."""
    k = str(directory)  # no resolve()/exists(): after the first call, a lookup touches no file
    idx = _INDEX.get(k)
    if idx is None:
        idx = {}
        for t, _err in load_dir(directory):
            if t is not None:
                idx.setdefault(t.key, []).append(t)
        mv = mlx_version()
        for tables in idx.values():
            tables.sort(key=lambda t: t.mlx_version != mv)  # same MLX version first
        _INDEX[k] = idx
    return idx


def load_dir(directory: str | os.PathLike) -> list[tuple[Table | None, str | None]]:
    directory = Path(directory)
    out = []
    if directory.is_dir():
        for p in sorted(directory.glob("*.json")):
            try:
                out.append((read_table(p), None))
            except (ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as e:
                out.append((None, f"{p}: {e}"))
    return out


_CHOICES: dict[tuple, Choice | None] = {}


def clear_cache() -> None:
    """Forget loaded tables and memoized choices (a new table was written, a test moved dirs)."""
    _INDEX.clear()
    _CHOICES.clear()


def table_dirs(table_dir: str | os.PathLike | None = None) -> list[Path]:
    return [user_dir(table_dir), SHIPPED_DIR]


def problem_key(problem, backend_name: str, device: str | None = None) -> tuple:
    return (
        backend_name,
        device if device is not None else device_name(backend_name),
        problem.mode,
        int(problem.bits),
        int(problem.group_size),
        str(problem.dtype),
        int(problem.experts),
        int(problem.k),
        int(problem.n),
    )


def estimate_m(problem, top_k: int | None = None) -> float:
    """Rows per *active* expert, from shapes only (no host sync on the indices).

    `problem.m` wins when the caller knows it. Otherwise, with top_k known, T = rows/top_k tokens
    routed uniformly touch E*(1-(1-k/E)^T) experts on average; without it, at most min(E, rows).
    """
    if problem.m is not None:
        return float(problem.m)
    rows, e = int(problem.rows), int(problem.experts)
    if rows <= 0:
        return 1.0
    if top_k:
        t = rows / top_k
        active = e * (1.0 - (1.0 - min(top_k, e) / e) ** t)
    else:
        active = min(e, rows)
    return max(1.0, rows / max(active, 1.0))


@dataclass(frozen=True)
class Choice:
    family: str
    config: dict[str, int] | None
    source: str  # "user" | "shipped" | "heuristic:<how>"
    table: Table | None = None
    bucket: Bucket | None = None


def lookup(
    problem,
    backend=None,
    *,
    table_dir: str | os.PathLike | None = None,
    m: float | None = None,
    top_k: int | None = None,
    heuristic_fallback: bool = True,
) -> tuple[str, dict[str, int] | None] | None:
    """(family name, config) for this problem, or None when nothing applies."""
    c = choose(problem, backend, table_dir=table_dir, m=m, top_k=top_k, heuristic_fallback=heuristic_fallback)
    return None if c is None else (c.family, c.config)


def choose(
    problem,
    backend=None,
    *,
    table_dir: str | os.PathLike | None = None,
    m: float | None = None,
    top_k: int | None = None,
    heuristic_fallback: bool = True,
) -> Choice | None:
    """Like `lookup`, but says where the choice came from. Memoized per (problem, backend,
    directories, m, top_k): the op calls this on every gather_qmm."""
    memo_key = (problem, backend if isinstance(backend, (str, type(None))) else backend.name,
                None if table_dir is None else str(table_dir), os.environ.get(ENV_VAR), m, top_k, heuristic_fallback)
    try:
        return _CHOICES[memo_key]
    except KeyError:
        pass
    except TypeError:  # an unhashable field: just do the work
        memo_key = None
    c = _choose(problem, backend, table_dir, m, top_k, heuristic_fallback)
    if memo_key is not None:
        _CHOICES[memo_key] = c
    return c


def _choose(problem, backend, table_dir, m, top_k, heuristic_fallback) -> Choice | None:
    from .backend import get_backend

    b = get_backend(backend)
    mm = float(m) if m is not None else estimate_m(problem, top_k)
    key = problem_key(problem, b.name)
    for source, d in zip(("user", "shipped"), table_dirs(table_dir)):
        tables = _index(d).get(key)
        if tables:
            bk = tables[0].bucket(mm)
            if bk is not None:
                return Choice(bk.family, bk.config, source, tables[0], bk)
    if not heuristic_fallback:
        return None
    return heuristic(problem, b, m=mm, table_dir=table_dir)


# --- heuristic for shapes and devices no table covers ----------------------------------------


def _all_tables(table_dir) -> Iterable[Table]:
    for d in table_dirs(table_dir):
        for tables in _index(d).values():
            yield from tables


def table_picks(problem, backend_name: str = "cuda", table_dir=None) -> list[tuple[Table, Bucket]]:
    """Every bucket with a config in the tables of this problem's shape and format for
    `backend_name`, on any device (what `mlx-moe-tune ptxas` marks as shipped choices)."""
    return [(t, b) for t in _all_tables(table_dir) for b in t.buckets
            if b.config and t.key == problem_key(problem, backend_name, device=t.device)]


def _shape_distance(t: Table, problem) -> float:
    # K and N set the weight-tile geometry; E matters far less (it only scales the grid)
    return abs(math.log2(t.K / problem.k)) + abs(math.log2(t.N / problem.n)) + 0.1 * abs(
        math.log2(t.E / problem.experts)
    )


def _families():
    """Kernel families by name, or {} while the kernels package has none registered."""
    try:
        from .kernels import registry  # H-cuda's module: FAMILIES or families()
    except ImportError:
        return {}
    fams = getattr(registry, "FAMILIES", None)
    if fams is None and hasattr(registry, "families"):
        fams = registry.families()
    return dict(fams or {})


def _valid(family: str, config, problem, b) -> bool:
    fam = _families().get(family)
    if fam is None:
        return False
    try:
        return config is not None and fam.check(problem, config, b) is None
    except (KeyError, ValueError):
        return False


def heuristic(problem, backend=None, *, m: float | None = None, table_dir=None,
              pool: Iterable[Table] | None = None) -> Choice | None:
    """A choice for an unseen (shape, device): borrow the nearest tuned table's choice when it is
    valid here, else fall back to a rule. `pool` replaces the table directories (the tuner's
    held-back evaluation passes every table but the one being predicted; see
    tune.heuristic_gap)."""
    from .backend import get_backend

    b = get_backend(backend)
    mm = float(m) if m is not None else estimate_m(problem)
    fmt = (problem.mode, int(problem.bits), int(problem.group_size), str(problem.dtype))
    dev = device_name(b.name)
    pool = _all_tables(table_dir) if pool is None else pool
    cands = [t for t in pool if t.backend == b.name and (t.mode, t.bits, t.group_size, t.dtype) == fmt]
    # same device before other devices of the same backend; then the nearest shape
    cands.sort(key=lambda t: (t.device != dev, _shape_distance(t, problem)))
    for t in cands:
        bk = t.bucket(mm)
        if bk is not None and _valid(bk.family, bk.config, problem, b):
            how = "nearest-shape" if t.device == dev else "other-device"
            return Choice(bk.family, bk.config, f"heuristic:{how}", t, bk)
    return rule(problem, b, m=mm)


def rule(problem, backend=None, *, m: float | None = None) -> Choice | None:
    """No table at all: the op's own default for the dialect (`ops.default_choice` for CUDA,
    `metal_tiles.default_choice` for Metal: hand-set from measurements) when it is valid here;
    otherwise a generic pick: the no-reuse `qmv` while m <= 2, the reuse `qmm` above, with the
    row tile BM just covering m (a larger tile wastes work on padding rows, a smaller one
    re-reads weights)."""
    import dataclasses

    from .backend import get_backend

    b = get_backend(backend)
    mm = float(m) if m is not None else estimate_m(problem)
    fams = _families()
    p = dataclasses.replace(problem, m=mm)
    try:
        if b.dialect == "metal":
            from .kernels import metal_tiles

            name, cfg = metal_tiles.default_choice(p, False)
        else:
            from . import ops

            name, cfg = ops.default_choice(p, True)
        if _valid(name, cfg, p, b):
            return Choice(name, dict(cfg), "heuristic:rule")
    except (ImportError, AttributeError, ValueError, KeyError, TypeError):
        pass
    order = ["qmv", "qmm"] if mm <= 2 else ["qmm", "qmv"]
    for name in order:
        fam = fams.get(name)
        if fam is None:
            continue
        try:
            configs = fam.valid_configs(p, b)
        except (ValueError, KeyError):
            continue
        if not configs:
            continue
        return Choice(name, _rule_pick(configs, mm), "heuristic:rule")
    return None


def _rule_pick(configs: list[dict[str, int]], m: float) -> dict[str, int]:
    def score(c):
        bm = c.get("BM")
        fit = abs(math.log2(bm / max(m, 1.0))) if bm else 0.0
        # then prefer no split-K, wide N tiles, moderate depth (ties broken deterministically)
        return (fit, c.get("SPLITK", c.get("SK", 1)), -c.get("BN", 0), abs(c.get("BK", 64) - 64), sorted(c.items()))

    return min(configs, key=score)
