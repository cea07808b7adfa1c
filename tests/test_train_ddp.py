"""Data parallel: two gloo processes under torchrun compute the gradients one process computes on the
combined batch (DDP), and train, resume and save the weights one process trains (FSDP). Run as a script, this
file is the torchrun worker."""
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


def _config(out_dir, tokenizer_dir, **overrides) -> TrainConfig:
    return TrainConfig.load(None, {
        "out_dir": str(out_dir), "steps": 2, "eval_every": 1, "progress": False, "device": "cpu",
        "bf16": False,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4, "model.num_key_value_heads": 2, "model.max_position_embeddings": 64,
        "data.max_chars": 40_000, "data.seq_len": 32, "data.batch_size": 4, "data.eval_batches": 2,
        "data.tokenizer": str(tokenizer_dir), **overrides,
    })


def _torchrun(*args) -> None:
    """Run this file as the worker in two gloo processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", FRONTIERLM_LOG_LEVEL="WARNING")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, *map(str, args)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _gradients(trainer) -> dict:
    trainer.forward_backward(0)
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}


def test_ddp_two_processes_match_one_process_on_combined_batch(tmp_path, tiny_model_dir):
    from frontierlm.train.trainer import Trainer

    cfg = _config(tmp_path / "ddp", tiny_model_dir("llama"))
    cfg_path = tmp_path / "ddp.yaml"
    cfg.save_yaml(cfg_path)
    grads_path = tmp_path / "ddp_grads.pt"
    _torchrun(cfg_path, grads_path)
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


# FSDP: 3 steps of 2 micro-batches with the grad norm clipped, stopped after step 2 and resumed from the
# checkpoint. DeepSeek-V3 adds MoE layers with aux-loss-free bias updates (biases kept whole on every rank) and an
# MTP module (in the root unit).
FSDP_CASES = {
    "llama": {},
    "deepseek_v3": {"model.architecture": "DeepseekV3ForCausalLM", "model.num_experts": 4,
                    "model.num_experts_per_tok": 2, "model.moe_intermediate_size": 16, "model.num_shared_experts": 1,
                    "model.first_k_dense_replace": 1, "model.kv_lora_rank": 16, "model.q_lora_rank": 0,
                    "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 8, "model.v_head_dim": 8,
                    "model.num_nextn_predict_layers": 1, "optim.moe_bias_update_speed": 0.01},
}


def _fsdp_config(out_dir, tokenizer_dir, case: str) -> TrainConfig:
    return _config(out_dir, tokenizer_dir, steps=3, parallel="fsdp",
                   **{"data.grad_accum": 2, "optim.grad_clip": 0.05, "optim.warmup_steps": 1, **FSDP_CASES[case]})


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model_dir):
    """One torchrun of two gloo processes training every FSDP case; {case: out_dir}."""
    root = tmp_path_factory.mktemp("fsdp")
    paths, outs = [], {}
    for case in FSDP_CASES:
        outs[case] = root / case
        paths.append(root / f"{case}.yaml")
        _fsdp_config(outs[case], tiny_model_dir("llama"), case).save_yaml(paths[-1])
    _torchrun("--fsdp", *paths)
    return outs


def _tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("case", list(FSDP_CASES))
def test_fsdp_two_processes_train_what_one_process_trains(case, fsdp_runs, tmp_path, tiny_model_dir):
    from frontierlm.train.trainer import Trainer

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(_fsdp_config(tmp_path / "single", tiny_model_dir("llama"), case))
        single.train()
    finally:
        torch.set_num_threads(old)
    out = fsdp_runs[case]

    # The exported HF directory: rank 0 gathered the full weights, saved under the single process's names.
    want, got = _tensors(tmp_path / "single"), _tensors(out)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4, msg=name)

    # The training state: full model and optimizer state dicts, laid out as one process saves them.
    want = torch.load(tmp_path / "single" / "checkpoint" / "state.pt", weights_only=False)
    got = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert got["step"] == want["step"] == 3 and got["scheduler"] == want["scheduler"]
    torch.testing.assert_close(got["model"], want["model"], atol=1e-5, rtol=1e-4)
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    torch.testing.assert_close(got["optimizer"]["state"], want["optimizer"]["state"], atol=1e-5, rtol=1e-4)
    evals = [r for r in json.loads((out / "metrics.json").read_text()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert evals[-1]["loss"] == pytest.approx(single.log.last("eval")["loss"], rel=1e-4)

    if case == "llama":  # the engine serves the FSDP-trained directory like any other
        from test_train import engine_and_loop_greedy

        got_ids, expected = engine_and_loop_greedy(out, single.model, single.val_blocks[0, :8].tolist(), 4)
        assert got_ids == expected


def _fsdp_worker(paths: list[str]) -> None:
    """Each config: train to step 2 (which saves), then a second trainer resumes there and finishes."""
    from torch.distributed.tensor import DTensor

    from frontierlm.train.trainer import Trainer

    trainers = []
    for path in paths:  # later trainers join the process group the first one made
        first = Trainer(TrainConfig.load(path))
        first.train(until_step=2)
        resumed = Trainer(TrainConfig.load(path, {"resume": True}))
        assert resumed.step == 2 and isinstance(resumed.model.lm_head.weight, DTensor)  # sharded
        resumed.train()
        trainers += [first, resumed]
    for trainer in trainers:
        trainer.close()


if __name__ == "__main__":
    if sys.argv[1] == "--fsdp":
        _fsdp_worker(sys.argv[2:])
        sys.exit()
    # torchrun worker: gradients of step 0, written by rank 0
    from frontierlm.train.trainer import Trainer

    trainer = Trainer(TrainConfig.load(sys.argv[1]))
    grads = _gradients(trainer)  # DDP has averaged them over the two ranks' halves of the batch
    if trainer.dist.is_main:
        torch.save({**grads, "world_size": trainer.dist.world_size}, sys.argv[2])
    trainer.train()
    trainer.close()
