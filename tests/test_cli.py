"""Bad command-line input: one line on stderr, exit code 2, no traceback. Plus `info` and presets."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlx_moe_tune import presets
from mlx_moe_tune.cli import main
from mlx_moe_tune.info import peak_bandwidth


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("args, words", [
    (["--preset", "no-such-model"], ["unknown preset", "tiny"]),
    (["--m", "0"], ["--m", ">= 1"]),
    (["--m", "5..2"], ["--m", "empty range"]),
    (["--m", "1..x"], ["--m", "expected forms"]),
    (["--bits", "7"], ["bits=7", "not supported"]),
    (["--group-size", "48"], ["group_size=48"]),
    (["--mode", "mxfp4", "--group-size", "64"], ["mxfp4", "group size"]),
    (["--mode", "int3"], ["--mode"]),
    (["--dtype", "int8"], ["--dtype"]),
    (["--shape", "8,256,128"], ["--shape", "E,K,N,TOPK"]),
    (["--shape", "8,100,128,2"], ["K=100", "group size 64"]),
    (["--router", "random"], ["--router"]),
    (["--kernels", "nope.*"], ["matches no kernel"]),
    (["--router", "sparse", "--active", "1"], ["--active 1", "top_k=2"]),
    (["--iters", "0"], ["--iters"]),
    (["--preset", "tiny", "--shape", "8,256,128,2"], ["not both"]),
])
def test_sweep_rejects_bad_input(tmp_path, capsys, args, words):
    rc, err = _err(capsys, ["sweep", "--quiet", "-o", str(tmp_path / "x.csv"), *args])
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("mlx-moe-tune sweep: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "x.csv").exists() or (tmp_path / "x.csv").stat().st_size == 0


def test_sweep_rejects_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a path "under" a regular file cannot be created, whoever runs the test (root included)
    rc, err = _err(capsys, ["sweep", "--quiet", "-o", str(blocker / "out.csv")])
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot write" in err
    rc, err = _err(capsys, ["sweep", "--quiet", "-o", str(tmp_path)])
    assert rc == 2 and "is a directory" in err


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-m", "mlx_moe_tune.cli", "sweep", "--m", "5..2", "-o",
                        str(tmp_path / "x.csv")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["mlx-moe-tune sweep: error: --m '5..2': empty range 5..2"]


def test_info_json(capsys):
    rc = main(["info", "--no-probe", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["backend"] in ("cpu", "cuda", "metal") and d["device"]
    assert d["memory_gb"] is None or d["memory_gb"] > 0


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000), ("NVIDIA H200", 4800),
    ("Apple M1", 68.25), ("Apple M1 Max", 400), ("Apple M2 Ultra", 800), ("Apple M4 Pro", 273),
    ("Apple M5", 153), ("Apple M5 Pro", 307),
])
def test_peak_bandwidth_table(name, gbps):
    assert peak_bandwidth(name)[0] == gbps


def test_peak_bandwidth_unknown():
    assert peak_bandwidth("Intel(R) Xeon(R) Processor") is None
    assert peak_bandwidth("Apple M10") is None  # "M1" must not match a longer number


def test_presets_hold_the_model_shapes():
    assert {"tiny", "gemma-26b-a4b", "qwen3-30b-a3b"} <= set(presets.list_presets())
    g = presets.load_preset("gemma-26b-a4b")
    assert (g.experts, g.top_k, g.mode, g.bits, g.group_size, g.dtype) == (128, 8, "affine", 4, 64, "bfloat16")
    assert [(m.k, m.n) for m in g.matrices] == [(2816, 1408), (2816, 704)]
    q = presets.load_preset("qwen3-30b-a3b")
    assert (q.experts, q.top_k) == (128, 8) and [(m.k, m.n) for m in q.matrices] == [(2048, 768), (768, 2048)]
    for name in presets.list_presets():  # every shipped preset loads and is quantizable by MLX
        p = presets.load_preset(name)
        assert all(m.k % p.group_size == 0 for m in p.matrices), name


def test_bad_preset_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("experts = 8\ntop_k = 2\n")
    with pytest.raises(ValueError, match="matrices"):
        presets.load_preset(str(bad))
    bad.write_text("experts = [\n")
    with pytest.raises(ValueError, match="bad TOML"):
        presets.load_preset(str(bad))
