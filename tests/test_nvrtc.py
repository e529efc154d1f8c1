"""The CUDA kernels compiled by the real NVRTC for sm_90a, as MLX's JIT compiles them on an
H100/H200, on this GPU-less machine: every shipped config compiles and ptxas spills none.

Needs NVIDIA's NVRTC wheels (`pip install -e ".[nvrtc]"`, Linux); skipped without them unless
MLX_MOE_TUNE_REQUIRE_NVRTC=1 (CI sets it, so a missing install step fails instead of skipping).
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_moe_tune import nvrtc, selftest
from mlx_moe_tune.backend import CUDA, EMULATOR_CUDA
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import Problem, config_id
from mlx_moe_tune.kernels.plan import PLAN

ROOT = Path(__file__).resolve().parents[1]
GATE_UP = Problem(experts=128, k=2816, n=1408, rows=16 * 128, bits=4, group_size=64, dtype="bfloat16", m=16.0)
FAMILY_NAMES = ("qmv", "qmv_glu", "qmm", "qmm_glu")


@pytest.fixture(scope="module")
def toolkit():
    try:
        return nvrtc.find_toolkit()
    except nvrtc.NvrtcUnavailable as e:
        if os.environ.get("MLX_MOE_TUNE_REQUIRE_NVRTC", "") not in ("", "0"):
            raise
        pytest.skip(str(e))


def _compile_all(tasks):
    """[(family, problem, config, x_div)] -> [(task, Resources or NvrtcError)], two at a time."""
    def one(t):
        fam, problem, cfg, x_div = t
        try:
            return t, nvrtc.family_resources(fam, problem, fam.complete(cfg, "cuda"), x_div)
        except nvrtc.NvrtcError as e:
            return t, e

    with ThreadPoolExecutor(max_workers=2) as ex:
        return list(ex.map(one, tasks))


def _assert_compiled(results, spills_allowed: bool = False):
    failed = [(t[0].name, config_id(t[2]), str(r).splitlines()[0]) for t, r in results if isinstance(r, Exception)]
    assert not failed, failed
    assert all(0 < r.registers <= 255 for _, r in results)
    spills = [(t[0].name, config_id(t[2]), r.spill_stores) for t, r in results if r.spill_stores or r.spill_loads]
    assert spills_allowed or not spills, f"ptxas spills registers: {spills}"


def test_every_shipped_config_compiles_for_sm90a_without_spills(toolkit):
    """All valid configs of the shipped space at the gemma-26b-a4b gate_up shape (4-bit gs64 bf16,
    the tuned format), qmv in the per-token decode layout; and the plan kernel. None spills: the
    checks' register rules (kernels/common.py) keep spilling 4-bit tiles out of the space, so a
    source change that makes one spill shows here."""
    tasks = [(fam, GATE_UP, cfg, 8 if name.startswith("qmv") else 1)
             for name in FAMILY_NAMES for fam in [registry.FAMILIES[name]]
             for cfg in fam.valid_configs(GATE_UP, CUDA)]
    assert len(tasks) >= 40
    tasks += [(fam.sorted_twin, GATE_UP, cfg, 1) for fam, _, cfg, _ in list(tasks) if fam.sorted_twin is not None]
    plan_problem = Problem(experts=128, k=1, n=1, rows=16 * 128)
    tasks.append((PLAN, plan_problem, next(PLAN.configs("cuda")), 1))
    _assert_compiled(_compile_all(tasks))


def test_other_formats_compile_for_sm90a(toolkit):
    """2- and 8-bit weights, group sizes 32 and 128, float16: the largest valid tile of each
    family, at a ragged N. Their large tiles may spill (2- and 8-bit dequantize more registers
    per loaded chunk; sweeps/results/nvrtc/): the tuner measures them, so only compiling is
    asserted."""
    tasks = []
    for bits, gs, dtype in ((2, 32, "float16"), (8, 128, "bfloat16")):
        p = Problem(experts=8, k=512, n=72, rows=64, bits=bits, group_size=gs, dtype=dtype, m=8.0)
        for name in FAMILY_NAMES:
            fam = registry.FAMILIES[name]
            tasks.append((fam, p, fam.valid_configs(p, CUDA)[-1], 1))
    _assert_compiled(_compile_all(tasks), spills_allowed=True)


def test_prefetch_and_shared_w_compile(toolkit):
    """PF > 0 and WS = 1 (not yet in the searched space, taken by the op) on the configs the
    shipped H200 tables pick: the source paths that have not run on a GPU compile."""
    from mlx_moe_tune.tables import table_picks

    tasks, seen = [], set()
    for t, b in table_picks(GATE_UP, "cuda"):
        fam = registry.FAMILIES[b.family]
        for extra in ({"PF": 2}, {"WS": 1}, {"PF": 3, "WS": 1}):
            cfg = {**fam.complete(b.config, "cuda"), **{k: v for k, v in extra.items() if k in fam.space["cuda"]}}
            if config_id(cfg) not in seen and fam.check(GATE_UP, cfg, CUDA) is None:
                seen.add(config_id(cfg))
                tasks.append((fam, GATE_UP, cfg, 1))
    assert any(c.get("WS") for _, _, c, _ in tasks) and any(c.get("PF") for _, _, c, _ in tasks)
    _assert_compiled(_compile_all(tasks))


def _ncu(path: Path) -> dict:
    text = path.read_text()
    kernel = re.search(r'Profiling "(custom_kernel_[^"]+)"', text).group(1)
    regs = int(re.search(r"Registers Per Thread\s+register/thread\s+(\d+)", text).group(1))
    blocks = int(re.search(r"Block Limit Registers\s+block\s+(\d+)", text).group(1))
    return dict(kernel=kernel, registers=regs, block_limit_registers=blocks)


@pytest.mark.parametrize("profile, family", [("ncu-qmv-m1.txt", "qmv"), ("ncu-qmm-m32.txt", "qmm")])
def test_ptxas_agrees_with_the_h200_profile(toolkit, profile, family):
    """The kernels ncu profiled on the H200 (sweeps/results/h200/profile), compiled here from
    the template arguments in their names: the same register-limited block count, and registers
    within a few (the H200 host's NVRTC version, and the source before PF/WS were added)."""
    ncu = _ncu(ROOT / "sweeps/results/h200/profile" / profile)
    fam = registry.FAMILIES[family]
    # custom_kernel_mmt_<family>_<T>_<BITS>_<GS>_<K>_<N>_<E>_<X_DIV>_<tile in space order>
    vals = [int(v) for v in ncu["kernel"].split(f"mmt_{family}_bfloat16_t_")[1].split("_")]
    bits, gs, k, n, e, x_div, *tile = vals
    cfg = fam.complete(dict(zip(fam.space["cuda"], tile)), "cuda")
    p = Problem(experts=e, k=k, n=n, rows=32 * e, bits=bits, group_size=gs, dtype="bfloat16")
    r = nvrtc.family_resources(fam, p, cfg, x_div)
    threads = fam.launch(p, cfg, CUDA).threadgroup[0]
    assert abs(r.registers - ncu["registers"]) <= 8, (r.registers, ncu)
    assert r.blocks_per_sm(threads) == (ncu["block_limit_registers"], "registers")


def test_compiled_text_is_what_the_emulator_runs(monkeypatch):
    """family_source's signature (dtypes from the input names) against the text the emulator
    generated for a real op call: a drift in ops' input dtypes would compile the wrong kernel."""
    import mlx_moe_tune.emulator.kernel as em

    seen = []
    real = em.cuda_source
    monkeypatch.setattr(em, "cuda_source", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    case = selftest.Case("ragged", counts=(0, 1, 5, 37), k=128, n=72)
    inputs = selftest.build_inputs(case)
    for name in ("qmv", "qmm_glu"):
        fam = registry.FAMILIES[name]
        cfg = fam.complete(fam.valid_configs(case.problem(), EMULATOR_CUDA)[0], "cuda")
        selftest.run_config(fam, EMULATOR_CUDA, case, cfg, inputs, check=False)
        assert nvrtc.family_source(fam, case.problem(), cfg, case.x_div) == seen[-1]


def test_a_bad_source_is_a_clear_error(toolkit):
    text = ('#include "mlx/backend/cuda/device/utils.cuh"\nnamespace mlx::core::cu {\n'
            "__global__ void custom_kernel_broken(float* y) { y[0] = undeclared_name; }\n}\n")
    with pytest.raises(nvrtc.NvrtcError, match=r"custom_kernel_broken.*undeclared_name"):
        nvrtc.compile_source(text, "custom_kernel_broken")


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(nvrtc.ENV_LIB, str(tmp_path / "libnvrtc.so.13"))
    with pytest.raises(nvrtc.NvrtcUnavailable, match=r"mlx-moe-tune\[nvrtc\]"):
        nvrtc.find_toolkit()


def test_occupancy_arithmetic():
    """sm_90's occupancy calculator: registers are allocated per warp in 256s from 64K, at most
    2048 threads, 32 blocks and 228 KB of shared memory (1 KB reserved per block) per SM."""
    def res(regs, smem=0):
        return nvrtc.Resources("k", regs, 0, 0, 0, smem, 0, "sm_90a", "13.0", 0.0)

    assert res(168).blocks_per_sm(128) == (3, "registers")  # 5376 per warp: 12 warps
    assert res(121).blocks_per_sm(128) == (4, "registers")  # 3872 -> 4096 per warp: 16 warps
    assert res(16).blocks_per_sm(1024) == (2, "threads")
    assert res(32).blocks_per_sm(32) == (32, "blocks")
    assert res(32, smem=100 * 1024).blocks_per_sm(128) == (2, "shared memory")
    assert res(32, smem=24576).blocks_per_sm(128, dynamic_smem=48016) == (3, "shared memory")
    assert res(255).occupancy(128) == pytest.approx(8 / 64)


def test_ptxas_command_writes_csv_and_metadata(toolkit, tmp_path):
    import csv
    import json

    from mlx_moe_tune.cli import main

    out = tmp_path / "ptxas.csv"
    assert main(["ptxas", "--family", "qmv", "--tables-only", "-j", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["status"] == "ok" and int(r["registers"]) > 0 for r in rows)
    assert any("H200:1" in r["tables"] for r in rows)  # the shipped H200 table's m=1 pick
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["arch"] == "sm_90a" and meta["nvrtc"]


def test_ptxas_log_parsing():
    """Both shapes of ptxas's `Used` line (NVRTC 13.5 logs): with a stack (spills) the shared
    memory comes after the stack size; without barriers there is no barrier item."""
    log = """ptxas info    : 4639 bytes gmem
ptxas info    : Compiling entry function '_ZN3mlx4core2cu5otherEv' for 'sm_90a'
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers
ptxas info    : Compiling entry function '_ZN3mlx4core2cu70custom_kernel_mmt_qmm_x_EPK13__nv_bfloat16' for 'sm_90a'
ptxas info    : Function properties for _ZN3mlx4core2cu70custom_kernel_mmt_qmm_x_EPK13__nv_bfloat16
ptxas         .     40 bytes stack frame, 40 bytes spill stores, 184 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 40 bytes cumulative stack size, 24576 bytes smem
"""
    assert nvrtc.parse_ptxas(log, "custom_kernel_mmt_qmm_x_") == dict(
        registers=128, barriers=1, static_smem=24576, stack_bytes=40, spill_stores=40, spill_loads=184)
    assert nvrtc.parse_ptxas(log, "other")["registers"] == 10
    with pytest.raises(nvrtc.NvrtcError, match="no ptxas report"):
        nvrtc.parse_ptxas(log, "custom_kernel_missing")
