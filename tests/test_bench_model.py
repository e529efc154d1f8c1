"""`mlx-moe-tune bench-model` through the CLI's main() on a tiny random qwen3_moe (`--arch tiny`),
against stock mlx-lm's own generation on the same weights; its bad-argument errors; the JSON.

float32, as in test_generate.py: in bf16 two correct kernels' roundings can pick different greedy
tokens on a random model. No timing bounds: tokens/s here is the CPU emulator's.
"""
from __future__ import annotations

import contextlib
import io
import json

import mlx.core as mx
import pytest

from mlx_moe_tune import bench_model, random_model
from mlx_moe_tune.cli import main

ARGS = ["bench-model", "--arch", "tiny", "--random", "--layers", "1", "--dtype", "float32", "--seed", "3"]


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mlx_moe_tune.backend import gpu_backend

    if gpu_backend() == "cuda":
        pytest.skip("float32 test model: the CUDA kernels take bf16/fp16 only")
    d = tmp_path_factory.mktemp("bench")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*ARGS, "-p", "6,40", "-b", "1,2", "-g", "12", "-n", "2", "--json", str(d / "b.json"),
                   "--plot", str(d / "b.png")])
    return rc, json.loads((d / "b.json").read_text()), d, out.getvalue()


def _stock_greedy(prompt: list[int], n: int) -> list[int]:
    """Stock mlx-lm on the same weights: mlx_lm.stream_generate's path, unpatched."""
    from mlx_lm.generate import generate_step

    cfg = random_model.arch_config("tiny", 1)
    model = random_model.build_model(cfg, dtype=mx.float32, seed=3)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def test_json_contents(run):
    rc, doc, _, _ = run
    assert rc == 0 and doc["complete"] and doc["tool"] == "mlx-moe-tune bench-model"
    env = doc["environment"]
    assert env["device_info"] == {k: (v if isinstance(v, (int, float, str)) else str(v))
                                  for k, v in mx.device_info().items()}
    assert env["versions"]["mlx"] == mx.__version__ and env["versions"]["mlx_lm"] and env["date"]
    assert "git_commit" in env and isinstance(doc["argv"], list)
    assert doc["args"]["batch_sizes"] == "1,2" and doc["args"]["trials"] == 2
    assert doc["model"]["arch"] == "tiny" and doc["model"]["config"]["num_hidden_layers"] == 1
    assert doc["patch"]["projections"] == 3 and not doc["patch"]["unpatched"]
    assert [(c["prompt_tokens"], c["batch_size"]) for c in doc["cells"]] == [(6, 1), (6, 2), (40, 1), (40, 2)]
    for c in doc["cells"]:
        assert c["status"] == "ok" and not c["errors"]
        for v in ("stock", "patched"):
            trials = c["trials"][v]
            assert [t["trial"] for t in trials] == [0, 1]
            assert [t["first"] for t in trials] == ([True, False] if v == "stock" else [False, True])  # interleaved
            for t in trials:
                assert t["prompt_tps"] > 0 and t["generation_tps"] > 0 and t["peak_memory_gb"] > 0
                assert t["generation_tokens"] == 12 * c["batch_size"] and t["same_tokens_as_warmup"]
            for m in bench_model.METRICS:  # the summary is the raw trials' median and range
                vals = sorted(t[m] for t in trials)
                s = c["summary"][v][m]
                assert (s["min"], s["max"], s["n"]) == (vals[0], vals[-1], 2)
                assert s["median"] == pytest.approx(sum(vals) / 2)
        for m in bench_model.METRICS:
            assert c["ratio"][m] == pytest.approx(c["summary"]["patched"][m]["median"] / c["summary"]["stock"][m]["median"])


def test_greedy_tokens_match_stock_mlx_lm(run):
    _, doc, _, _ = run
    cells = {(c["prompt_tokens"], c["batch_size"]): c for c in doc["cells"]}
    for c in doc["cells"]:
        g = c["greedy"]
        assert g["agree"] and g["sequences_agreeing"] == c["batch_size"], g
    # batch 1 went through mlx-lm's generate_step: the same tokens as stock mlx-lm on those weights
    for P in (6, 40):
        prompt = mx.random.randint(0, 256, (1, P), key=mx.random.key(3 + list(cells).index((P, 1)))).tolist()[0]
        ref = _stock_greedy(prompt, 12)
        assert cells[(P, 1)]["greedy"]["stock_tokens"] == ref == cells[(P, 1)]["greedy"]["patched_tokens"]
        assert len(set(ref)) > 1, ref  # a varied sequence, not one repeated token


def test_table_and_plot(run):
    _, doc, d, stdout = run
    out = stdout.splitlines()  # the table; per-trial lines go to stderr
    header = next(i for i, t in enumerate(out) if t.startswith(bench_model.HEADER[:20]))
    rows = out[header + 1:]
    assert len(rows) == 4 and all(r.split()[:2] == [str(c["prompt_tokens"]), str(c["batch_size"])]
                                  for r, c in zip(rows, doc["cells"]))
    assert all(r.rstrip().endswith("same") for r in rows)
    assert (d / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--arch", "nope", "--random"], ["--arch 'nope'", "qwen3_moe", "tiny"]),
    (["--arch", "tiny", "--random", "--batch-sizes", "0"], ["--batch-sizes '0'", ">= 1"]),
    (["--arch", "tiny", "--random", "-p", "5,x"], ["--prompt-tokens", "integers"]),
    (["--arch", "tiny"], ["--random"]),
    ([], ["--model", "--arch"]),
    (["--model", "/no/such/dir"], ["--model", "no such directory"]),
    (["--model", "/tmp", "--bits", "4"], ["--bits", "--arch models only"]),
    (["--arch", "tiny", "--random", "-g", "1"], ["--gen-tokens 1", ">= 2"]),
    (["--arch", "tiny", "--random", "-n", "0"], ["--trials 0"]),
    (["--arch", "tiny", "--random", "--layers", "0"], ["--layers 0"]),
    (["--arch", "tiny", "--random", "--json", "/no/such/dir/x.json"], ["--json", "does not exist"]),
])
def test_bad_arguments_one_line(capsys, args, words):
    rc, err = _err(capsys, ["bench-model", *args])
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mlx-moe-tune bench-model: error:"), err
    for w in words:
        assert w in err, (w, err)


def test_deadline_records_what_was_cut(tmp_path, capsys):
    out = tmp_path / "cut.json"
    assert main([*ARGS, "-p", "4", "-b", "1,2", "-g", "2", "--deadline", "0", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert not doc["complete"] and [c["status"] for c in doc["cells"]] == ["cut by --deadline"] * 2
    assert all(c["trials"] == {"stock": [], "patched": []} for c in doc["cells"])


def test_variants_swap_the_same_modules():
    """The toggle puts back the very module objects (and so the patched layers' compiled decode
    functions) instead of re-patching; stock is mlx-lm's own classes, with the same arrays."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import SwitchGLU

    from mlx_moe_tune.patch import TunedSwitchGLU

    model = random_model.build_model(random_model.arch_config("tiny", 2), dtype=mx.float32)
    stock = [m for _, m in model.named_modules() if type(m) is SwitchGLU]
    params = {k: id(v) for k, v in tree_flatten(model.parameters())}
    v = bench_model.Variants(model)
    patched = [m for _, m in model.named_modules() if type(m) is TunedSwitchGLU]
    assert v.projections == 6 and len(patched) == 2
    for _ in range(2):
        v.use("stock")
        now = [m for _, m in model.named_modules() if isinstance(m, SwitchGLU)]
        assert len(now) == 2 and all(a is b for a, b in zip(now, stock))
        v.use("patched")
        now = [m for _, m in model.named_modules() if isinstance(m, SwitchGLU)]
        assert len(now) == 2 and all(a is b for a, b in zip(now, patched))
        assert {k: id(x) for k, x in tree_flatten(model.parameters())} == params


def test_agreement():
    a = bench_model.agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert not a["agree"] and a["first_divergence"] == 1 and a["sequences_agreeing"] == 1
    assert bench_model.agreement([[1, 2]], [[1, 2]])["agree"]


def test_cells_batch_prompt_tokens():
    assert bench_model.cells([512, 2048], [1, 8], None) == [(512, 1), (512, 8), (2048, 1), (2048, 8)]
    assert bench_model.cells([512, 2048], [1, 8, 64], 128) == [(512, 1), (128, 8), (128, 64), (2048, 1)]


def test_profile_step_on_the_emulator(tmp_path, capsys):
    """profile-step measures both variants and the model without its MoE blocks, and finds a
    qwen3_moe model's MoE block by its SwitchGLU."""
    from mlx_moe_tune import step_profile

    out = tmp_path / "step.json"
    assert main(["profile-step", "--arch", "tiny", "--random", "--layers", "1", "-b", "2", "-n", "2",
                 "--trials", "1", "--context", "8", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["moe_blocks"] == 1
    (row,) = doc["results"]
    for v in ("stock", "patched", "no_moe"):
        assert row[v]["step_ms"] > 0 and row[v]["sync_ms"] >= row[v]["build_ms"] > 0
    assert row["moe_ms"]["stock"] == pytest.approx(row["stock"]["step_ms"] - row["no_moe"]["step_ms"])
    assert "batch   2: step stock" in capsys.readouterr().out
    model = random_model.build_model(random_model.arch_config("tiny", 1))
    paths = step_profile._moe_paths(model)
    assert paths == ["model.layers.0.mlp"]


def test_profile_step_bad_arguments(capsys):
    assert main(["profile-step", "--arch", "tiny", "--random", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps 0: must be >= 1" in err and len(err.strip().splitlines()) == 1
