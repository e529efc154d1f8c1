"""`mlx-moe-tune doctor` on the CPU: the dry run (tiny preset, emulator) writes the whole folder."""
from __future__ import annotations

import json

from mlx_moe_tune.cli import main


def test_doctor_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLX_MOE_TUNE_CACHE", str(tmp_path / "cache" / "tune-cache.jsonl"))  # a fresh tune
    out = tmp_path / "report"
    rc = main(["doctor", "-o", str(out), "--m", "1"])
    printed = capsys.readouterr().out
    meta = json.loads((out / "doctor.json").read_text())
    assert rc == 0, meta["steps"]
    assert [s["step"] for s in meta["steps"]] == ["info", "selftest", "tune", "sweep", "report", "plot", "plot"]
    for f in ("README.md", "report.md", "cliff.png", "speedup.png", "sweep.csv", "sweep.json", "selftest.txt",
              "tune/tune.csv", "info.json"):
        assert (out / f).exists(), f
    assert list((out / "tables").glob("*.json")), "the tune wrote no table"
    readme = (out / "README.md").read_text()
    assert "zip" in readme and "GitHub issue" in readme and "tuned.auto" in (out / "sweep.csv").read_text()
    assert "passed" in (out / "selftest.txt").read_text()
    assert "zip -r report.zip report" in printed
