"""Trainer: the loss falls, the saved directory round-trips through FrontierLM and transformers, resuming is
exact, the LR schedule and gradient accumulation are what they claim. Tiny models, few steps, CPU."""
import math

import pytest
import torch

from frontierlm import LLM, SamplingParams
from frontierlm.train.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


def tiny_config(out_dir, tokenizer_dir, **overrides) -> TrainConfig:
    """A tiny Llama on capped python-docs text; overrides are {"section.field" or "field": value}."""
    values = {
        "out_dir": str(out_dir), "steps": 30, "eval_every": 0, "save_every": 0, "log_every": 5, "seed": 0,
        "progress": False, "device": "cpu", "bf16": False,  # exactness tests compare float32 runs
        "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4, "model.num_key_value_heads": 2, "model.max_position_embeddings": 128,
        "data.corpus": "python-docs", "data.max_chars": 120_000, "data.seq_len": 64, "data.batch_size": 8,
        "data.eval_batches": 2, "data.tokenizer": str(tokenizer_dir),
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 5,
    }
    values.update(overrides)
    return TrainConfig.load(None, values)


def make_trainer(out_dir, tokenizer_dir, **overrides):
    from frontierlm.train.trainer import Trainer

    return Trainer(tiny_config(out_dir, tokenizer_dir, **overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny tied-embedding Llama trained 30 steps (eval every 10), saved."""
    trainer = make_trainer(tmp_path_factory.mktemp("trained"), tiny_model_dir("llama"), eval_every=10)
    trainer.train()
    return trainer


def logits_of(model, input_ids):
    from frontierlm.train.modeling import CausalLM

    with torch.no_grad():
        return CausalLM(model).eval()(input_ids)[1]


def engine_and_loop_greedy(model_dir, model, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens from the engine (paged KV cache) and from a full-recompute loop of the training model."""
    llm = LLM(str(model_dir), seed=0)
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits_of(model, torch.tensor([ids]))[0, -1].argmax()))
    return got, ids[len(prompt):]


def test_loss_falls_over_30_steps(trained):
    evals = trained.log.series("eval", "loss")
    assert evals[0] == [0, 10, 20, 30]
    first, last = evals[1][0], evals[1][-1]
    assert first > math.log(512) - 0.5  # the untrained model is near uniform over the vocabulary
    assert last < first - 0.8, evals
    train_losses = trained.log.series("train", "loss")[1]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert (trained.out_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained.out_dir / "metrics.json").is_file()
    assert trained.log.last("eval")["ppl"] == pytest.approx(math.exp(last))


def _check_loads_with_same_logits(trainer):
    from transformers import AutoModelForCausalLM

    from frontierlm.config import ModelConfig
    from frontierlm.models.loader import load_model

    x = trainer.val_blocks[:2, :-1]
    ref = logits_of(trainer.model, x)
    ours = load_model(ModelConfig.from_pretrained(trainer.out_dir))
    torch.testing.assert_close(logits_of(ours, x), ref, atol=1e-4, rtol=0)
    hf = AutoModelForCausalLM.from_pretrained(str(trainer.out_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), ref, atol=1e-4, rtol=0)


def test_round_trip_llama_tied(trained):
    from safetensors import safe_open

    with safe_open(str(trained.out_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight"} <= names
    assert "lm_head.weight" not in names and not any("qkv" in n or "gate_up" in n for n in names)
    _check_loads_with_same_logits(trained)

    # Greedy generation in the engine (paged KV cache) equals a full-recompute greedy loop of the trainee.
    got, expected = engine_and_loop_greedy(trained.out_dir, trained.model, trained.val_blocks[0, :12].tolist(), 12)
    assert got == expected
    assert LLM(str(trained.out_dir)).get_tokenizer().chat_template  # tokenizer files travelled with the weights


def test_round_trip_qwen2_untied_with_qkv_bias(tmp_path, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir("llama"), steps=3, log_every=0,
                           **{"model.architecture": "Qwen2ForCausalLM", "model.tie_word_embeddings": False})
    trainer.train()
    bias = trainer.model.model.layers[0].self_attn.qkv_proj.bias
    assert bias.abs().max() > 0  # trained away from its zero init, so the split is really checked
    _check_loads_with_same_logits(trainer)


def test_round_trip_mixtral_moe_experts(tmp_path, tiny_model_dir):
    """Fused expert stacks are split back into per-expert tensors under the model's own checkpoint names."""
    from frontierlm.models.registry import supported_architectures

    if "MixtralForCausalLM" not in supported_architectures():
        pytest.skip("no MoE models in the registry")
    trainer = make_trainer(tmp_path, tiny_model_dir("llama"), steps=2, log_every=0, **{
        "model.architecture": "MixtralForCausalLM", "model.num_hidden_layers": 1, "data.batch_size": 4,
        "model.extra": {"num_local_experts": 4, "num_experts_per_tok": 2}})
    trainer.train()
    _check_loads_with_same_logits(trainer)


def test_resume_equals_straight_run(tmp_path, tiny_model_dir):
    tok = tiny_model_dir("llama")
    straight = make_trainer(tmp_path / "straight", tok, steps=10, save_every=5)
    straight.train()
    first = make_trainer(tmp_path / "resumed", tok, steps=10, save_every=5)
    first.train(until_step=5)
    assert first.step == 5
    second = make_trainer(tmp_path / "resumed", tok, steps=10, save_every=5, resume=True)
    assert second.step == 5
    second.train()
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.log.series("eval", "loss") == straight.log.series("eval", "loss")


def test_lr_schedule_is_warmup_then_cosine(tmp_path, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir("llama"), steps=12, **{
        "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 4, "data.batch_size": 2})
    seen = []
    for _ in range(12):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer_step()  # no gradients: only the schedule moves
    # warmup: 1e-3 * (s + 1) / 4; then min + (max - min) / 2 * (1 + cos(pi * (s - 4) / 7)) for s = 4 .. 11
    expected = {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3, 11: 1e-4,
                5: 1e-4 + 0.45e-3 * (1 + math.cos(math.pi / 7)),
                8: 1e-4 + 0.45e-3 * (1 + math.cos(math.pi * 4 / 7))}
    for step, lr in expected.items():
        assert seen[step] == pytest.approx(lr, rel=1e-9), step


def test_grad_accumulation_equals_full_batch(tmp_path, tiny_model_dir):
    tok = tiny_model_dir("llama")
    full = make_trainer(tmp_path / "full", tok, **{"data.batch_size": 4, "data.grad_accum": 1})
    accum = make_trainer(tmp_path / "accum", tok, **{"data.batch_size": 2, "data.grad_accum": 2})
    loss_full = full.forward_backward(0)["loss"]
    loss_accum = accum.forward_backward(0)["loss"]
    torch.testing.assert_close(loss_accum, loss_full, atol=1e-6, rtol=1e-6)
    for (name, a), b in zip(full.model.named_parameters(), accum.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_auxiliary_loss_hook_adds_module_losses(tmp_path, tiny_model_dir):
    trainer = make_trainer(tmp_path, tiny_model_dir("llama"), steps=2)
    mlp = trainer.model.model.layers[0].mlp
    original = type(mlp).forward

    def forward_with_aux(self, x):  # what an MoE layer does: record a weighted aux loss during forward
        out = original(self, x)
        self.aux_loss = 0.5 * out.pow(2).mean()
        return out

    batch = trainer.batches(0)
    plain, _ = trainer.compute_loss(batch[:, :-1], batch[:, 1:])
    mlp.forward = forward_with_aux.__get__(mlp)
    loss, parts = trainer.compute_loss(batch[:, :-1], batch[:, 1:])
    assert parts["aux"] > 0 and mlp.aux_loss is None  # summed, then cleared
    torch.testing.assert_close(loss, plain + parts["aux"])


def test_export_splits_fused_moe_experts():
    from frontierlm.train.checkpoint import split_fused_experts

    e, h, i = 3, 4, 5
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    out = split_fused_experts("model.layers.0.mlp.experts.w13", w13)
    assert sorted(out) == sorted(f"model.layers.0.mlp.experts.{k}.{p}_proj.weight"
                                 for k in range(e) for p in ("gate", "up"))
    assert torch.equal(out["model.layers.0.mlp.experts.2.up_proj.weight"], w13[2, i:])
    down = split_fused_experts("model.layers.0.mlp.experts.w2", w2)
    assert torch.equal(down["model.layers.0.mlp.experts.1.down_proj.weight"], w2[1])
    assert split_fused_experts("model.layers.0.mlp.down_proj.weight", w2[0]) is None
