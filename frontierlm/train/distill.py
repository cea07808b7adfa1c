"""Knowledge distillation: a student (any TrainConfig model) learns from a frozen teacher model directory.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones (Hinton et al., 2015).
The student shares the teacher's tokenizer and vocabulary, and its output directory holds a copy of that
tokenizer, so it can serve as the teacher's draft model for speculative decoding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from frontierlm.config import ModelConfig
from frontierlm.logger import init_logger
from frontierlm.models.loader import load_model
from frontierlm.train.config import TrainConfig
from frontierlm.train.modeling import CausalLM
from frontierlm.train.trainer import Trainer

logger = init_logger(__name__)


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher_T || student_T) for every position: [..., V] logits -> [...] nats."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


class DistillTrainer(Trainer):
    def __init__(self, cfg: TrainConfig, teacher_dir: str | Path):
        teacher_dir = str(teacher_dir)
        self.teacher_config = ModelConfig.from_pretrained(teacher_dir, dtype=torch.float32)
        if cfg.data.tokenizer not in (None, teacher_dir):
            logger.warning("distill: data.tokenizer %s replaced by the teacher's (%s)", cfg.data.tokenizer,
                           teacher_dir)
        if cfg.data.seq_len > self.teacher_config.max_model_len:
            raise ValueError(f"data.seq_len ({cfg.data.seq_len}) exceeds the teacher's context "
                             f"({self.teacher_config.max_model_len})")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=teacher_dir))
        super().__init__(cfg)
        self.teacher = load_model(self.teacher_config, self.device).requires_grad_(False).eval()
        self.teacher_lm = CausalLM(self.teacher)

    def vocab_size(self) -> int:
        return self.teacher_config.vocab_size  # the logits must line up with the teacher's

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.teacher_lm(input_ids)[1]

    def task_loss(self, input_ids, labels, hidden, logits):
        d = self.cfg.distill
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        kl = kl_per_token(logits, self.teacher_logits(input_ids), d.temperature).mean()
        loss = d.alpha * d.temperature ** 2 * kl + (1.0 - d.alpha) * ce
        return loss, {"ce": ce, "kl_t": kl}

    def eval_keys(self) -> list[str]:
        return ["loss", "kl"]

    def eval_sums(self, input_ids, labels, hidden, logits):
        sums = super().eval_sums(input_ids, labels, hidden, logits)
        sums["kl"] = kl_per_token(logits, self.teacher_logits(input_ids)).sum()  # at T = 1
        return sums


def distill(cfg: TrainConfig, teacher_dir: str | Path) -> dict:
    """Run distillation; the summary adds the held-out KL(teacher || student) before and after."""
    trainer = DistillTrainer(cfg, teacher_dir)
    try:
        summary = trainer.train()
        kls = trainer.log.series("eval", "kl")[1]
        summary.update(kl_before=kls[0] if kls else None, kl_after=kls[-1] if kls else None)
        if trainer.dist.is_main and kls:
            logger.info("held-out KL(teacher || student): %.4f before, %.4f after", kls[0], kls[-1])
        return summary
    finally:
        trainer.close()
