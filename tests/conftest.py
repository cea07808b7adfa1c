import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import factories.py and each other's helpers
torch.set_num_threads(min(2, torch.get_num_threads()))
# The compiled decode step costs an inductor compile per engine (tens of seconds on 2 cores); it is tested in
# test_fast_path.py, and everywhere else (subprocess servers included) engines stay on the eager path.
os.environ.setdefault("FRONTIERLM_DECODE_WARMUP_STEPS", str(10**9))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP spin-waits crawl on a shared 2-core box
    (modules opt in with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Cached factory: tiny_model_dir(arch, **config_overrides) -> path of a random-weight HF model dir."""
    from factories import make_model_dir

    cache = {}

    def build(arch="llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-model")
            cache[key] = str(make_model_dir(path, arch, **overrides))
        return cache[key]

    return build


@pytest.fixture(scope="module")
def dist_timeout():
    """Multi-process tests: a rank that hangs fails the test within a minute instead of the default timeout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRONTIERLM_DIST_TIMEOUT_S", "60")
        yield
