"""Training MoE and MTP models: DeepSeek-V3 multi-token prediction on the right targets, aux-loss-free and
aux-loss balancing, logged expert shares, and the MTP modules round-tripping through FrontierLM and transformers.
Tiny models, few steps, CPU."""
import math

import pytest
import torch

from frontierlm.train.config import TrainConfig
from test_train import logits_of, tiny_config

# A tiny DeepSeek-V3: layer 0 dense, layer 1 MLA + MoE (8 experts, top-2, one shared expert).
DSV3 = {"model.architecture": "DeepseekV3ForCausalLM", "model.num_experts": 8, "model.num_experts_per_tok": 2,
        "model.moe_intermediate_size": 32, "model.num_shared_experts": 1, "model.first_k_dense_replace": 1,
        "model.kv_lora_rank": 16, "model.q_lora_rank": 24, "model.qk_nope_head_dim": 16,
        "model.qk_rope_head_dim": 8, "model.v_head_dim": 12}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


def tiny_model(**overrides):
    """A freshly initialised engine model of a tiny TrainConfig (no data loaded)."""
    from frontierlm.train.modeling import build_hf_config, build_model

    small = {"model.hidden_size": 64, "model.intermediate_size": 128, "model.num_hidden_layers": 2,
             "model.num_attention_heads": 4, "model.max_position_embeddings": 128}
    values = {k.split(".", 1)[1]: v for k, v in {**small, **DSV3, **overrides}.items()}
    cfg = TrainConfig.from_dict({"model": values, "data": {"seq_len": 16}})
    model = build_model(build_hf_config(cfg.model, 512), seed=0)
    return model, cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """The tiny DeepSeek-V3 + one MTP module, 20 steps of 2 micro-batches with aux-loss-free balancing."""
    from frontierlm.train.trainer import Trainer

    cfg = tiny_config(tmp_path_factory.mktemp("dsv3"), tiny_model_dir("llama"), steps=20, eval_every=10, log_every=1,
                      **DSV3, **{"model.num_nextn_predict_layers": 1, "optim.moe_bias_update_speed": 0.01,
                                 "data.batch_size": 4, "data.grad_accum": 2})
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_mtp_loss_predicts_k_plus_1_tokens_ahead():
    """D = 2: depth k takes h^{k-1}_i and the embedding of t_{i+k} and is scored against t_{i+k+1}."""
    import torch.nn.functional as F

    model, _ = tiny_model(**{"model.num_nextn_predict_layers": 2})
    assert model.num_mtp_layers == 2 and len(model.kv_cache_modules()) == 2
    model.mtp_loss_weight = 0.5
    seq = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))  # t_0 .. t_12
    input_ids, labels = seq[:, :-1], seq[:, 1:]
    n_tok = input_ids.shape[1]
    hidden = model(input_ids, torch.arange(n_tok).expand_as(input_ids))
    got = model.mtp_loss(hidden, input_ids, labels)

    previous, losses = hidden, []
    for k in (1, 2):
        i = torch.arange(n_tok - k)  # positions whose target t_{i+k+1} is in the sequence
        head, previous = model.mtp_forward(seq[:, i + k], i.expand(2, -1), previous[:, i], k - 1,
                                           return_next_hidden=True)
        losses.append(F.cross_entropy(model.mtp_logits(head).flatten(0, 1), seq[:, i + k + 1].flatten()))
    torch.testing.assert_close(got, 0.5 / 2 * (losses[0] + losses[1]))
    assert all(loss > math.log(512) - 0.5 for loss in losses)  # untrained: near uniform
    got.backward()  # every MTP module learns from it
    for k in (2, 3):
        assert model.model.layers[k].eh_proj.weight.grad.abs().sum() > 0


def test_aux_loss_of_the_mtp_modules_moe_joins_the_same_step():
    """The MTP module runs inside auxiliary_losses: its MoE's aux loss must be summed there, not left over."""
    from frontierlm.train.balance import ExpertBalance
    from frontierlm.train.modeling import CausalLM, auxiliary_losses

    model, _ = tiny_model(**{"model.num_nextn_predict_layers": 1})
    main_moe, mtp_moe = ExpertBalance(model, aux_loss_coef=0.01).layers
    seq = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    hidden, _ = CausalLM(model)(seq[:, :-1])
    main_aux = main_moe.aux_loss.detach()
    parts = auxiliary_losses(model, hidden, seq[:, :-1], seq[:, 1:])
    assert parts["aux"] - main_aux > 0.005 and parts["mtp"] > 0
    assert main_moe.aux_loss is None and mtp_moe.aux_loss is None


def test_deepseek_v3_trains_with_aux_free_balancing(trained):
    evals = trained.log.series("eval", "loss")
    assert evals[0] == [0, 10, 20] and evals[1][-1] < evals[1][0] - 0.5, evals
    train = trained.log.last("train")
    assert train["mtp"] > 0 and "aux" not in train  # the loss has the MTP term, no balancing loss
    assert train["loss"] == pytest.approx(train["ce"] + train["mtp"], rel=1e-5)
    # MoE layers: the main model's layer 1 and the MTP module (model.layers.2); every bias moved
    names = ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert trained.balance.names == names
    for moe in trained.balance.layers:
        bias = moe.gate.e_score_correction_bias
        assert bias.abs().max() > 0 and bias.abs().max() <= 0.01 * 20 + 1e-6
    first, last = trained.log.records[0], trained.log.last("eval")
    assert "expert_share" not in first  # nothing routed before the first step
    for name in names:
        shares = last["expert_share"][name]
        assert len(shares) == 8 and sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert last["expert_imbalance"][name] == pytest.approx(max(shares) * 8, rel=1e-3)
    assert last["expert_imbalance_max"] == max(last["expert_imbalance"].values()) >= 1.0


def test_round_trip_with_mtp_module(trained):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from frontierlm import LLM
    from frontierlm.train.modeling import CausalLM

    out, L = trained.out_dir, 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # DeepSeek's layout: the MTP module after the decoder layers, with its own copies of the shared tensors
    for leaf in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.7.down_proj.weight",
                 "mlp.gate.e_score_correction_bias", "self_attn.kv_a_proj_with_mqa.weight"):
        assert f"model.layers.{L}.{leaf}" in names, leaf

    x = trained.val_blocks[:2, :-1]
    with torch.no_grad():
        ref_hidden, ref = CausalLM(trained.model).eval()(x)
    llm = LLM(str(out), kv_cache_memory_gb=0.01)
    engine = llm.llm_engine.runner.model
    assert engine.num_mtp_layers == 1
    torch.testing.assert_close(logits_of(engine, x), ref, atol=1e-5, rtol=0)
    pos = torch.arange(x.shape[1] - 1).expand(2, -1)
    with torch.no_grad():
        args = (x[:, 1:], pos, ref_hidden[:, :-1])
        torch.testing.assert_close(engine.mtp_forward(*args), trained.model.mtp_forward(*args), atol=1e-5, rtol=0)
    # transformers ignores the MTP tensors (it has no MTP module) and computes the same main-model logits
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref, atol=1e-4, rtol=0)


def test_aux_loss_training_logs_the_aux_term(tmp_path, tiny_model_dir):
    from frontierlm.train.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, tiny_model_dir("llama"), steps=3, log_every=1, **{
        "model.architecture": "Qwen3MoeForCausalLM", "model.num_hidden_layers": 1, "model.num_experts": 4,
        "model.num_experts_per_tok": 2, "model.moe_intermediate_size": 32, "data.batch_size": 4,
        "optim.moe_aux_loss_coef": 0.01}))
    assert [m.aux_loss_coef for m in trainer.balance.layers] == [0.01]
    trainer.train()
    for record in (r for r in trainer.log.records if r["split"] == "train"):
        # N * sum f_i P_i >= ~1 (1 when uniform), weighted by 0.01
        assert 0.005 < record["aux"] < 0.05 and record["loss"] == pytest.approx(record["ce"] + record["aux"])
    assert len(trainer.log.last("eval")["expert_share"]["model.layers.0.mlp"]) == 4


def test_bias_update_sums_the_micro_batches_of_a_step():
    from frontierlm.train.balance import ExpertBalance
    from frontierlm.train.distributed import DistContext

    model, _ = tiny_model()
    balance = ExpertBalance(model, bias_update_speed=0.5)
    (moe,) = balance.layers
    moe.last_counts = torch.tensor([9, 0, 0, 0, 1, 1, 1, 4])  # micro-batch 1 alone: expert 7 is above the mean
    balance.collect()
    moe.last_counts = torch.tensor([0, 3, 3, 3, 3, 3, 3, 0])  # summed: [9, 3, 3, 3, 4, 4, 4, 4], mean 4.25
    balance.collect()
    balance.step(DistContext(0, 1, torch.device("cpu")))
    assert moe.gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert balance.report()["expert_share"]["model.layers.1.mlp"][0] == pytest.approx(9 / 34, abs=1e-5)
    assert balance.report() == {}  # the window restarts after each report


def test_moe_and_mla_fields_map_to_each_architecture():
    from frontierlm.train.modeling import build_hf_config

    def hf(**values):
        return build_hf_config(TrainConfig.from_dict({"model": values}).model, 512)

    c = hf(architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
           num_shared_experts=2, first_k_dense_replace=1)
    assert (c.num_experts, c.shared_expert_intermediate_size, c.mlp_only_layers) == (4, 48, [0])
    c = hf(architecture="MixtralForCausalLM", num_experts=4, num_experts_per_tok=1)
    assert (c.num_local_experts, c.num_experts_per_tok) == (4, 1)
    c = hf(architecture="DeepseekV2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, num_experts=4,
           n_group=2, topk_group=1, q_lora_rank=0)
    assert (c.n_routed_experts, c.num_key_value_heads, c.topk_method, c.q_lora_rank) == (
        4, 4, "group_limited_greedy", None)  # MLA: one KV head per head, automatically
    c = hf(architecture="DeepseekV3ForCausalLM", num_experts=8, num_nextn_predict_layers=2)
    assert (c.n_group, c.topk_group, c.num_nextn_predict_layers) == (1, 1, 2)  # no group limit by default
    assert hf(architecture="DeepseekV3ForCausalLM").num_nextn_predict_layers == 0  # not transformers' 1


@pytest.mark.parametrize("values,match", [
    ({"model": {"num_experts": 4}}, "model.num_experts does not apply to LlamaForCausalLM"),
    ({"model": {"architecture": "DeepseekV2ForCausalLM", "num_nextn_predict_layers": 1}},
     "model.num_nextn_predict_layers does not apply"),
    ({"model": {"architecture": "MixtralForCausalLM", "moe_intermediate_size": 8}}, "model.moe_intermediate_size"),
    ({"model": {"architecture": "DeepseekV3ForCausalLM", "num_experts": 6, "n_group": 4, "topk_group": 2}},
     "model.n_group"),
    ({"model": {"architecture": "Qwen3MoeForCausalLM", "num_experts": 2, "num_experts_per_tok": 3}},
     "model.num_experts_per_tok"),
    ({"optim": {"moe_aux_loss_coef": 0.01}}, "optim.moe_aux_loss_coef needs an MoE architecture"),
    ({"model": {"architecture": "MixtralForCausalLM"}, "optim": {"moe_bias_update_speed": 0.001}},
     "optim.moe_bias_update_speed"),
    ({"model": {"architecture": "DeepseekV3ForCausalLM", "num_nextn_predict_layers": 8}, "data": {"seq_len": 8}},
     "data.seq_len"),
])
def test_moe_config_errors_name_the_field(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_example_yaml_builds():
    from pathlib import Path

    import frontierlm.train
    from frontierlm.train.modeling import build_hf_config

    path = Path(frontierlm.train.__file__).parent / "examples" / "deepseek_v3.yaml"
    cfg = TrainConfig.load(path)
    hf = build_hf_config(cfg.model, 4096)
    assert (hf.n_routed_experts, hf.kv_lora_rank, hf.num_nextn_predict_layers) == (8, 64, 1)
    assert cfg.optim.moe_bias_update_speed == 0.001
