"""Compiling the decode fast path's graphs at start-up (EngineConfig.compile_decode_at_startup): the dummy steps
touch no request, scheduler state or managed KV block; greedy outputs afterwards equal the eager path's; the
steady decode run that follows compiles nothing more. Plus the flag's plumbing and the inductor cache directory."""
import argparse
import os

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

import frontierlm.engine.fast_decode as fd
from frontierlm import LLM
from frontierlm.cli_args import add_engine_args, engine_config
from frontierlm.config import EngineConfig
from frontierlm.engine.compile_cache import CacheProbe, use_persistent_inductor_cache
from fast_helpers import engine_pair, greedy as _greedy, prompts as _prompts, same as _same

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """(eager, compiled at start-up) engines of the tiny Llama (tests/fast_helpers.py)."""
    return engine_pair(tiny_model_dir("llama"), compile_decode_at_startup=True)


def test_startup_compile_touches_no_engine_state(pair):
    eager, fast = pair
    engine, f = fast.llm_engine, fast.llm_engine.runner.fast_decode
    n, seconds, cache = f.startup_compile
    assert n == len(f.startup_shapes()) and set(f.startup_shapes()) <= f._seen  # every shape went through
    assert seconds > 0 and (cache == "warm" or cache.startswith("cold"))
    assert not f.disabled and f.warmup_steps == 0
    assert {b for b, _ in f._seen} == set(f.ladder) and {w for _, w in f._seen} == set(f.widths)
    # the scheduler and the cache manager never saw a request
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks == eager.llm_engine.kv.num_blocks
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.groups
    assert f.fast_steps == 0 and f.decode_steps == 0
    # the dummy rows wrote only the scratch block (the last one, past the managed blocks)
    for cache_tensor in engine.runner.kv_caches:
        assert not cache_tensor[:, :engine.kv.num_blocks].any()
        assert cache_tensor[:, engine.kv.num_blocks:].any()
    assert f"compiled at start-up: {n} shapes" in engine.startup_report and "inductor cache" in engine.startup_report


def test_outputs_equal_eager_with_no_recompile(pair):
    eager, fast = pair
    f = fast.llm_engine.runner.fast_decode
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    # 3 and 1 running requests (CPU: batches 3 and 1 unpadded, both graphs already compiled at start-up), prompts
    # and decodes crossing block-table widths 8 -> 16
    prompts = _prompts(3, length=60) + _prompts(1, start=201, length=5)
    params = [_greedy(12 + 4 * i) for i in range(4)]
    outs = [llm.generate(prompts, params, use_tqdm=False) for llm in (eager, fast)]
    _same(*outs)
    assert f.fast_steps >= 12  # the fast path from the first decode step on: no eager warm-up after start-up
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # nothing compiled during the run
    assert 3 in {b for b, _ in f._seen} and 3 not in f.ladder  # the symbolic-batch graph ran 3 rows, no padding


def test_lazy_by_default_and_serve_default():
    assert EngineConfig(model="m").compile_decode_at_startup is None  # offline: lazy, as before
    with pytest.raises(ValueError, match="compile_decode_at_startup must be a bool"):
        EngineConfig(model="m", compile_decode_at_startup="yes")
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_engine_args(parser)
    serve_default = {"compile_decode_at_startup": True}  # what `frontierlm serve` passes (server/launch.py)
    assert engine_config(parser.parse_args(["m"]), **serve_default).compile_decode_at_startup is True
    off = parser.parse_args(["m", "--no-compile-decode-at-startup"])
    assert engine_config(off, **serve_default).compile_decode_at_startup is False
    assert engine_config(parser.parse_args(["m", "--compile-decode-at-startup"])).compile_decode_at_startup is True


def test_inductor_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = use_persistent_inductor_cache()
    assert path == str(tmp_path / "xdg" / "frontierlm" / "inductor") and (tmp_path / "xdg").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path  # what inductor reads
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch wrote its /tmp default there
    assert use_persistent_inductor_cache() == path
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_persistent_inductor_cache() == str(tmp_path / "mine")  # the operator's choice wins


def test_cache_probe_counts_added_files(tmp_path):
    probe = CacheProbe(str(tmp_path))
    assert probe.verdict() == "warm"
    (tmp_path / "kernel.so").write_text("x")
    assert probe.verdict() == "cold, 1 files added"
    (tmp_path / "sub").mkdir()
    probe = CacheProbe(str(tmp_path))
    (tmp_path / "sub" / "wrapper.py").write_text("x")  # rewritten by every process: not a cache miss
    assert probe.verdict() == "warm"
    (tmp_path / "sub" / "b.so").write_text("x")
    assert probe.verdict() == "cold or partly warm, 1 files added"
