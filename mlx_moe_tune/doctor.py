"""`mlx-moe-tune doctor`: the one command a Mac (or GPU) user runs and shares.

It runs, in order, each as its own subcommand would and into one folder:
1. `selftest`: every shipped kernel config vs the numpy reference on this device;
2. `tune --budget`: a budgeted search of the tile space for the preset's shapes (tables into
   `<out>/tables`);
3. `sweep`: stock `mx.gather_qmm` vs the op's own choice (`tuned.auto`, now reading those
   tables) vs the bandwidth probe, over m;
4. `report` (markdown) and `plot` (the regime cliff, the speedup) of that sweep, and `info`.
A failing step is recorded and the others still run. The folder's README.md says what is in it
and how to send it: zip the folder and attach it to a GitHub issue of the project.

On the CPU (no GPU backend) the kernels run on the emulator, so the defaults shrink to a dry
run: the `tiny` preset, two m values, the qmv family's first config per selftest case, two tune
candidates per bucket. `sweeps/results/example-report/` is such a run, committed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

SUBMIT = ("To share it: zip this folder (`zip -r {name}.zip {name}`) and attach the zip to a new GitHub "
          "issue on the mlx-moe-tune repository, titled with your device (e.g. \"doctor: Apple M4 Pro, "
          "macOS 15.5\"); say what you ran if it was not the defaults.")


def _defaults(gpu: bool) -> dict:
    if gpu:
        return dict(preset="gemma-26b-a4b", m="1..64x2", budget="60s", iters=None,
                    kernels="stock.gather_qmm,stock.gather_qmm_unsorted,tuned.auto,ref.bandwidth",
                    selftest=[])
    return dict(preset="tiny", m="1,4", budget="2", iters=3, kernels="stock.gather_qmm,tuned.auto,ref.bandwidth",
                selftest=["--family", "qmv", "--max-configs", "1"])


def _step(name: str, argv: list[str], log: Path, steps: list) -> int:
    """Run `mlx-moe-tune <argv>` in this process, its output into `log` (and a line here)."""
    from .cli import main

    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = int(e.code or 0)
        except Exception as e:  # noqa: BLE001 - a failing step is a result; the others still run
            print(f"{type(e).__name__}: {e}")
            rc = 1
    log.write_text(f"$ mlx-moe-tune {' '.join(argv)}\n{buf.getvalue()}")
    dt = time.perf_counter() - t0
    steps.append(dict(step=name, command="mlx-moe-tune " + " ".join(argv), rc=rc, seconds=round(dt, 1),
                      log=log.name))
    print(f"  {name:<9} {'ok' if rc == 0 else f'exit {rc}':<8} {dt:6.1f} s   {log.name}", flush=True)
    return rc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", default=None,
                   help="output folder (default: mlx-moe-tune-doctor-<device>-<date> here)")
    p.add_argument("--preset", default=None, help="model shape (default gemma-26b-a4b on a GPU, tiny on the CPU)")
    p.add_argument("--m", default=None, help="rows per expert to sweep and tune (default 1..64x2 on a GPU, 1,4 on the CPU)")
    p.add_argument("--budget", default=None, help="tune budget per m bucket: N configs or Ns (default 60s on a GPU, 2 on the CPU)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: selftest, tune, sweep")


def run(args) -> int:
    import mlx.core as mx

    from .backend import gpu_backend

    gpu = gpu_backend()
    d = _defaults(gpu is not None)
    preset, m, budget = args.preset or d["preset"], args.m or d["m"], args.budget or d["budget"]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        device = str(mx.device_info().get("device_name") or "")
    except Exception:  # noqa: BLE001
        device = ""
    device = device or (gpu or "cpu")
    out = Path(args.out or f"mlx-moe-tune-doctor-{_slug(device)}-{time.strftime('%Y%m%d')}")
    out.mkdir(parents=True, exist_ok=True)
    tables = out / "tables"
    print(f"mlx-moe-tune doctor: {device} ({gpu or 'CPU, kernels on the emulator'}), preset {preset}, m {m} -> {out}")
    steps: list = []
    t0 = time.perf_counter()
    _step("info", ["info", "--json"], out / "info.json.log", steps)
    if "selftest" not in skip:
        _step("selftest", ["selftest", *d["selftest"]], out / "selftest.txt", steps)
    if "tune" not in skip:
        _step("tune", ["tune", "--preset", preset, "--m", m, "--budget", budget, "--table", str(tables),
                       "-o", str(out / "tune"), "--quiet", *([] if gpu else ["--iters", str(d["iters"])])],
              out / "tune.txt", steps)
    sweep_csv = out / "sweep.csv"
    if "sweep" not in skip:
        old = os.environ.get("MLX_MOE_TUNE_TABLES")
        os.environ["MLX_MOE_TUNE_TABLES"] = str(tables)  # tuned.auto reads the tables just made
        _forget_choices()
        try:
            _step("sweep", ["sweep", "--preset", preset, "--m", m, "--kernels", d["kernels"], "-o", str(sweep_csv),
                            "--quiet", *([] if gpu else ["--iters", str(d["iters"])])], out / "sweep.txt", steps)
        finally:
            if old is None:
                os.environ.pop("MLX_MOE_TUNE_TABLES", None)
            else:
                os.environ["MLX_MOE_TUNE_TABLES"] = old
            _forget_choices()
    if sweep_csv.exists():
        _step("report", ["report", str(sweep_csv), "-o", str(out / "report.md")], out / "report.txt", steps)
        _step("plot", ["plot", str(sweep_csv), "-o", str(out / "cliff.png")], out / "plot-cliff.txt", steps)
        _step("plot", ["plot", str(sweep_csv), "-o", str(out / "speedup.png"), "--kind", "speedup"],
              out / "plot-speedup.txt", steps)
    info = out / "info.json.log"
    if info.exists():  # the JSON without the command line
        text = info.read_text().split("\n", 1)[-1]
        (out / "info.json").write_text(text)
        info.unlink()
        steps[0]["log"] = "info.json"
    total = time.perf_counter() - t0
    command = " ".join(["mlx-moe-tune", "doctor", *sys.argv[2:]]) if sys.argv[1:2] == ["doctor"] else None
    (out / "doctor.json").write_text(json.dumps(dict(
        device=device, backend=gpu or "cpu (emulator)", mlx=mx.__version__, preset=preset, m=m, budget=budget,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seconds=round(total, 1), steps=steps,
        command=command),
        indent=2) + "\n")
    _write_readme(out, device, gpu, preset, m, budget, steps, command)
    failed = [s for s in steps if s["rc"] != 0]
    print(f"doctor: {len(steps) - len(failed)}/{len(steps)} steps ok in {total:.0f} s; "
          f"see {out / 'README.md'}\n{SUBMIT.format(name=out.name)}")
    return 1 if failed else 0


def _forget_choices() -> None:
    """The op memoizes tile choices per shape; the sweep must see the tables just tuned."""
    from . import ops

    for name in ("_CHOICES", "_SPECS"):
        memo = getattr(ops, name, None)
        if isinstance(memo, dict):
            memo.clear()


def _write_readme(out: Path, device: str, gpu, preset: str, m: str, budget: str, steps: list,
                  command: str | None) -> None:
    rows = "\n".join(f"| {s['step']} | `{s['command']}` | {'ok' if s['rc'] == 0 else 'exit ' + str(s['rc'])} | "
                     f"{s['seconds']} | `{s['log']}` |" for s in steps)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    report = (out / "report.md").read_text() if (out / "report.md").exists() else "(no sweep report)\n"
    where = gpu or ("the CPU: no GPU backend, so our kernels ran on the emulator and stock on MLX's CPU "
                    "backend; these times are not comparable and say nothing about a GPU")
    text = f"""# mlx-moe-tune doctor: {device}

Made by `{command or 'mlx-moe-tune doctor'}` ({time.strftime('%Y-%m-%d')}). Backend: {where};
preset `{preset}`, m `{m}`, tune budget `{budget}` per m bucket.

{SUBMIT.format(name=out.name)}

| step | command | result | seconds | output |
|---|---|---|---:|---|
{rows}

## Sweep report (`report.md`)

{report}
![regime cliff](cliff.png)

![tuned vs stock](speedup.png)

## Files

{chr(10).join(f'- `{f}`' for f in files)}
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
