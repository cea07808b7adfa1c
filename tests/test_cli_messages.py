"""Every CLI mistake a user is likely to make is one line on stderr, no traceback, exit status 2; and the CLI
conveniences (--version, defaults in --help, --logprobs, --json fields, structured-output flags, numbered --n
samples, chat's /help)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from frontierlm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args, env=None, input=None):
    full = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING", **(env or {}))
    return subprocess.run([sys.executable, "-m", "frontierlm.cli", *args], capture_output=True, text=True,
                          timeout=120, env=full, input=input)


def _one_line_error(capsys, argv, match):
    capsys.readouterr()  # drop what fixtures printed
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.fixture
def broken_models(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    dirs = {}
    for name in ("no_config", "no_weights", "truncated"):
        dirs[name] = shutil.copytree(src, tmp_path / name)
    (dirs["no_config"] / "config.json").unlink()
    (dirs["no_weights"] / "model.safetensors").unlink()
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (tmp_path / "a_file").write_text("x")
    dirs["file"] = tmp_path / "a_file"
    return {k: str(v) for k, v in dirs.items()}


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_model_path_mistakes(capsys, broken_models, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    extra = ["--prompt", "x"] if command == "generate" else []
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        ("Qwen/Qwen3-0.6B", "never downloads models"),
        (broken_models["file"], "is a file"),
        (broken_models["no_config"], "no config.json"),
        (broken_models["no_weights"], "no *.safetensors weights"),
        (broken_models["truncated"], "model.safetensors is truncated"),
    ]
    for model, match in cases:
        err = _one_line_error(capsys, [command, model, *extra], match)
        if "Qwen" in model:
            assert "hf download Qwen/Qwen3-0.6B --local-dir" in err


def test_device_and_backend_mistakes(capsys, tiny_model_dir, monkeypatch):
    d = tiny_model_dir("llama")
    if not __import__("torch").cuda.is_available():
        _one_line_error(capsys, ["generate", d, "--prompt", "x", "--device", "cuda"], "CUDA is not available")
        monkeypatch.setenv("FRONTIERLM_ATTENTION_BACKEND", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        err = _one_line_error(capsys, ["generate", d, "--prompt", "x"], "needs a CUDA GPU")
        assert "reference PyTorch backend" in err
    monkeypatch.setenv("FRONTIERLM_ATTENTION_BACKEND", "flash")
    _one_line_error(capsys, ["generate", d, "--prompt", "x"], "must be 'torch' or 'triton'")
    _one_line_error(capsys, ["chat"], "must be 'torch' or 'triton'")  # the demo model is MLA
    monkeypatch.setenv("FRONTIERLM_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _one_line_error(capsys, ["serve", tiny_model_dir("deepseek_v3")], "no MLA kernels")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--device", "tpu"], "not a valid torch device")


def test_flag_mistakes(capsys, tiny_model_dir):
    d = tiny_model_dir("llama")
    _one_line_error(capsys, ["serve", d, "--port", "99999"], "--port must be between 0 and 65535")
    _one_line_error(capsys, ["serve", d, "--uvicorn-log-level", "x"], "--uvicorn-log-level must be one of")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--max-tokens", "many"], "invalid int value")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--top-p", "1.5"], "top_p")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--num-threads", "0"], "positive integer")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--regex", "a", "--choice", "b"], "only one of")
    _one_line_error(capsys, ["generate", d, "--prompt", "x", "--json-schema", "{nope"], "--json-schema")


def test_real_process_exit_status_and_stderr(tmp_path, capsys):
    proc = _cli("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("frontierlm 0.")


def test_help_shows_defaults(capsys):
    for argv in (["generate"], ["chat"], ["serve"], ["train"], ["bench", "serve"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert "default:" in out, argv
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 256)", "(default: 2048)", "(default: 1.0)", "(default: 16)", "--num-threads"):
        assert shown in out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--port PORT (default: 8000)" in out and "(default: info)" in out


def test_generate_logprobs_json_structured_and_n(capsys, tiny_model_dir):
    d = tiny_model_dir("llama")
    rc = main(["generate", d, "--prompt", "The def", "--max-tokens", "4", "--temperature", "0", "--ignore-eos",
               "--logprobs", "2", "--json"])
    assert rc == 0
    c = json.loads(capsys.readouterr().out)["outputs"][0]
    assert len(c["logprobs"]) == 4 and all(len(e["top"]) == 2 and e["rank"] == 1 for e in c["logprobs"])
    assert c["cumulative_logprob"] == pytest.approx(sum(e["logprob"] for e in c["logprobs"]), abs=1e-4)
    assert c["finish_reason"] == "length" and "stop_reason" in c
    assert [e["token_id"] for e in c["logprobs"]] == c["token_ids"]

    rc = main(["generate", d, "--prompt", "The def", "--max-tokens", "3", "--temperature", "0", "--ignore-eos",
               "--logprobs", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(" rank 1") == 3 and "cumulative_logprob" in out

    rc = main(["generate", d, "--prompt", "x", "--max-tokens", "8", "--choice", "yes", "--choice", "no", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["outputs"][0]["text"] in ("yes", "no")
    rc = main(["generate", d, "--prompt", "x", "--max-tokens", "4", "--regex", "[0-9]{3}", "--json"])
    text = json.loads(capsys.readouterr().out)["outputs"][0]["text"]
    assert rc == 0 and len(text) == 3 and text.isdigit()
    rc = main(["generate", d, "--prompt", "x", "--max-tokens", "40", "--json-schema",
               '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}', "--json"])
    out = json.loads(capsys.readouterr().out)["outputs"][0]
    if out["finish_reason"] == "stop":
        assert isinstance(json.loads(out["text"])["a"], int)
    rc = main(["generate", d, "--prompt", "x", "--max-tokens", "20", "--grammar", 'root ::= "ab" | "cd"', "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["outputs"][0]["text"] in ("ab", "cd")

    rc = main(["generate", d, "--prompt", "x", "--max-tokens", "2", "--n", "3", "--sampling-seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and [f"--- sample {i} of 3 ---" in out for i in (1, 2, 3)] == [True] * 3


def test_chat_help_lists_commands(tiny_model_dir):
    proc = _cli("chat", tiny_model_dir("llama"), "--max-tokens", "2", input="/help\n/bogus\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    for command in ("/help", "/reset", "/exit"):
        assert command in proc.stdout
    assert "unknown command /bogus" in proc.stderr
