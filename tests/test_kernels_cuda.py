"""CUDA kernel families: tile validator and launch rules (always), and every shipped config vs the
numpy reference on the CUDA emulator in check mode (ragged shapes: N=72 no multiple of any BN,
experts with 0, 1 and more-than-BM rows, the per-token decode layout)."""
from __future__ import annotations

import pytest

from mlx_moe_tune import selftest
from mlx_moe_tune.backend import CUDA, EMULATOR_CUDA
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import Problem, config_id
from mlx_moe_tune.sources import read_source

FAMILY_NAMES = ("qmv", "qmv_glu", "qmm", "qmm_glu")
SEED = Problem(experts=128, k=2816, n=1408, rows=8 * 128, bits=4, group_size=64, dtype="bfloat16")


def _emulator_cuda():
    emu = pytest.importorskip("mlx_moe_tune.emulator")
    if not hasattr(emu, "cuda_kernel"):
        pytest.skip("emulator has no cuda_kernel yet")
    return EMULATOR_CUDA


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_shipped_space_is_small_and_valid_on_seed_shape(name):
    fam = registry.FAMILIES[name]
    space = list(fam.configs("cuda"))
    assert 8 <= len(space) <= 16  # every one is a separate NVRTC compile per shape
    valid = fam.valid_configs(SEED, CUDA)
    # the fused variants hold two weight sets: their larger tiles exceed the register budget
    need = len(space) * 3 // 8 if name.endswith("_glu") else len(space) - 4
    assert len(valid) >= need, [config_id(c) for c in space if c not in valid]
    body, header = fam.sources["cuda"].text()
    assert "mmt::" in body and "namespace mmt" in header


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_launch_geometry(name):
    """Blocks only on grid.x (y/z are capped at 65535); x covers every (unit or pair, N tile)."""
    fam = registry.FAMILIES[name]
    for rows in (1, 8, 1000, 1 << 20):
        p = Problem(experts=128, k=2816, n=1408, rows=rows, bits=4, group_size=64)
        for cfg in fam.valid_configs(p, CUDA):
            la = fam.launch(p, cfg, CUDA)
            tg = la.threadgroup[0]
            assert la.grid[1:] == (1, 1) and la.threadgroup[1:] == (1, 1)
            assert la.grid[0] % tg == 0 and tg % 32 == 0 and tg <= 1024
            blocks = la.grid[0] // tg
            bn = 16 * cfg["FN"] * cfg["WN"]
            n_tiles = -(-1408 // bn)
            if name.startswith("qmv"):
                assert blocks == rows * n_tiles
            else:  # units: at least one per active expert, enough for every BM*MC rows
                units = blocks // n_tiles
                assert blocks % n_tiles == 0
                assert units >= min(128, rows) and units * cfg["BM"] * cfg["MC"] >= rows


def test_validator_reasons():
    qmv, qmm, glu = (registry.FAMILIES[n] for n in ("qmv", "qmm", "qmm_glu"))
    ok = {"BM": 16, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 1}
    assert qmm.check(SEED, ok, CUDA) is None
    assert "multiple of 8" in qmm.check(SEED, {**ok, "BM": 12}, CUDA)
    assert "threads" in qmm.check(SEED, {**ok, "BM": 8, "WN": 16, "WK": 4}, CUDA)
    assert "shared memory" in qmm.check(SEED, {**ok, "BM": 64, "KU": 2}, CUDA)
    assert "WK=1" in qmm.check(SEED, {**ok, "WK": 2}, CUDA)
    assert "accumulator" in glu.check(SEED, {**ok, "BM": 64}, CUDA)
    assert "float16 or bfloat16" in qmv.check(
        Problem(4, 256, 72, 8, dtype="float32"), {"FN": 1, "WN": 2, "WK": 2, "KU": 1}, CUDA)
    assert "bits" in qmv.check(Problem(4, 256, 72, 8, bits=3), {"FN": 1, "WN": 2, "WK": 2, "KU": 1}, CUDA)
    assert "group size" in qmv.check(Problem(4, 256, 72, 8, group_size=16), {"FN": 1, "WN": 2, "WK": 2, "KU": 1}, CUDA)
    assert "multiple of the group size" in qmv.check(Problem(4, 96, 72, 8), {"FN": 1, "WN": 2, "WK": 2, "KU": 1}, CUDA)
    # two weight sets double the step buffers: the fused decode kernel halves threads x KU
    assert qmv.check(SEED, {"FN": 2, "WN": 4, "WK": 2, "KU": 2}, CUDA) is None
    assert "register file" in registry.FAMILIES["qmv_glu"].check(SEED, {"FN": 2, "WN": 4, "WK": 2, "KU": 2}, CUDA)
    huge = Problem(128, 2816, 1408, 1 << 27)
    assert "qmm" in qmv.check(huge, {"FN": 1, "WN": 2, "WK": 2, "KU": 1}, CUDA)


def test_sources_exist():
    for fam in registry.families():
        for src in fam.sources.values():
            body, header = src.text()
            assert body.strip() and header.strip()
    assert "cp_async_16" in read_source("cuda/mmt_intrinsics.cuh")


def test_every_shipped_config_on_emulator():
    """All configs of all families, one test process, one shape (compiles are cached), at group
    size 64 (the shipped models' format: a lane's 32-value chunk is half a group) and 32 (a whole
    group)."""
    backend = _emulator_cuda()
    cases = [selftest.Case(f"ragged-gs{gs}", counts=(0, 1, 5, 37), k=256, n=72, group_size=gs) for gs in (64, 32)]
    fams = [registry.FAMILIES[n] for n in FAMILY_NAMES]
    results = selftest.selftest(fams, backend, cases, check=True)
    # the sorted twins (same tiles, rows found in the sorted ids): every config, one case
    twins = [f.sorted_twin for f in fams if f.sorted_twin is not None]
    assert [t.label for t in twins] == ["qmm.sorted", "qmm_glu.sorted"]
    results += selftest.selftest(twins, backend, cases[:1], check=True)
    expected = (sum(len(f.valid_configs(c.problem(), backend)) for f in fams for c in cases)
                + sum(len(t.valid_configs(cases[0].problem(), backend)) for t in twins))
    assert len(results) == expected
    bad = [selftest.format_row(r) for r in results if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("bits,gs,dtype,x_div", [(4, 32, "float16", 2), (8, 64, "bfloat16", 1),
                                                  (2, 128, "float16", 1), (8, 32, "float16", 3),
                                                  (4, 128, "float16", 2)])
def test_formats_on_emulator(bits, gs, dtype, x_div):
    backend = _emulator_cuda()
    counts = (3, 0, 1, 2) if x_div != 3 else (2, 1, 0, 3)
    case = selftest.Case(f"{bits}b-gs{gs}-{dtype}", counts=counts, k=2 * gs, n=40, bits=bits, group_size=gs,
                         dtype=dtype, x_div=x_div, configs="ends")
    fams = [v for v in registry.variants() if v.name in FAMILY_NAMES]
    results = selftest.selftest(fams, backend, [case], check=True)
    assert results and all(r.ok for r in results), "\n".join(selftest.format_row(r) for r in results)


def test_selftest_skips_a_format_the_cuda_kernels_do_not_take(capsys):
    """float32 activations: every CUDA family reports the case as skipped, with the reason, and
    echoes it (the H200 selftest of qmm_glu once counted such cases as silent failures)."""
    backend = _emulator_cuda()
    case = selftest.Case("f32", counts=(2, 1), k=64, n=24, group_size=64, dtype="float32")
    fams = [registry.FAMILIES[n] for n in FAMILY_NAMES]
    results = selftest.selftest(fams, backend, [case], echo=lambda r: print(selftest.format_row(r)))
    assert len(results) == len(fams) and all(r.skipped and not r.ok for r in results)
    out = capsys.readouterr().out
    assert out.count(" skip ") == len(fams) and "float16 or bfloat16" in out and "FAIL" not in out


def _prefetch_failures(backend, bits, gs) -> list[str]:
    """PF=2 on the first and last valid config of each family (2-bit: qmv only), vs numpy. K = 6 k
    blocks so that PF = 2 reaches ahead and runs off the end (2-bit gs32: 8-byte lane chunks)."""
    kb = 4 * min(gs * bits // 32, 4) * (32 // bits)  # k values per k block (mmt_gather.cuh QGeom::KB)
    case = selftest.Case(f"pf-{bits}b-gs{gs}", counts=(0, 1, 5, 37), k=6 * kb, n=72, bits=bits, group_size=gs)
    inputs = selftest.build_inputs(case)
    fams = [registry.FAMILIES[n] for n in FAMILY_NAMES] if bits == 4 else [registry.FAMILIES["qmv"]]
    bad = []
    for fam in fams:
        valid = fam.valid_configs(case.problem(), backend)
        for cfg in {config_id(c): c for c in (valid[0], valid[-1])}.values():
            cfg = {**cfg, "PF": 2}
            assert fam.check(case.problem(), cfg, backend) is None
            r = selftest._run_one(fam, backend, case, cfg, inputs, check=True)
            if not r.ok:
                bad.append(selftest.format_row(r))
    return bad


@pytest.mark.parametrize("bits,gs", [(4, 64), (2, 32)])
def test_l2_prefetch_configs_on_emulator(bits, gs):
    """PF > 0 (L2 prefetch of later k blocks' W chunks; not in the searched space yet): the same
    results as the numpy reference, and with the bounds check on, every prefetched address inside w."""
    backend = _emulator_cuda()
    bad = _prefetch_failures(backend, bits, gs)
    assert not bad, bad
    case = selftest.Case("pf", counts=(1,), k=128, n=16)
    cfg = registry.FAMILIES["qmv"].valid_configs(case.problem(), backend)[0]
    assert registry.FAMILIES["qmv"].check(case.problem(), {**cfg, "PF": -1}, backend) is not None


def test_dynamic_shared_memory_is_a_kernel_object_setting():
    """MLX's cuda_kernel takes dynamic shared memory at construction: one kernel object per size,
    built with it (the call itself has no such argument); a Metal backend refuses it."""
    from mlx_moe_tune.backend import EMULATOR_METAL

    _emulator_cuda()
    fam = registry.FAMILIES["qmm"]
    plain, big = fam.kernel(EMULATOR_CUDA), fam.kernel(EMULATOR_CUDA, 64 * 1024)
    assert plain is fam.kernel(EMULATOR_CUDA, 0) and big is not plain
    assert (plain.shared_memory, big.shared_memory) == (0, 64 * 1024)
    with pytest.raises(ValueError, match="CUDA launch setting"):
        fam.kernel(EMULATOR_METAL, 1024)


def _shared_w_failures(backend) -> tuple[int, list[str]]:
    """WS=1 on BM16 KU1/KU2 and the largest shared-x tile of qmm and qmm_glu (that one with PF=2
    too), K = 6 k blocks (the 2-3 stage ring wraps), vs numpy: (configs run, failures)."""
    case = selftest.Case("ws", counts=(0, 1, 5, 37), k=6 * 128, n=72, group_size=64)
    inputs = selftest.build_inputs(case)
    bad, ran = [], 0
    for name in ("qmm", "qmm_glu"):
        fam = registry.FAMILIES[name]
        shared_x = [c for c in fam.valid_configs(case.problem(), backend) if c["BM"] >= 16]
        picks = {config_id(c): c for c in (shared_x[0], shared_x[1], shared_x[-1])}  # KU 1, 2; largest
        for i, cfg in enumerate(picks.values()):
            cfg = {**cfg, "WS": 1, "PF": 2 if i == 2 else 0}
            assert fam.check(case.problem(), cfg, backend) is None, config_id(cfg)
            assert fam.launch(case.problem(), cfg, backend).shared_memory > 0
            r = selftest._run_one(fam, backend, case, cfg, inputs, check=True)
            ran += 1
            if not r.ok:
                bad.append(selftest.format_row(r))
    return ran, bad


def test_w_through_shared_memory_on_emulator():
    """WS=1 (W chunks cp.async'd into dynamic shared memory with the x tile; not in the searched
    space yet): the numpy reference's results, with the emulator's bounds and race checks on;
    BM=8 (no shared-x path) is refused with the reason."""
    backend = _emulator_cuda()
    ran, bad = _shared_w_failures(backend)
    assert ran == 6 and not bad, bad
    case = selftest.Case("ws", counts=(1,), k=128, n=16)
    bm8 = {"BM": 8, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 1, "PF": 0, "WS": 1}
    assert "shared-x path" in registry.FAMILIES["qmm"].check(case.problem(), bm8, backend)


@pytest.mark.gpu
def test_prefetch_and_shared_w_on_gpu():
    """The PF and WS configs of the two emulator tests above, through MLX's CUDA backend."""
    import mlx.core as mx

    if not (getattr(mx, "cuda", None) and mx.cuda.is_available()):
        pytest.skip("needs MLX's CUDA backend")
    bad = _prefetch_failures(CUDA, 4, 64) + _prefetch_failures(CUDA, 2, 32)
    ran, ws_bad = _shared_w_failures(CUDA)
    assert ran == 6 and not bad + ws_bad, bad + ws_bad

def test_dynamic_shared_memory_past_48kb_makes_mlx_opt_in():
    """A block's static + dynamic shared memory may pass 48 KB only after the opt-in, which MLX's
    cuda_kernel does for more than 48000 dynamic bytes: the ask is raised past that where needed."""
    from mlx_moe_tune.kernels.common import MLX_OPTIN_DYNAMIC, cuda_dynamic_smem

    assert cuda_dynamic_smem(12 * 1024, 24 * 1024) == 24 * 1024  # 36 KB in all: no opt-in needed
    assert cuda_dynamic_smem(24 * 1024 + 64, 24 * 1024) > MLX_OPTIN_DYNAMIC  # 48 KB + 64 B
    assert cuda_dynamic_smem(32 * 1024, 64 * 1024) == 64 * 1024  # MLX opts in by itself
    assert cuda_dynamic_smem(40 * 1024, 0) == 0


def test_space_override_adds_values_of_a_tile_param(monkeypatch):
    """`--space PF=0,3` (sweep and tune): every family with PF searches both values, in this
    process and its children (environment); a malformed item or a param no family has is a
    clear error."""
    from mlx_moe_tune.kernels.family import SPACE_ENV

    monkeypatch.setenv(SPACE_ENV, "")  # restored after the test, whatever the calls below set
    base = {n: len(list(registry.FAMILIES[n].configs("cuda"))) for n in FAMILY_NAMES}
    assert registry.set_space_overrides(["PF=0,3", "WS=0,1"]) == {"PF": (0, 3), "WS": (0, 1)}
    for n in FAMILY_NAMES:
        cfgs = list(registry.FAMILIES[n].configs("cuda"))
        assert len(cfgs) == base[n] * (4 if n.startswith("qmm") else 2)  # WS is qmm's only
        assert {c["PF"] for c in cfgs} == {0, 3}
    valid = registry.FAMILIES["qmm"].valid_configs(SEED, CUDA)
    assert any(c["WS"] == 1 for c in valid) and all(c["BM"] >= 16 for c in valid if c["WS"] == 1)
    for bad in (["PF"], ["PF=a"], ["PF=0,,3"], ["=3"]):
        with pytest.raises(ValueError, match="KEY=V1,V2"):
            registry.set_space_overrides(bad)
    with pytest.raises(ValueError, match="no kernel family has tile parameter"):
        registry.set_space_overrides(["XQ=1"])
