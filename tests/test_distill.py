"""Distillation: a tiny student learns from a briefly trained teacher; held-out KL(teacher || student) falls."""
import json
from pathlib import Path

import pytest
import torch

from frontierlm.train.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


def test_kl_per_token_matches_definition():
    from frontierlm.train.distill import kl_per_token

    s, t = torch.randn(3, 7), torch.randn(3, 7)
    p = torch.softmax(t / 2, -1)
    expected = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1)
    torch.testing.assert_close(kl_per_token(s, t, 2.0), expected)
    assert kl_per_token(t, t).abs().max() < 1e-6


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Llama trained 40 steps on python-docs: a teacher with real structure to pass on."""
    from frontierlm.train.trainer import Trainer

    out = tmp_path_factory.mktemp("teacher")
    trainer = Trainer(TrainConfig.load(None, {
        "out_dir": str(out), "steps": 40, "eval_every": 0, "log_every": 0, "progress": False, "device": "cpu",
        "bf16": False,
        "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4, "model.max_position_embeddings": 64,
        "data.max_chars": 60_000, "data.seq_len": 32, "data.batch_size": 8, "data.eval_batches": 1,
        "data.tokenizer": tiny_model_dir("llama"), "optim.lr": 5e-3, "optim.warmup_steps": 2,
    }))
    trainer.train()
    return str(out)


def test_distill_lowers_held_out_kl(tmp_path, teacher_dir, capsys):
    from transformers import AutoTokenizer

    from frontierlm import LLM
    from frontierlm.cli import main

    teacher = teacher_dir
    out = tmp_path / "student"
    student = tmp_path / "student.yaml"
    TrainConfig.load(None, {
        "out_dir": str(out), "steps": 40, "eval_every": 20, "progress": False, "device": "cpu",
        "bf16": False,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
        "model.num_attention_heads": 2, "model.max_position_embeddings": 64,
        "data.max_chars": 60_000, "data.seq_len": 32, "data.batch_size": 8, "data.eval_batches": 2,
        "optim.lr": 1e-2, "optim.min_lr": 1e-3, "optim.warmup_steps": 2,
        "distill.alpha": 0.8, "distill.temperature": 2.0,
    }).save_yaml(student)
    rc = main(["distill", "--teacher", teacher, "--student", str(student), "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kl_after"] < 0.5 * summary["kl_before"], summary
    kls = [r["kl"] for r in json.loads((out / "metrics.json").read_text()) if r["split"] == "eval"]
    assert kls[0] == summary["kl_before"] and kls[-1] == summary["kl_after"] and len(kls) == 3

    # The student shares the teacher's tokenizer and vocabulary, so it can serve as its draft model.
    vocab = [json.loads((Path(d) / "config.json").read_text())["vocab_size"] for d in (out, teacher)]
    assert vocab[0] == vocab[1]
    llm = LLM(str(out))
    text = "def main():"
    assert llm.get_tokenizer().encode(text) == AutoTokenizer.from_pretrained(teacher).encode(text)
