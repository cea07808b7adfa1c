"""Turns a SchedulerOutput into one forward pass: flattens the scheduled tokens, builds attention metadata,
runs the model, samples, and copies the sampled tokens to the host once."""
from __future__ import annotations

import numpy as np
import torch

from frontierlm.config import EngineConfig, ModelConfig
from frontierlm.engine.scheduler import RunnerOutput, SchedulerOutput
from frontierlm.layers.attention import AttentionMetadata
from frontierlm.layers.sampler import Sampler
from frontierlm.models.loader import load_model


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.model = load_model(model_config, self.device)
        self.sampler = Sampler(model_config.vocab_size, seed=config.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = config.block_size
        # Persistent device buffers sized for the largest step, so decode shapes can later be CUDA-graphed.
        n = config.max_num_batched_tokens
        self.input_ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=self.device)
        pin = self.device.type == "cuda"
        self._host = {name: torch.zeros(n, dtype=torch.long, pin_memory=pin)
                      for name in ("input_ids", "positions", "slot_mapping")}

    # ---- KV cache --------------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]
        self.model.bind_kv_cache(self.kv_caches)

    # ---- one step --------------------------------------------------------------------------------
    def _prepare(self, sched: SchedulerOutput) -> tuple[int, AttentionMetadata, list[int]]:
        bs = self.block_size
        num_seqs = len(sched.scheduled)
        query_lens = [s.num_new_tokens for s in sched.scheduled]
        seq_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in sched.scheduled]
        num_tokens = sum(query_lens)
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        ids = self._host["input_ids"].numpy()
        pos = self._host["positions"].numpy()
        slots = self._host["slot_mapping"].numpy()
        logits_index = []
        offset = 0
        for i, s in enumerate(sched.scheduled):
            req, q = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            table = np.asarray(s.block_ids, dtype=np.int64)
            block_tables[i, :len(table)] = table
            p = np.arange(start, start + q)
            ids[offset:offset + q] = req.all_token_ids[start:start + q]
            pos[offset:offset + q] = p
            slots[offset:offset + q] = table[p // bs] * bs + p % bs
            offset += q
            if s.samples:
                logits_index.append(offset - 1)
        nb = self.device.type == "cuda"
        self.input_ids[:num_tokens].copy_(self._host["input_ids"][:num_tokens], non_blocking=nb)
        self.positions[:num_tokens].copy_(self._host["positions"][:num_tokens], non_blocking=nb)
        self.slot_mapping[:num_tokens].copy_(self._host["slot_mapping"][:num_tokens], non_blocking=nb)
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc=torch.from_numpy(qsl).to(self.device, non_blocking=nb),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(self.device, non_blocking=nb),
            block_tables=torch.from_numpy(block_tables).to(self.device, non_blocking=nb),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
        )
        return num_tokens, meta, logits_index

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        num_tokens, meta, logits_index = self._prepare(sched)
        hidden = self.model(self.input_ids[:num_tokens], self.positions[:num_tokens], meta)
        if not logits_index:
            return RunnerOutput(sampled={})
        rows = [s.request for s in sched.scheduled if s.samples]
        index = torch.tensor(logits_index, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden.index_select(0, index))
        out = self.sampler(logits, rows, self.model_config.eos_token_ids)
        tokens = out.sampled_token_ids.tolist()  # the one device-to-host copy of the step
        result = RunnerOutput(sampled={r.request_id: t for r, t in zip(rows, tokens)})
        if out.logprobs is not None:
            ids, lps = out.logprobs_token_ids.tolist(), out.logprobs.tolist()
            ranks = out.sampled_ranks.tolist()
            for i, r in enumerate(rows):
                n = r.sampling_params.logprobs
                if n is not None:
                    result.logprobs[r.request_id] = (ids[i][:n + 1], lps[i][:n + 1], ranks[i])
        for r, mu in zip(rows, out.new_mirostat_mu):
            if mu is not None:
                result.mirostat_mu[r.request_id] = mu
        return result
