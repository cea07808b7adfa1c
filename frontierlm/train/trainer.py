"""Trainer: pretraining of the engine's own model classes on packed text blocks.

One optimizer step:
    for each micro-batch (data.grad_accum of them):   loss = task_loss + auxiliary losses; (loss / accum).backward()
    clip the global grad norm; AdamW step; warmup + cosine LR step; MoE correction-bias step (balance.py)
then, every N steps, evaluate (validation loss + perplexity, loss curve) and save (HF dir + training state).

Subclasses change the objective by overriding `task_loss` / `eval_sums` (see distill.py). Under torchrun each
rank takes its slice of every global micro-batch; the model runs in DistributedDataParallel or, with
`parallel: fsdp`, sharded by FSDP2 (distributed.py): same loop, same checkpoints.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from frontierlm.logger import init_logger
from frontierlm.train import checkpoint
from frontierlm.train.balance import ExpertBalance
from frontierlm.train.config import TrainConfig
from frontierlm.train.corpus import BlockBatches, load_corpus, pack_tokens, split_documents, tokenize
from frontierlm.train.distributed import DistContext
from frontierlm.train.metrics import MetricsLog
from frontierlm.train.modeling import CausalLM, auxiliary_losses, build_hf_config, build_model
from frontierlm.train.optim import build_optimizer, build_scheduler
from frontierlm.train.precision import autocast_context, training_precision
from frontierlm.train.tokenizer import load_tokenizer, pretokenizer_for, stop_token_ids, train_tokenizer

logger = init_logger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
CONFIG_FILE = "train_config.yaml"


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.dist = DistContext.from_env(cfg.device, cfg.parallel)
        self.device = self.dist.device
        self.dist.check_batch(cfg.data.batch_size)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.out_dir / CONFIG_FILE)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        docs, groups = load_corpus(cfg.data.corpus, cfg.data.max_chars)
        train_docs, val_docs = split_documents(docs, cfg.data.val_fraction, groups=groups)
        self.tokenizer = self._tokenizer(train_docs)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token (needed to separate packed documents)")
        eos, seq_len = self.tokenizer.eos_token_id, cfg.data.seq_len
        self.train_blocks = pack_tokens(tokenize(self.tokenizer, train_docs), seq_len, eos)
        self.val_blocks = pack_tokens(tokenize(self.tokenizer, val_docs), seq_len, eos)
        if self.val_blocks.shape[0] == 0:
            raise ValueError(f"the validation split is shorter than one sequence of data.seq_len={seq_len} "
                             "tokens: raise data.val_fraction or data.max_chars, or lower data.seq_len")
        self.batches = BlockBatches(self.train_blocks, cfg.data.batch_size, cfg.seed)

        self.hf_config = build_hf_config(cfg.model, self.vocab_size(), self.tokenizer.bos_token_id, eos,
                                         self.tokenizer.pad_token_id)
        self.model = build_model(self.hf_config, self.device, cfg.seed)
        if getattr(self.model, "num_mtp_layers", 0):
            self.model.mtp_loss_weight = cfg.optim.mtp_loss_weight
        self.balance = ExpertBalance(self.model, cfg.optim.moe_aux_loss_coef, cfg.optim.moe_bias_update_speed)
        self.lm = CausalLM(self.model)
        self.step = 0
        self.log = MetricsLog()
        state = self._read_state() if cfg.resume else None
        if state is not None:  # the full weights, before wrapping: DDP broadcasts them, FSDP shards them
            checkpoint.load_train_state(self.out_dir, self.model, None, None, state=state)
        elif not cfg.resume and checkpoint.has_train_state(self.out_dir) and self.dist.is_main:
            logger.warning("%s holds a training checkpoint; starting from step 0 will overwrite it "
                           "(pass --resume to continue it)", self.out_dir)
        self.train_lm = self.dist.wrap(self.lm, self._shard_units(), self._replicated_params())
        # After wrapping: FSDP has replaced the parameters with their shards.
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        if state is not None:
            self._resume(state)
        self._saved_step = self.step
        self._loss_sum, self._loss_steps = torch.zeros((), device=self.device), 0
        self.precision = training_precision(self.device, cfg.bf16)
        if self.dist.is_main:
            n = sum(p.numel() for p in self.model.parameters())
            logger.info("%s: %.2fM parameters, %d train / %d validation blocks of %d tokens, %d process(es), %s",
                        cfg.model.architecture, n / 1e6, self.train_blocks.shape[0], self.val_blocks.shape[0],
                        seq_len, self.dist.world_size, self.precision)

    # ----- setup helpers -----

    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _tokenizer(self, train_docs: list[str]):
        if self.cfg.data.tokenizer is not None:
            return load_tokenizer(self.cfg.data.tokenizer)
        path = self.out_dir / TOKENIZER_SUBDIR
        reuse = self.cfg.resume and (path / "tokenizer.json").is_file()  # the checkpoint's vocabulary
        if self.dist.is_main and not reuse:
            train_tokenizer(train_docs, self.cfg.data.tokenizer_vocab_size, path,
                            pretokenizer_for(self.cfg.data.corpus, self.cfg.data.tokenizer_pretokenizer))
        self.dist.barrier()  # other ranks load what rank 0 trained
        return load_tokenizer(path)

    def _shard_units(self) -> list:
        """FSDP's per-unit modules: the decoder layers. MTP modules stay in the root unit because mtp_loss
        uses their parts outside their forward (the root's weights stay gathered from forward to backward)."""
        num_layers = self.model.config.num_layers
        return list(self.model.model.layers[:num_layers])

    def _replicated_params(self) -> list:
        """Parameters FSDP leaves whole on every rank: MoE correction biases, which balance.py updates in place
        outside autograd (the same update on every rank, from counts summed over ranks)."""
        biases = (getattr(m.gate, "e_score_correction_bias", None) for m in self.balance.layers)
        return [b for b in biases if b is not None]

    def _read_state(self) -> dict | None:
        if not checkpoint.has_train_state(self.out_dir):
            logger.warning("resume: no training state in %s; starting from step 0",
                           self.out_dir / checkpoint.STATE_DIR)
            return None
        return checkpoint.read_train_state(self.out_dir, self.device)

    def _resume(self, state: dict) -> None:
        """Optimizer (each rank's shards of it under FSDP), scheduler and RNG; the weights are already in."""
        state["optimizer"] = self.dist.shard_optimizer_state(self.optimizer, state["optimizer"])
        checkpoint.load_train_state(self.out_dir, None, self.optimizer, self.scheduler, state=state)
        self.step = state["step"]
        self.log = MetricsLog(state.get("metrics"))
        logger.info("resumed from step %d of %d", self.step, self.cfg.steps)

    def _autocast(self):
        return autocast_context(self.device, self.cfg.bf16)

    # ----- objective (override in subclasses) -----

    def task_loss(self, input_ids, labels, hidden, logits) -> tuple[torch.Tensor, dict]:
        """The objective before auxiliary terms: next-token cross-entropy."""
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return ce, {"ce": ce}

    def eval_keys(self) -> list[str]:
        return ["loss"]

    def eval_sums(self, input_ids, labels, hidden, logits) -> dict[str, torch.Tensor]:
        """Per-token quantities summed over a validation batch (divided by the token count later)."""
        return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")}

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hidden, logits = self.train_lm(input_ids)
        loss, parts = self.task_loss(input_ids, labels, hidden, logits)
        for name, value in auxiliary_losses(self.model, hidden, input_ids, labels).items():
            loss = loss + value  # MoE load balancing, MTP: see auxiliary_losses
            parts[name] = value
        return loss, {**parts, "loss": loss}

    # ----- one step -----

    def forward_backward(self, step: int) -> dict[str, torch.Tensor]:
        """Gradients of optimizer step `step` (all micro-batches accumulated); returns the mean loss parts."""
        self.lm.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum, world = self.cfg.data.grad_accum, self.dist.world_size
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self.batches(step * accum + micro, self.dist.rank, world).to(self.device, non_blocking=True)
            input_ids, labels = batch[:, :-1], batch[:, 1:]
            # Gradients are all-reduced (DDP) / reduce-scattered (FSDP) on the last micro-batch only.
            with self.dist.grad_sync(self.train_lm, micro == accum - 1):
                with self._autocast():
                    loss, parts = self.compute_loss(input_ids, labels)
                (loss / accum).backward()
            self.balance.collect()  # routed-token counts, for the bias update and the logged shares
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v.detach().float() / accum
        return totals

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule; returns the pre-clip global grad norm."""
        max_norm = self.cfg.optim.grad_clip or float("inf")
        grad_norm = self.dist.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.balance.step(self.dist)  # DeepSeek-V3 aux-loss-free balancing (when on), after the weights moved
        self.step += 1
        return grad_norm

    # ----- loop -----

    def train(self, until_step: int | None = None) -> dict:
        """Train to cfg.steps (or stop early at `until_step`, saving so that a resume continues there)."""
        cfg = self.cfg
        end = cfg.steps if until_step is None else min(until_step, cfg.steps)
        tokens_per_step = cfg.data.batch_size * cfg.data.grad_accum * cfg.data.seq_len
        if self.dist.is_main:  # one record per (re)start: what the tok/s figures that follow were computed in
            self.log.add("run", self.step, precision=self.precision, threads=torch.get_num_threads())
        if self.step == 0 and self.log.last("eval") is None:
            self.evaluate_and_log()  # the curve starts at the untrained model
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and cfg.progress))
        try:
            while self.step < end:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                parts = self.forward_backward(self.step)
                grad_norm = self.optimizer_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                tok_s = tokens_per_step / (time.perf_counter() - t0)
                self._loss_sum += parts["loss"]
                self._loss_steps += 1
                bar.set_postfix(loss=f"{float(parts['loss']):.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                bar.update()
                done = self.step == cfg.steps
                if cfg.log_every and (self.step % cfg.log_every == 0 or done):
                    self._log_train(lr, grad_norm, tok_s, parts)
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                    self.evaluate_and_log()
                if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                    self.save()
        finally:
            bar.close()
        if self.step != self._saved_step:
            self.save()
        return self.summary()

    def _log_train(self, lr: float, grad_norm: float, tok_s: float, parts: dict) -> None:
        # Mean over the steps since the last record and over ranks (every rank reaches this line).
        loss = self.dist.all_reduce_sum(self._loss_sum / self._loss_steps) / self.dist.world_size
        self._loss_sum, self._loss_steps = torch.zeros((), device=self.device), 0
        if self.dist.is_main:
            extra = {k: float(v) for k, v in parts.items() if k != "loss"}
            self.log.add("train", self.step, loss=float(loss), lr=lr, grad_norm=grad_norm, tok_per_s=tok_s, **extra)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the first data.eval_batches batches (rows split across ranks)."""
        self.lm.eval()
        keys, bs = self.eval_keys(), self.cfg.data.batch_size
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=self.device)  # [tokens, *keys]
        rows = self.val_blocks[:self.cfg.data.eval_batches * bs]
        for start in range(0, rows.shape[0], bs):
            chunk = rows[start:start + bs][self.dist.rank::self.dist.world_size].to(self.device)
            counted = chunk.shape[0] > 0
            if not counted:
                if not self.dist.sharded:
                    continue
                # FSDP: every rank joins every forward's all-gathers, so run a row and leave it out.
                chunk = rows[start:start + 1].to(self.device)
            input_ids, labels = chunk[:, :-1], chunk[:, 1:]
            with self._autocast():
                hidden, logits = self.lm(input_ids)  # under FSDP self.lm is the sharded module itself
                values = self.eval_sums(input_ids, labels, hidden, logits)
            if not counted:
                continue
            sums[0] += labels.numel()
            for i, k in enumerate(keys):
                sums[i + 1] += values[k].double()
        self.dist.all_reduce_sum(sums)
        self.lm.train()
        metrics = {k: float(sums[i + 1] / sums[0]) for i, k in enumerate(keys)}
        metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
        return metrics

    def evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        experts = self.balance.report()  # MoE: expert shares since the last evaluation
        if self.dist.is_main:
            self.log.add("eval", self.step, **metrics, **experts)
            self.log.save(self.out_dir)
            self.log.plot(self.out_dir, title=f"{self.cfg.model.architecture} on {self.cfg.data.corpus}")
            shown = {**metrics, **({"expert imbalance": experts["expert_imbalance_max"]} if experts else {})}
            logger.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        return metrics

    def save(self) -> None:
        """The HF model directory (loadable by FrontierLM and transformers) + the resumable training state."""
        # FSDP: every rank takes part in gathering the full state dicts onto rank 0 (None: not sharded).
        model_state = self.dist.full_model_state(self.model)
        optimizer_state = self.dist.full_optimizer_state(self.optimizer)
        if self.dist.is_main:
            checkpoint.save_model_dir(self.model, self.hf_config, self.out_dir, self.tokenizer,
                                      stop_token_ids(self.tokenizer), model_state)
            checkpoint.save_train_state(self.out_dir, self.model, self.optimizer, self.scheduler, self.step,
                                        {"metrics": self.log.records, "config": self.cfg.to_dict()},
                                        model_state, optimizer_state)
            self.log.save(self.out_dir)
            self.log.plot(self.out_dir, title=f"{self.cfg.model.architecture} on {self.cfg.data.corpus}")
        self._saved_step = self.step
        self.dist.barrier()

    def summary(self) -> dict:
        train, ev = self.log.last("train") or {}, self.log.last("eval") or {}
        return {"step": self.step, "train_loss": train.get("loss"), "eval_loss": ev.get("loss"),
                "eval_ppl": ev.get("ppl"), "out_dir": str(self.out_dir)}

    def close(self) -> None:
        self.dist.close()
