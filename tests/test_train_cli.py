"""`frontierlm train` / `train-tokenizer` from the command line, config validation, corpus assembly."""
import json
import textwrap

import pytest
import torch

from frontierlm.cli import main
from frontierlm.train.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


def test_train_tokenizer_cli_writes_a_tokenizer_transformers_loads(tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    rc = main(["train-tokenizer", "--corpus", "python-docs", "--max-chars", "60000", "--vocab-size", "400",
               "--out", str(out)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 400
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == 400 and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    text = "def f(x):\n    return x  # café"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>hi<|end|><|assistant|>"
    ids = tok.encode(chat, add_special_tokens=False)
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|user|>", "<|assistant|>"]  # one token each


def test_train_cli_with_yaml_writes_model_dir_and_loss_curve(tmp_path, capsys):
    from frontierlm import LLM, SamplingParams

    out = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        out_dir: {out}
        steps: 50          # overridden on the command line
        eval_every: 2
        progress: false
        model:
          architecture: LlamaForCausalLM
          hidden_size: 32
          intermediate_size: 64
          num_hidden_layers: 1
          num_attention_heads: 2
          max_position_embeddings: 64
        data:
          corpus: python-docs
          max_chars: 40000
          seq_len: 32
          batch_size: 4
          eval_batches: 1
          tokenizer_vocab_size: 300   # no tokenizer given: one is trained on the corpus
        optim:
          lr: 3e-3                    # YAML 1.1 reads this as a string; the config converts it
          warmup_steps: 1
        """))
    rc = main(["train", str(cfg), "--steps", "4", "--seed", "1"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["eval_loss"] > 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "metrics.json", "train_config.yaml", "checkpoint/state.pt"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    saved = TrainConfig.load(out / "train_config.yaml")
    assert saved.steps == 4 and saved.seed == 1 and saved.optim.lr == 3e-3
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    evals = [r["step"] for r in json.loads((out / "metrics.json").read_text()) if r["split"] == "eval"]
    assert evals == [0, 2, 4]
    outs = LLM(str(out)).generate(["def"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) >= 1


def test_train_cli_bad_flag_names_the_field(tmp_path, capsys):
    rc = main(["train", "--out-dir", str(tmp_path), "--lr", "-1"])
    assert rc == 2 and "optim.lr" in capsys.readouterr().err
    rc = main(["train", "--out-dir", str(tmp_path), "--num-key-value-heads", "3"])
    assert rc == 2 and "model.num_key_value_heads" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, field", [
    ({"model.architecture": "GPT2LMHeadModel"}, "model.architecture"),
    ({"model.hidden_size": 0}, "model.hidden_size"),
    ({"model.hidden_size": 66}, "model.num_attention_heads"),
    ({"model.num_key_value_heads": 3}, "model.num_key_value_heads"),
    ({"model.tie_word_embeddings": "maybe"}, "model.tie_word_embeddings"),
    ({"data.corpus": "/no/such/corpus"}, "data.corpus"),
    ({"data.val_fraction": 1.0}, "data.val_fraction"),
    ({"data.seq_len": 4096}, "data.seq_len"),
    ({"data.batch_size": 2.5}, "data.batch_size"),
    ({"data.tokenizer_vocab_size": 100}, "data.tokenizer_vocab_size"),
    ({"optim.lr": "fast"}, "optim.lr"),
    ({"optim.min_lr": 1.0}, "optim.min_lr"),
    ({"optim.betas": [0.9, 1.5]}, "optim.betas"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps"),
    ({"distill.alpha": 2}, "distill.alpha"),
    ({"distill.temperature": 0}, "distill.temperature"),
    ({"steps": 0}, "steps"),
    ({"device": "tpu:what"}, "device"),
    ({"model.hidden_sise": 64}, "model.hidden_sise"),
    ({"optimizer": {}}, "optimizer"),
])
def test_bad_config_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TrainConfig.load(None, overrides)


def test_yaml_and_override_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 2e-3\n  betas: [0.8, 0.9]\nmodel:\n  head_dim: 16\n")
    cfg = TrainConfig.load(path, {"optim.lr": "5e-4", "model.head_dim": "none"})
    assert (cfg.steps, cfg.optim.lr, cfg.optim.betas, cfg.model.head_dim) == (7, 5e-4, (0.8, 0.9), None)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_corpus_python_docs_split_and_packing(tmp_path):
    from frontierlm.train.corpus import BlockBatches, load_texts, pack_tokens, python_docs, split_documents

    stdlib = tmp_path / "lib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    (stdlib / "pkg" / "mod.py").write_text('"""Module doc."""\nclass A:\n    """Class doc."""\n'
                                           '    def f(self):\n        """Method doc."""\n')
    (stdlib / "test" / "test_x.py").write_text('"""Test doc."""\n')
    (stdlib / "broken.py").write_text('"""Never read."""\ndef (:\n')
    docs = python_docs(stdlib_dir=str(stdlib))
    assert docs[-1] == "Module doc.\n\nClass doc.\n\nMethod doc."  # tests and unparsable files skipped
    assert len(python_docs(1000)) >= 1 and sum(map(len, python_docs(1000))) == 1000

    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\nthree\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["one", "two", "three"]
    docs = [f"doc {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 4 and sorted(train + val) == sorted(docs) and (train, val) == split_documents(docs, 0.1)

    blocks = pack_tokens([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0]]  # docs joined with EOS: 1 2 3 </s> 4 5 </s>; the tail is dropped
    stream = BlockBatches(torch.arange(10).view(10, 1), batch_size=4, seed=0)
    epoch = torch.cat([stream(0), stream(1), stream(2)[:2]]).flatten().tolist()
    assert sorted(epoch) == list(range(10))  # one epoch is a permutation
    assert torch.equal(stream(1, rank=1, world_size=2), stream(1)[2:])  # ranks slice the global batch
