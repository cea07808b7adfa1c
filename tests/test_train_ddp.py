"""Data parallel: two gloo processes under torchrun compute the gradients one process computes on the
combined batch. Run as a script, this file is the torchrun worker."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from frontierlm.train.config import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out_dir, tokenizer_dir) -> TrainConfig:
    return TrainConfig.load(None, {
        "out_dir": str(out_dir), "steps": 2, "eval_every": 1, "progress": False, "device": "cpu",
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4, "model.num_key_value_heads": 2, "model.max_position_embeddings": 64,
        "data.max_chars": 40_000, "data.seq_len": 32, "data.batch_size": 4, "data.eval_batches": 2,
        "data.tokenizer": str(tokenizer_dir),
    })


def _gradients(trainer) -> dict:
    trainer.forward_backward(0)
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}


def test_ddp_two_processes_match_one_process_on_combined_batch(tmp_path, tiny_model_dir):
    from frontierlm.train.trainer import Trainer

    cfg = _config(tmp_path / "ddp", tiny_model_dir("llama"))
    cfg_path = tmp_path / "ddp.yaml"
    cfg.save_yaml(cfg_path)
    grads_path = tmp_path / "ddp_grads.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", FRONTIERLM_LOG_LEVEL="WARNING")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, str(cfg_path), str(grads_path)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(grads_path)
    assert ddp.pop("world_size") == 2

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(_config(tmp_path / "single", tiny_model_dir("llama")))
        single_eval = trainer.evaluate()
        single = _gradients(trainer)
    finally:
        torch.set_num_threads(old)
    assert ddp.keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    # The workers then ran the whole loop (2 steps, sharded evaluation): rank 0 wrote the model directory, and
    # the validation loss of the untrained model matches one process evaluating every row.
    out = tmp_path / "ddp"
    assert (out / "model.safetensors").is_file() and (out / "checkpoint" / "state.pt").is_file()
    evals = [r for r in json.loads((out / "metrics.json").read_text()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert evals[0]["loss"] == pytest.approx(single_eval["loss"], rel=1e-5)


if __name__ == "__main__":  # torchrun worker: gradients of step 0, written by rank 0
    from frontierlm.train.trainer import Trainer

    trainer = Trainer(TrainConfig.load(sys.argv[1]))
    grads = _gradients(trainer)  # DDP has averaged them over the two ranks' halves of the batch
    if trainer.dist.is_main:
        torch.save({**grads, "world_size": trainer.dist.world_size}, sys.argv[2])
    trainer.train()
    trainer.close()
