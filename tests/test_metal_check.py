"""The Metal front-end check (mlx_moe_tune.metal_check): clang with Metal's address spaces, no
standard library, no double, C++14. Planted bugs must fail it; every shipped kernel must pass."""
from __future__ import annotations

import pytest

from mlx_moe_tune import metal_check as mc

try:
    mc.find_clang()
    HAVE_CLANG = True
except mc.MetalCheckUnavailable:
    HAVE_CLANG = False
import os

# scripts/test.sh installs the [metalcheck] extra: there the check must run, not skip
pytestmark = pytest.mark.skipif(not HAVE_CLANG and not os.environ.get("MLX_MOE_TUNE_REQUIRE_CLANG"),
                                reason="no clang (pip install 'mlx-moe-tune[metalcheck]')")


def _check(body: str, header: str = "", small: bool = False) -> mc.Row:
    """One kernel with inputs x (float), idx (int32) and output y (float), as metal_kernel builds
    it; small: idx has 2 elements, so MLX declares it `constant`."""
    ins = [mc._Sig("float32", 256), mc._Sig("int32", 2 if small else 64)]
    u = mc.kernel_unit("t", "-", "float32", 0, "constant" if small else "device", "t", ["x", "idx"], ["y"],
                       body, header, ins, ["float32"], None, "test.metal")
    (row,) = mc.check_group(header, [u])
    return row


GOOD = "uint i = thread_position_in_grid.x; y[i] = x[i] + float(idx[0]);"


def test_a_plain_kernel_passes():
    assert _check(GOOD).ok
    assert _check(GOOD, small=True).ok


def test_device_parameter_bound_to_a_constant_input_fails():
    header = "inline int first(const device int* p) { return p[0]; }\n"
    body = "y[thread_position_in_grid.x] = float(first(idx));"
    assert _check(body, header).ok  # idx of 64 elements: a device buffer
    bad = _check(body, header, small=True)  # 2 elements: `const constant int* idx`
    assert not bad.ok and "first" in bad.error


def test_threadgroup_pointer_where_device_is_expected_fails():
    header = "inline float take(const device float* p) { return p[0]; }\n"
    body = ("threadgroup float buf[32];\nbuf[thread_index_in_threadgroup] = 1.0f;\n"
            "threadgroup_barrier(mem_flags::mem_threadgroup);\ny[0] = take(buf);")
    bad = _check(body, header)
    assert not bad.ok and "take" in bad.error


def test_threadgroup_array_in_a_helper_fails():
    header = "inline float h(uint i) { threadgroup float s[4]; s[i] = 1.0f; return s[0]; }\n"
    assert not _check("y[0] = h(thread_index_in_threadgroup);", header).ok


def test_std_fails():
    assert not _check("y[0] = std::max(x[0], 1.0f);").ok
    assert not _check("y[0] = x[0];", header="#include <algorithm>\n").ok


def test_double_fails():
    bad = _check("double d = x[0];\ny[0] = float(d);")
    assert not bad.ok and "double" in bad.error
    bad = _check("y[0] = x[0] * 0.5;")  # implicit promotion to double
    assert not bad.ok and "double" in bad.error


def test_cxx17_fails_at_metal_3_1():
    assert mc.LEVELS[mc.DEFAULT_LEVEL] == (310, "c++14")
    assert not _check("if constexpr (true) { y[0] = x[0]; }").ok
    header = "struct P { int a; int b; };\n"
    assert not _check("P p{1, 2};\nauto [a, b] = p;\ny[0] = float(a + b);", header).ok


def test_implicit_bfloat_conversion_fails():
    # rule 7 of metal/README.md: convert bfloat16_t only with static_cast
    assert not _check("bfloat16_t b = x[0];\ny[0] = static_cast<float>(b);").ok
    assert _check("bfloat16_t b = static_cast<bfloat16_t>(x[0]);\ny[0] = static_cast<float>(b);").ok


def test_planted_rule1_bug_in_the_qmm_header_fails():
    """offsets as `const device int*` (the bug rule 1 of metal/README.md forbids): fine for a
    large layer, broken where the offsets have fewer than 8 elements."""
    from mlx_moe_tune.kernels import registry

    fam = registry.get("qmm")
    header, units = mc.family_units(fam, dtypes=("bfloat16",), bits_list=(4,))
    # (template parameter, argument) -> the same argument as a device pointer, in a helper the
    # qmm kernel instantiates; the first pattern the header has
    patterns = [(("typename OPtr, typename FPtr>", "typename OPtr>"), ("FPtr offsets", "const device int* offsets")),
                (("bool SORTED, typename OPtr>\ninline void zero_rows", "bool SORTED>\ninline void zero_rows"),
                 ("OPtr order, int r0", "const device int* order, int r0"))]
    found = [pat for pat in patterns if all(old in header for old, _ in pat)]
    if not found:
        pytest.skip("the qmm header takes its routing inputs another way")
    bad = header
    for old, new in found[0]:
        bad = bad.replace(old, new)
    rows = mc.check_group(bad, units)
    assert all(r.ok for r in rows if r.variant == "device")
    small = [r for r in rows if r.variant == "constant"]
    assert small and not any(r.ok for r in small)


def test_every_shipped_metal_kernel_passes():
    rows = mc.check_all()
    assert {r.family for r in rows} >= {"qmv", "qmv_glu", "qmm", "qmm_glu", "plan", "stream_read"}
    assert {r.dtype for r in rows if r.family == "qmm"} == {"float16", "bfloat16", "float32"}
    assert {r.bits for r in rows if r.family == "qmm"} == {2, 4, 8}
    assert {r.variant for r in rows if r.family == "qmv"} == {"device", "constant"}
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"{r.family} {r.config} {r.dtype} {r.bits} {r.variant}: {r.error}" for r in bad[:10])


def test_cli(capsys):
    from mlx_moe_tune.cli import main

    assert main(["metal-check", "--family", "qmv"]) == 0
    out = capsys.readouterr().out
    assert "Metal 3.1 (c++14)" in out and "qmv" in out
