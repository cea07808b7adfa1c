"""Turns a SchedulerOutput into one forward pass: flattens the scheduled tokens, builds attention metadata,
runs the model, samples, and copies the sampled tokens to the host once."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from frontierlm.config import EngineConfig, ModelConfig
from frontierlm.engine.prompt_logprobs import compute_prompt_logprobs
from frontierlm.engine.scheduler import RunnerOutput, SchedulerOutput
from frontierlm.layers.attention import AttentionMetadata
from frontierlm.layers.logits_processor import LogitsProcessors
from frontierlm.layers.sampler import Sampler
from frontierlm.models.loader import load_model


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.parallel = None  # frontierlm/distributed: rank 0 drives the workers through a stand-in model
        if config.world_size > 1:
            from frontierlm.distributed.executor import DistributedExecutor

            self.parallel = DistributedExecutor(config, model_config)
            self.device = self.parallel.ctx.device
        load = lambda: load_model(model_config, self.device, config.load_format, seed=config.seed)  # noqa: E731
        self.model = self.parallel.load_model(model_config, load) if self.parallel else load()
        procs = LogitsProcessors(config.logits_processors, config, self.device) if config.logits_processors else None
        self.sampler = Sampler(model_config.vocab_size, seed=config.seed, logits_processors=procs)
        self.kv_caches: list[torch.Tensor] = []
        self.fast_decode = None  # engine/fast_decode.py, built with the KV cache unless enforce_eager
        self._pool: ThreadPoolExecutor | None = None  # host work overlapped with the forward (grammar masks)
        self.spec = None  # frontierlm.spec.decoder.SpecDecoder when speculative decoding is on (set by the engine)
        self.block_size = config.block_size
        # Persistent device buffers sized for the largest step, so decode shapes can later be CUDA-graphed.
        n, seqs = config.max_num_batched_tokens, config.max_num_seqs
        if config.speculative_config is not None:  # each verified token attends as its own decode (_prepare)
            seqs = min(seqs * (1 + config.speculative_config.num_speculative_tokens), seqs + n)
        max_blocks = -(-(config.max_model_len or model_config.max_model_len) // config.block_size)
        shapes = {"input_ids": ((n,), torch.long), "positions": ((n,), torch.long),
                  "slot_mapping": ((n,), torch.long), "query_start_loc": ((seqs + 1,), torch.int32),
                  "seq_lens": ((seqs,), torch.int32), "block_tables": ((seqs, max_blocks), torch.int32)}
        pin = self.device.type == "cuda"
        self._host = {k: torch.zeros(shape, dtype=dt, pin_memory=pin) for k, (shape, dt) in shapes.items()}
        self._dev = {k: torch.zeros(shape, dtype=dt, device=self.device) for k, (shape, dt) in shapes.items()}

    def _host_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-host")
        return self._pool

    # ---- KV cache --------------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Each layer says what it stores per token: [2, blocks, block_size, kv_heads, head_dim] for dense
        # attention, [blocks, block_size, kv_lora_rank + rope_dim] for MLA's latent cache.
        # The decode fast path gets one scratch block past the managed ones for its padding rows.
        scratch = 0 if self.config.enforce_eager else 1
        shapes = self.model.kv_cache_shapes(num_blocks + scratch, self.block_size)
        dtype = self.model_config.kv_cache_dtype or self.model_config.dtype  # FP8: frontierlm/quant/kv_cache.py
        self.kv_caches = [torch.zeros(s, dtype=dtype, device=self.device) for s in shapes]
        self.model.bind_kv_cache(self.kv_caches)
        if scratch:
            from frontierlm.engine.fast_decode import FastDecode

            self.fast_decode = FastDecode(self.model, self.device, self.config.max_num_seqs,
                                          self.config.max_model_len or self.model_config.max_model_len,
                                          self.block_size, scratch_block=num_blocks)

    # ---- one step --------------------------------------------------------------------------------
    def _prepare(self, sched: SchedulerOutput) -> tuple[int, AttentionMetadata, list[int], list[int]]:
        """Fill the pinned host buffers, then copy each used slice to its device buffer (non-blocking).
        Returns the rows whose logits sample a token, and the K + 1 rows of each request with proposals."""
        bs = self.block_size
        # Attention sequences: one per scheduled request, except that a request with proposals attends as
        # K + 1 one-token sequences over its own cache (token j sees positions <= its own). Every K/V of the
        # step is written before attention reads, so verification runs the batched decode path.
        attn_rows = None
        if not any(s.spec_token_ids for s in sched.scheduled):
            query_lens = [s.num_new_tokens for s in sched.scheduled]
            seq_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in sched.scheduled]
        else:
            attn_rows = []
            for s in sched.scheduled:
                start = s.request.num_computed_tokens
                if s.spec_token_ids:
                    attn_rows += [(s, 1, start + j + 1) for j in range(s.num_new_tokens)]
                else:
                    attn_rows.append((s, s.num_new_tokens, start + s.num_new_tokens))
            query_lens = [q for _, q, _ in attn_rows]
            seq_lens = [n for _, _, n in attn_rows]
        num_seqs = len(query_lens)
        num_tokens = sum(query_lens)
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        host = {k: v.numpy() for k, v in self._host.items()}
        ids, pos, slots, tables = host["input_ids"], host["positions"], host["slot_mapping"], host["block_tables"]
        tables[:num_seqs, :max_blocks] = 0
        if attn_rows is not None:
            for i, (s, _, _) in enumerate(attn_rows):
                tables[i, :len(s.block_ids)] = s.block_ids
        logits_index, spec_index = [], []
        offset = 0
        for i, s in enumerate(sched.scheduled):
            req, q = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            table = np.asarray(s.block_ids, dtype=np.int64)
            if attn_rows is None:
                tables[i, :len(table)] = table
            p = np.arange(start, start + q)
            k = len(s.spec_token_ids)
            ids[offset:offset + q - k] = req.all_token_ids[start:start + q - k]
            ids[offset + q - k:offset + q] = s.spec_token_ids
            pos[offset:offset + q] = p
            slots[offset:offset + q] = table[p // bs] * bs + p % bs
            offset += q
            if k:
                spec_index += range(offset - k - 1, offset)
            elif s.samples:
                logits_index.append(offset - 1)
        host["query_start_loc"][0] = 0
        np.cumsum(query_lens, out=host["query_start_loc"][1:num_seqs + 1])
        host["seq_lens"][:num_seqs] = seq_lens
        used = {"input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens,
                "query_start_loc": num_seqs + 1, "seq_lens": num_seqs, "block_tables": num_seqs}
        nb = self.device.type == "cuda"
        dev = {}
        for name, rows in used.items():
            d = self._dev[name][:rows]
            if name == "block_tables":
                d = self._dev[name][:rows, :max_blocks]
                d.copy_(self._host[name][:rows, :max_blocks], non_blocking=nb)
            else:
                d.copy_(self._host[name][:rows], non_blocking=nb)
            dev[name] = d
        meta = AttentionMetadata(
            slot_mapping=dev["slot_mapping"], query_start_loc=dev["query_start_loc"], seq_lens=dev["seq_lens"],
            block_tables=dev["block_tables"], query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=bs)
        return num_tokens, meta, logits_index, spec_index

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        rows, matchers, bitmask_job = self._sampling_rows(sched)
        if self.spec is not None and self.spec.wants_spec_step(sched):
            return self._execute_spec(sched, rows, matchers, bitmask_job)
        # pure decode steps: the static-shape compiled / graphed forward; None = take the eager path
        logits = self.fast_decode.run(sched) if self.fast_decode is not None else None
        prompt_lps = {}  # a pure decode step has no prompt tokens
        if logits is None:
            logits, prompt_lps = self._eager_logits(sched)
            if logits is None:
                return RunnerOutput(sampled={}, prompt_logprobs=prompt_lps)
        return self._sample(logits, rows, matchers, bitmask_job, prompt_lps)

    def _sampling_rows(self, sched: SchedulerOutput):
        """The requests that sample this step, their grammar matchers, and the job filling their masks."""
        rows = [s.request for s in sched.scheduled if s.samples and not s.spec_token_ids]
        matchers = [r.grammar for r in rows]
        bitmask_job = None
        if any(m is not None for m in matchers):  # fill grammar masks on a thread, overlapped with the forward
            from frontierlm.structured.backend import fill_grammar_bitmask

            bitmask_job = self._host_pool().submit(fill_grammar_bitmask, matchers, self.model_config.vocab_size)
        return rows, matchers, bitmask_job

    def _forward(self, sched: SchedulerOutput):
        num_tokens, meta, logits_index, spec_index = self._prepare(sched)
        hidden = self.model(self._dev["input_ids"][:num_tokens], self._dev["positions"][:num_tokens], meta)
        prompt_lps, logits = self._logits(sched, hidden, logits_index, num_tokens)
        return hidden, logits, prompt_lps, spec_index

    def _logits(self, sched: SchedulerOutput, hidden: torch.Tensor, logits_index: list[int], num_tokens: int):
        """Prompt log-probs and the logits of the rows that sample, from the step's final hidden states."""
        prompt_lps = {}
        if any(s.request.sampling_params.prompt_logprobs is not None for s in sched.scheduled):
            prompt_lps = compute_prompt_logprobs(self.model, hidden, sched.scheduled)
        logits = None
        if logits_index:
            if len(logits_index) == num_tokens:  # pure decode step: every row yields a token
                logits = self.model.compute_logits(hidden)
            else:
                index = torch.tensor(logits_index, dtype=torch.long).to(self.device, non_blocking=True)
                logits = self.model.compute_logits(hidden.index_select(0, index))
        return prompt_lps, logits

    def _eager_logits(self, sched: SchedulerOutput) -> tuple[torch.Tensor | None, dict]:
        _, logits, prompt_lps, _ = self._forward(sched)
        return logits, prompt_lps

    def _execute_spec(self, sched: SchedulerOutput, rows, matchers, bitmask_job) -> RunnerOutput:
        """The eager step with proposals: plain rows sample as usual, each request's K + 1 rows are verified
        (frontierlm/spec), and the proposer sees the hidden states."""
        spec_mask_job = self._spec_mask_job(sched)
        fast = self.spec.fast.step(sched) if self.spec.fast is not None else None  # all decodes: compiled
        if fast is None:
            hidden, logits, prompt_lps, spec_index = self._forward(sched)
            spec_logits = None
        else:
            (hidden, logits, spec_logits), prompt_lps, spec_index = fast, {}, None
        return self._verify(sched, hidden, logits, prompt_lps, spec_index, spec_logits, rows, matchers, bitmask_job,
                            spec_mask_job)

    def _spec_mask_job(self, sched: SchedulerOutput):
        """Grammar masks of the verification rows, filled on a thread while the forward runs (or None)."""
        spec_rows = [s for s in sched.scheduled if s.spec_token_ids]
        if not any(s.request.grammar is not None for s in spec_rows):
            return None
        from frontierlm.spec.grammar import fill_spec_bitmask

        return self._host_pool().submit(fill_spec_bitmask, [s.request.grammar for s in spec_rows],
                                        [s.spec_token_ids for s in spec_rows], self.model_config.vocab_size)

    def _verify(self, sched: SchedulerOutput, hidden, logits, prompt_lps, spec_index, spec_logits, rows, matchers,
                bitmask_job, spec_mask_job) -> RunnerOutput:
        """After the forward of a step with speculation (this step's, or a pipelined batch's when it comes
        back: distributed/virtual_engines.py): sample the plain rows, verify the proposals, show the proposer
        the hidden states."""
        spec_rows = [s for s in sched.scheduled if s.spec_token_ids]
        if logits is not None:
            result = self._sample(logits, rows, matchers, bitmask_job, prompt_lps)
        else:
            result = RunnerOutput(sampled={}, prompt_logprobs=prompt_lps)
        if spec_rows:
            if spec_logits is None:
                index = torch.tensor(spec_index, dtype=torch.long).to(self.device, non_blocking=True)
                spec_logits = self.model.compute_logits(hidden.index_select(0, index))
            if spec_mask_job is not None:
                from frontierlm.spec.grammar import apply_spec_bitmask

                apply_spec_bitmask(spec_logits, spec_mask_job.result(), [s.request.grammar for s in spec_rows],
                                   [s.spec_token_ids for s in spec_rows])
            verified = self.spec.verify(self.sampler, spec_logits, spec_rows, self.model_config.eos_token_ids)
            for s, v in zip(spec_rows, verified):
                rid = s.request.request_id
                result.sampled[rid], result.spec_accepted[rid] = v.token, v.accepted
                if v.logprobs is not None:  # one entry per kept token: the accepted ones, then `token`'s
                    result.spec_logprobs[rid], result.logprobs[rid] = v.logprobs[:-1], v.logprobs[-1]
        self.spec.observe(sched, hidden, result.spec_accepted)
        return result

    def _sample(self, logits: torch.Tensor, rows, matchers, bitmask_job, prompt_lps: dict) -> RunnerOutput:
        if bitmask_job is not None:
            from frontierlm.structured.backend import apply_grammar_bitmask

            apply_grammar_bitmask(logits, bitmask_job.result(), matchers)
        out = self.sampler(logits, rows, self.model_config.eos_token_ids)
        tokens = out.sampled_token_ids.tolist()  # the one device-to-host copy of the step
        result = RunnerOutput(sampled={r.request_id: t for r, t in zip(rows, tokens)}, prompt_logprobs=prompt_lps)
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
