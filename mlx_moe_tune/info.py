"""`mlx-moe-tune info`: the backend, device, memory, its known peak bandwidth and a quick probe.

Peak numbers are the vendors' published DRAM bandwidths (GB/s). Where a chip ships in bins
with different memory buses (M3 Max, M4 Max, M5 Max) the table lists the larger and notes the
smaller; the measured probe tells which one you have.
"""
from __future__ import annotations

import argparse
import re

# (pattern matched against the device name, GB/s, note). Longest / most specific first.
PEAK_BANDWIDTH: list[tuple[str, float, str]] = [
    (r"H200", 4800.0, "NVIDIA H200 (HBM3e)"),
    (r"H100.*NVL", 3900.0, "NVIDIA H100 NVL"),
    (r"H100.*PCIe", 2000.0, "NVIDIA H100 PCIe (HBM2e)"),
    (r"H100", 3350.0, "NVIDIA H100 SXM (HBM3)"),
    (r"A100.*80GB", 2039.0, "NVIDIA A100 80GB SXM"),
    (r"A100", 1555.0, "NVIDIA A100 40GB"),
    (r"M1 Ultra", 800.0, "Apple M1 Ultra"),
    (r"M1 Max", 400.0, "Apple M1 Max"),
    (r"M1 Pro", 200.0, "Apple M1 Pro"),
    (r"M1", 68.25, "Apple M1"),
    (r"M2 Ultra", 800.0, "Apple M2 Ultra"),
    (r"M2 Max", 400.0, "Apple M2 Max"),
    (r"M2 Pro", 200.0, "Apple M2 Pro"),
    (r"M2", 100.0, "Apple M2"),
    (r"M3 Ultra", 819.0, "Apple M3 Ultra"),
    (r"M3 Max", 400.0, "Apple M3 Max (the 30-core-GPU bin: 300)"),
    (r"M3 Pro", 150.0, "Apple M3 Pro"),
    (r"M3", 100.0, "Apple M3"),
    (r"M4 Max", 546.0, "Apple M4 Max (the 32-core-GPU bin: 410)"),
    (r"M4 Pro", 273.0, "Apple M4 Pro"),
    (r"M4", 120.0, "Apple M4"),
    (r"M5 Max", 614.0, "Apple M5 Max (the smaller bin: 460)"),
    (r"M5 Pro", 307.0, "Apple M5 Pro"),
    (r"M5", 153.0, "Apple M5"),
]


def peak_bandwidth(device_name: str) -> tuple[float, str] | None:
    """(GB/s, which entry matched) for a device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for pat, gbps, note in PEAK_BANDWIDTH:
        # "M1" must not match "M10"; names like "Apple M3 Max" contain the chip as a word
        if re.search(pat.replace(" ", r"\s+") + r"(?![0-9])", device_name, flags=re.IGNORECASE):
            return gbps, note
    return None


def collect(probe: bool = True) -> dict:
    import mlx.core as mx

    from . import measure
    from .backend import default_backend, gpu_backend

    gpu = gpu_backend()
    if gpu:
        mx.set_default_device(mx.gpu)
    info = mx.device_info()
    name = measure.device_name()
    mem = info.get("memory_size") or info.get("total_memory")
    if not mem and not gpu:  # MLX reports no CPU memory: ask the OS
        try:
            import os

            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            mem = None
    out = {
        "mlx_version": mx.__version__,
        "backend": gpu or "cpu",
        "kernel_backend": default_backend().name,
        "device": name,
        "architecture": info.get("architecture"),
        "memory_gb": round(mem / 1e9, 1) if mem else None,
        "last_level_cache_mb": round(measure.llc_bytes() / 1e6),
    }
    peak = peak_bandwidth(name)
    out["peak_gbps"], out["peak_source"] = (peak if peak else (None, "unknown device: no published peak in the table"))
    if probe:
        out["measured_read_gbps"] = round(measure.measure_bandwidth(iters=10), 1)
        out["probe_bytes"] = measure.probe_buffer().nbytes
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-probe", action="store_true", help="skip the bandwidth measurement")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import json

    d = collect(probe=not args.no_probe)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    labels = {
        "mlx_version": "MLX", "backend": "backend", "kernel_backend": "tuned kernels run on",
        "device": "device", "architecture": "architecture", "memory_gb": "memory (GB)",
        "last_level_cache_mb": "last-level cache (MB, assumed)", "peak_gbps": "known peak bandwidth (GB/s)",
        "peak_source": "peak from", "measured_read_gbps": "measured read bandwidth (GB/s)",
        "probe_bytes": "probe size (bytes)",
    }
    for k, v in d.items():
        print(f"{labels.get(k, k):32s} {'-' if v is None else v}")
    return 0
