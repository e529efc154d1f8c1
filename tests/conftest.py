import pytest


def _gpu_backend():
    try:
        from mlx_moe_tune.backend import gpu_backend

        return gpu_backend()
    except Exception:
        return None


def pytest_collection_modifyitems(config, items):
    if _gpu_backend() is not None:
        return
    skip = pytest.mark.skip(reason="needs MLX's Metal or CUDA backend")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
