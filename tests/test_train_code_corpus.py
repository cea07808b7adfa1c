"""The demo model v2's training inputs: the python-stdlib corpus (no tests, no generated files, split by module),
the code pre-tokenizer (indentation as single tokens, exact round trips) and the precision choice (bf16
autocast only where the CPU computes bf16 natively)."""
import sysconfig
from pathlib import Path

import pytest
import torch

from frontierlm.train.config import TrainConfig
from frontierlm.train.corpus import load_corpus, python_stdlib, split_documents
from frontierlm.train.precision import autocast_context, training_precision
from frontierlm.train.tokenizer import pretokenizer_for, train_tokenizer


def test_stdlib_corpus_has_source_without_tests_or_generated_files():
    pairs = python_stdlib()
    groups = {g for g, _ in pairs}
    assert {"os", "json", "email", "collections"} <= groups
    assert not any(g.startswith("test") for g in groups)
    assert "pydoc_data" not in groups  # the generated topic table
    texts = [t for _, t in pairs]
    assert not any("generated from" in t[:3000].lower() for t in texts)  # e.g. encodings/cp1252.py (gencodec)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert (root / "json" / "decoder.py").read_text(encoding="utf-8") in texts
    assert sum(map(len, texts)) > 5_000_000  # megabytes of real source


def test_split_by_module_keeps_each_package_on_one_side():
    docs, groups = load_corpus("python-stdlib")
    train, val = split_documents(docs, 0.05, groups=groups)
    assert len(train) + len(val) == len(docs) and len(val) >= 0.05 * len(docs)
    side = {}
    for text, group in zip(docs, groups):
        side.setdefault(group, set()).add(text in set(val))
    assert all(len(s) == 1 for s in side.values()), "a module has files in both splits"
    assert split_documents(docs, 0.05, groups=groups) == (train, val)  # deterministic


def test_split_by_group_needs_two_groups():
    with pytest.raises(ValueError, match="single group"):
        split_documents(["a", "b", "c"], 0.3, groups=["x", "x", "x"])


def test_code_tokenizer_keeps_indentation_whole_and_round_trips(tmp_path):
    source = [t for g, t in python_stdlib() if g in ("json", "textwrap", "colorsys", "bisect", "heapq")]
    tok = train_tokenizer(source, 1024, tmp_path / "tok", pretokenizer="code")
    snippet = "def area(r):\n    if r < 0:\n        raise ValueError('r')\n    return 3.14159 * r ** 2\n"
    ids = tok(snippet, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == snippet
    pieces = [tok.decode([i]) for i in ids]
    assert "\n    " in pieces and "\n        " in pieces  # newline + indentation: one token each
    for text in source[:3]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # The text pre-tokenizer never joins a newline to the next line's indentation.
    plain = train_tokenizer(source, 1024, pretokenizer="text")
    assert "\n    " not in [plain.decode([i]) for i in plain(snippet, add_special_tokens=False)["input_ids"]]


def test_pretokenizer_choice_and_config_validation():
    assert pretokenizer_for("python-stdlib") == "code"
    assert pretokenizer_for("python-docs") == "text"
    assert pretokenizer_for("python-docs", "code") == "code"
    with pytest.raises(ValueError, match="tokenizer_pretokenizer"):
        TrainConfig.from_dict({"data": {"tokenizer_pretokenizer": "words"}})
    with pytest.raises(ValueError, match="pretokenizer must be"):
        train_tokenizer(["x = 1"], 300, pretokenizer="words")


def test_precision_follows_the_cpu(monkeypatch):
    import frontierlm.train.precision as precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_unit", lambda: "AMX")
    assert training_precision(cpu, True) == "bf16 autocast (CPU, AMX)"
    with autocast_context(cpu, True):
        assert torch.nn.functional.linear(torch.randn(2, 8), torch.randn(4, 8)).dtype == torch.bfloat16
    assert training_precision(cpu, False) == "float32 (bf16 off)"
    monkeypatch.setattr(precision, "cpu_bf16_unit", lambda: None)
    assert training_precision(cpu, True).startswith("float32 (this CPU has neither")
    with autocast_context(cpu, True):
        assert torch.nn.functional.linear(torch.randn(2, 8), torch.randn(4, 8)).dtype == torch.float32
