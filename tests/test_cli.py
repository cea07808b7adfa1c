import json
import os
import subprocess
import sys

from frontierlm import LLM, SamplingParams
from frontierlm.cli import main


def test_generate_json_matches_api(tiny_model_dir, capsys):
    d = tiny_model_dir("llama")
    rc = main(["generate", d, "--prompt", "The def", "--prompt", "import os", "--max-tokens", "6",
               "--temperature", "0", "--ignore-eos", "--json"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    ref = LLM(d).generate(["The def", "import os"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    assert [x["outputs"][0]["token_ids"] for x in lines] == [o.outputs[0].token_ids for o in ref]
    assert lines[0]["prompt"] == "The def" and lines[0]["outputs"][0]["finish_reason"] == "length"


def test_generate_bad_flag_value_is_a_clear_error(tiny_model_dir, capsys):
    rc = main(["generate", tiny_model_dir("llama"), "--prompt", "x", "--top-p", "1.5"])
    assert rc == 2 and "top_p" in capsys.readouterr().err


def test_chat_repl_streams_replies(tiny_model_dir):
    d = tiny_model_dir("llama")
    env = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-m", "frontierlm.cli", "chat", d, "--max-tokens", "5", "--temperature",
                           "0", "--ignore-eos"], input="hello\n/reset\nwhat is a class?\n/exit\n",
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    replies = [line[2:] for line in proc.stdout.splitlines() if line.startswith("> ")]
    assert len(replies) == 3  # two replies printed after prompts, then the prompt before /exit
    llm = LLM(d)
    msgs = [{"role": "user", "content": "hello"}]
    ref = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert replies[0] == ref[0].outputs[0].text
