"""`mlx-moe-tune` command line: one subcommand per module, dispatched here."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module exposes `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "sweep": ("mlx_moe_tune.sweep", "measure GB/s across m and kernels/configs"),
    "plot": ("mlx_moe_tune.plot", "plot a sweep's CSV (regime cliff, heatmap, speedup)"),
    "info": ("mlx_moe_tune.info", "backend, device, memory and bandwidth"),
    "selftest": ("mlx_moe_tune.selftest", "run every shipped kernel config on small shapes vs the numpy reference"),
    "report": ("mlx_moe_tune.report", "a sweep CSV as a markdown table (stock vs best tuned per m)"),
    "tune": ("mlx_moe_tune.tune", "search tile configs per m bucket and write a tuning table"),
    "ptxas": ("mlx_moe_tune.nvrtc", "compile the CUDA configs with NVRTC (no GPU needed): registers, spills, occupancy"),
    "metal-check": ("mlx_moe_tune.metal_check", "parse every Metal kernel with clang as Metal's front end would (no Mac needed)"),
    "doctor": ("mlx_moe_tune.doctor", "selftest, a short sweep and a budgeted tune into one folder to share"),
    "bench-model": ("mlx_moe_tune.bench_model", "tokens/s of an mlx-lm MoE model, stock vs patched, via mlx-lm's generation paths"),
    "profile-step": ("mlx_moe_tune.step_profile", "where a decode step's time goes (host, device, MoE, kernels), stock vs patched"),
    "generate": ("mlx_moe_tune.generate", "mlx_lm.generate with the model patched (same flags, plus --no-patch)"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-moe-tune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # only the chosen command's module is imported: some (generate) pull in mlx-lm, which
    # would add seconds to every other command
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if args.command not in modules:
        parser.error(f"command {args.command!r} is not available in this build")
    # the command line to re-run after a hard hang (watchdog.py): only when this process is the
    # command line's own, never when main() was called from other code (tests, notebooks)
    args.restart_argv = list(sys.orig_argv) if argv is None and getattr(sys, "orig_argv", None) else None
    try:
        return int(modules[args.command].run(args) or 0)
    except (CLIError, ValueError, OSError) as e:
        print(f"mlx-moe-tune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(modules[args.command], "INTERRUPT_HINT", "")
        print(f"mlx-moe-tune {args.command}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
