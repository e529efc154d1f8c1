"""A/B of two builds of the CUDA gather_qmm kernels in one process: the sources in OLD_DIR (e.g. a
previous commit's cuda/, exported with `git archive`) against the working tree's cuda/. For each m,
the previous tune's best configs (N=1408 gemma-26b-a4b) run through both builds in interleaved
rounds; the median over rounds is kept. Writes OUT/ab.csv.
    python3 scripts/h100/ab_kernels.py OLD_DIR OUT [ROUNDS]
With --vary KEY=V1,V2,... instead of OLD_DIR, the variants are one tile param of the working
tree's build: the same configs at each value, e.g. PF (L2 prefetch distance) or WS (W through
shared memory); a config the value makes invalid (WS=1 without the shared-x path) is skipped.
    AB_POINTS=h200 python3 scripts/h100/ab_kernels.py --vary PF=0,3 OUT [ROUNDS]
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from mlx_moe_tune import measure, ops
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import DialectSource, Problem, parse_config_id
from mlx_moe_tune.kernels.plan import make_plan

POINTS = {  # m -> configs (family:config) of the previous tune's top of that bucket
    1: ["qmv:FN2_WN4_WK2_KU1", "qmv:FN2_WN2_WK4_KU1", "qmv:FN2_WN2_WK2_KU2", "qmv:FN1_WN4_WK2_KU2", "qmm:BM16_FN2_WN4_WK1_MC4_KU2"],
    2: ["qmm:BM8_FN2_WN4_WK1_MC4_KU2", "qmm:BM16_FN2_WN4_WK1_MC4_KU2", "qmm:BM8_FN1_WN4_WK1_MC4_KU1"],
    4: ["qmm:BM16_FN2_WN4_WK1_MC4_KU2", "qmm:BM8_FN1_WN4_WK1_MC4_KU2", "qmm:BM8_FN2_WN4_WK1_MC4_KU2"],
    8: ["qmm:BM8_FN2_WN4_WK1_MC4_KU2", "qmm:BM16_FN2_WN4_WK1_MC4_KU2", "qmm:BM8_FN1_WN4_WK1_MC4_KU1"],
    16: ["qmm:BM16_FN2_WN4_WK1_MC4_KU2", "qmm:BM16_FN1_WN4_WK1_MC4_KU1", "qmm:BM16_FN2_WN4_WK1_MC4_KU1"],
    32: ["qmm:BM32_FN2_WN4_WK1_MC4_KU1", "qmm:BM32_FN2_WN4_WK1_MC4_KU2", "qmm:BM16_FN2_WN4_WK1_MC4_KU2"],
    64: ["qmm:BM64_FN2_WN4_WK1_MC4_KU1", "qmm:BM32_FN2_WN4_WK1_MC4_KU1"],
}

# The H200 tune's top configs (sweeps/results/h200/tune/tune.csv), AB_POINTS picks a set:
# h200 (the shared-x path, BM >= 16; BM8 and qmv rows are controls), h200-gs (the group-sum path
# of qmv and BM8; BM16 rows are controls).
H200_POINTS = {
    1: ["qmv:FN2_WN2_WK2_KU1"],
    8: ["qmm:BM16_FN2_WN4_WK1_MC4_KU2", "qmm:BM8_FN2_WN4_WK1_MC4_KU1"],
    16: ["qmm:BM16_FN2_WN4_WK1_MC4_KU2", "qmm:BM16_FN2_WN4_WK1_MC4_KU1"],
    32: ["qmm:BM32_FN2_WN4_WK1_MC4_KU1", "qmm:BM32_FN2_WN4_WK1_MC4_KU2", "qmm:BM32_FN1_WN4_WK1_MC4_KU1"],
    64: ["qmm:BM64_FN2_WN4_WK1_MC4_KU1", "qmm:BM64_FN1_WN4_WK1_MC4_KU1"],
}
H200_GS_POINTS = {
    1: ["qmv:FN2_WN2_WK2_KU1", "qmv:FN2_WN4_WK2_KU1", "qmv:FN1_WN2_WK2_KU1", "qmv:FN2_WN2_WK4_KU1",
        "qmm:BM8_FN2_WN4_WK1_MC4_KU1"],
    2: ["qmm:BM8_FN2_WN4_WK1_MC4_KU1", "qmm:BM8_FN2_WN4_WK1_MC4_KU2", "qmm:BM8_FN1_WN4_WK1_MC4_KU1"],
    4: ["qmm:BM8_FN2_WN4_WK1_MC4_KU1", "qmm:BM16_FN2_WN4_WK1_MC4_KU2"],
    8: ["qmm:BM8_FN2_WN4_WK1_MC4_KU1", "qmm:BM16_FN2_WN4_WK1_MC4_KU2"],
}
POINTS = {"h200": H200_POINTS, "h200-gs": H200_GS_POINTS}.get(os.environ.get("AB_POINTS", ""), POINTS)

SHAPE = tuple(int(v) for v in os.environ.get("AB_SHAPE", "128,2816,1408").split(","))  # E, K, N
if "AB_M" in os.environ:  # a smoke run elsewhere (AB_SHAPE=8,768,64 AB_M=1,8 AB_BACKEND=emulator-cuda)
    POINTS = {int(m): POINTS[int(m)] for m in os.environ["AB_M"].split(",")}


@dataclasses.dataclass(frozen=True)
class PathSource(DialectSource):
    """Kernel text from absolute paths (the old build)."""

    def text(self) -> tuple[str, str]:
        return Path(self.body).read_text(), "\n".join(Path(h).read_text() for h in self.headers)


def old_family(fam, old: Path):
    src = fam.sources["cuda"]
    path = lambda rel: str(old / Path(rel).name)  # noqa: E731
    return dataclasses.replace(fam, name=fam.name + "_old", _cache={},
                               sources={"cuda": PathSource(path(src.body), tuple(path(h) for h in src.headers))})


def build(case, fam, base: str, cfg):
    p = case.problem
    x2 = case.x_sorted.reshape(case.rows, p.k)
    plan = make_plan(case.idx_sorted, p.experts, sorted_indices=True)
    nxt = case.rotation()

    def fn():
        w, s, b = nxt()
        tail = [case.idx_sorted] if base == "qmv" else [plan.order, plan.offsets]
        return ops._run(fam, p, cfg, case.backend, [x2, w, s, b, *tail], 1)

    return fn


def main(old: Path | None, out: Path, rounds: int, vary: tuple[str, list[int]] | None = None) -> None:
    """Variants: (build name, families, config transform). OLD_DIR: new and old builds, same
    config; vary (KEY, values): the new build with KEY at each value."""
    out.mkdir(parents=True, exist_ok=True)
    new = {n: registry.get(n) for n in ("qmv", "qmm")}
    if vary is not None:
        key, values = vary
        variants = [(f"{key}{v}", new, lambda c, v=v: {**c, key: v}) for v in values]
    else:
        variants = [("new", new, dict), ("old", {n: old_family(f, old) for n, f in new.items()}, dict)]
    rows = []
    for m, cfgs in POINTS.items():
        E, K, N = SHAPE
        p = Problem(experts=E, k=K, n=N, rows=m * E, bits=4, group_size=64, dtype="bfloat16", m=float(m))
        case = measure.prepare_case(p, m=m, top_k=8, seed=0, backend=os.environ.get("AB_BACKEND"))
        ref = measure.case_reference(case)
        fns = {}
        for cid in cfgs:
            base, _, c = cid.partition(":")
            for name, fams, tweak in variants:
                cfg = tweak(parse_config_id(c))
                why = fams[base].check(p, fams[base].complete(cfg, case.backend.dialect), case.backend)
                if why is not None:
                    print(f"skip m={m} {cid} {name}: {why}", flush=True)
                    continue
                fn = build(case, fams[base], base, cfg)
                y = fn()
                err = float(np.max(np.abs(np.asarray(y.astype(measure.MTYPES["float32"])) - ref)))
                fns[(cid, name)] = (fn, err)
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, (fn, _) in fns.items():
                times[k].append(measure.time_fn(fn, iters=10).median_us)
        for (cid, name), (fn, err) in fns.items():
            t = statistics.median(times[(cid, name)])
            r = dict(m=m, config=cid, build=name, time_us=round(t, 2), gbps=round(case.weight_bytes / t / 1e3, 1),
                     max_abs_err=err, rounds=rounds)
            rows.append(r)
            print(r, flush=True)
        del case, fns
    measure.write_rows(out / "ab.csv", rows)


if __name__ == "__main__":
    if sys.argv[1] == "--vary":
        key, _, vals = sys.argv[2].partition("=")
        main(None, Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 3,
             vary=(key, [int(v) for v in vals.split(",")]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
