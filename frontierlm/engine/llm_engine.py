"""LLMEngine (add_request / step / abort) for streaming callers, and LLM for offline generate / chat."""
from __future__ import annotations

import time
from typing import Iterable

import torch

from frontierlm.config import EngineConfig, ModelConfig, check_attention_backend
from frontierlm.engine.admission import RequestAdmission
from frontierlm.engine.engine_stats import EngineStats
from frontierlm.engine.kv_budget import num_kv_blocks
from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.engine.model_runner import ModelRunner
from frontierlm.engine.output_processor import detokenize, group_delta
from frontierlm.engine.request import Request, RequestStatus
from frontierlm.engine.request_group import RequestGroup, make_output
from frontierlm.engine.scheduler import Scheduler
from frontierlm.engine.step_log import StepLog, clock, step_shape
from frontierlm.engine.tokenizer import load_tokenizer
from frontierlm.logger import init_logger
from frontierlm.outputs import RequestOutput
from frontierlm.sampling_params import RequestOutputKind

logger = init_logger(__name__)

class LLMEngine(RequestAdmission, EngineStats):
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model, config.torch_dtype, config.load_format)
        dtype_reason = "as requested"
        if config.dtype == "auto":  # the checkpoint's, unless this CPU computes it slowly (engine/dtype_policy.py)
            from frontierlm.engine.dtype_policy import choose_dtype

            self.model_config.dtype, dtype_reason = choose_dtype(self.model_config.dtype, torch.device(config.device))
        mc = self.model_config
        check_attention_backend(torch.device(config.device), mc.is_mla)
        from frontierlm.quant.engine import configure_model  # quantization and KV dtype (frontierlm/quant)

        quant_report = configure_model(mc, config)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        if config.max_model_len is not None and config.max_model_len > mc.max_model_len:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context "
                             f"({mc.max_model_len} tokens, max_position_embeddings)")
        self.max_model_len = config.max_model_len or mc.max_model_len
        self.runner = ModelRunner(config, mc)
        mc.max_model_len = self.max_model_len  # what vLLM users read as model_config.max_model_len
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.pipeline = None  # pipeline parallel: up to PP batches in flight (distributed/virtual_engines.py)
        if config.pipeline_parallel_size > 1:
            from frontierlm.distributed.virtual_engines import VirtualEngines

            self.pipeline = VirtualEngines(self)
        self.kv_connector = None  # disaggregated prefill / decode: KV blocks to and from other instances
        if config.kv_transfer_config is not None:
            from frontierlm.kv_transfer.connector import make_connector

            self.kv_connector = self.scheduler.connector = make_connector(config.kv_transfer_config, self.kv,
                                                                          self.runner.kv_caches)
        self.grammar_backend = None  # built on the first structured request (importing xgrammar takes a while)
        self.spec = None  # speculative decoding (frontierlm/spec) when speculative_config is set
        if config.speculative_config is not None:
            from frontierlm.spec.decoder import SpecDecoder

            self.spec = self.runner.spec = SpecDecoder(config.speculative_config, self)
        self.groups: dict[str, RequestGroup] = {}
        self._compiling: list[RequestGroup] = []  # groups whose grammar is still compiling
        self._child_to_group: dict[str, RequestGroup] = {}
        self._counter = 0
        # False (AsyncEngine): step() returns GroupDeltas and text is made off this thread (output_processor.py)
        self.detokenize_in_step = True
        self.step_log = None  # engine/step_log.py: per-step shape and wall time, for the simulator's calibration
        if config.step_log:
            self.step_log = StepLog(config.step_log)
        load_seconds = time.perf_counter() - t0  # the start-up compile is reported on its own
        fast = self.runner.fast_decode
        if fast is not None and config.compile_decode_at_startup and self.runner.parallel is None:
            fast.precompile()  # dummy steps on the scratch block: no request or KV block involved
        bpt = mc.kv_cache_bytes_per_token()
        mla = (f" (MLA latent; MHA of equal heads would need {mc.mha_kv_cache_bytes_per_token()})"
               if mc.is_mla else "")
        self.startup_report = (
            f"FrontierLM: {mc.architecture} ({mc.dtype}, {self.runner.device}) | KV cache: {num_blocks} blocks x "
            f"{config.block_size} tokens = {num_blocks * config.block_size} tokens, {bpt} bytes/token{mla}, "
            f"{num_blocks * config.block_size * bpt / 2**30:.2f} GiB | structured outputs: "
            f"{config.structured_outputs_backend} | loaded in {load_seconds:.1f}s"
            f" | dtype {mc.dtype}: {dtype_reason}{quant_report} | "
            + (self.runner.fast_decode.describe() if self.runner.fast_decode else
               "decode: eager (enforce_eager; enforce_eager=False compiles the decode step)"))
        if self.runner.parallel is not None:
            self.startup_report += f" | parallel: {self.runner.parallel.describe()}"
        if self.spec is not None:
            sc = config.speculative_config
            self.startup_report += (f" | speculative decoding: {sc.method}{' ' + sc.model if sc.model else ''}, "
                                    f"K={sc.num_speculative_tokens}{' adaptive' if sc.adaptive else ''}"
                                    f"{f' ({self.spec.placement})' if self.spec.placement else ''}")
        logger.info(self.startup_report)

    def get_tokenizer(self):
        return self.tokenizer

    def check_health(self) -> None:
        """vLLM's name: raises when the engine cannot step any more (a parallel run lost a worker)."""
        if self.runner.parallel is not None:
            self.runner.parallel.check_health()

    def shutdown(self) -> None:
        """Stop a parallel run's workers now (they also stop when this process exits)."""
        if self.runner.parallel is not None:
            self.runner.parallel.shutdown()
        if self.step_log is not None:
            self.step_log.close()

    @classmethod
    def from_engine_args(cls, model: str, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(model=model, **kwargs))

    def _num_kv_blocks(self) -> int:
        if self.runner.parallel is not None:  # each rank's own budget and share of the cache; the fewest blocks
            return self.runner.parallel.agree_num_kv_blocks(self.max_model_len)
        bytes_per_block = self.model_config.kv_cache_bytes_per_token() * self.config.block_size
        return num_kv_blocks(self.config, self.model_config, self.runner.device, bytes_per_block, self.max_model_len)

    # ---- requests (intake in engine/admission.py) ---------------------------------------------------
    def _forget(self, group: RequestGroup) -> None:
        del self.groups[group.request_id]
        for c in group.children:
            self._child_to_group.pop(c.request_id, None)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            for req in group.children:
                self._child_to_group.pop(req.request_id, None)
                if not req.is_finished:
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)

    def get_requests(self, request_id: str) -> list[Request]:
        """The live sequences (one per sample) of an unfinished request, for callers that track progress."""
        group = self.groups.get(request_id)
        return list(group.children) if group is not None else []

    def has_unfinished_requests(self) -> bool:  # (a producer's held KV blocks are not requests: see poll_idle)
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.step_log is not None and self.pipeline is None:  # (pipeline parallel: its batches overlap)
            return self._logged_step()
        return self._step()

    def _logged_step(self) -> list[RequestOutput]:
        wall_t, t0 = clock()
        self._logged_shape = None
        outputs = self._step()
        if self._logged_shape is not None:  # an empty schedule is no step
            self.step_log.record(wall_t, t0, time.perf_counter(), self._logged_shape, self.has_unfinished_requests())
        return outputs

    def _step(self) -> list[RequestOutput]:
        failed = self._resolve_grammars() if self._compiling else []
        if self.pipeline is not None:  # pipeline parallel: batches in flight (distributed/virtual_engines.py)
            done = self.pipeline.step()
            return self._finish_step(*done, failed) if done is not None else failed
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if not failed and self.has_unfinished_requests():
                time.sleep(0.001)  # only grammar compiles are pending: do not spin
            return failed
        if self.step_log is not None:  # the shape before the step advances its requests
            self._logged_shape = step_shape(sched)
        t0 = self.spec.clock() if self.spec is not None else 0.0
        result = self.runner.execute(sched)
        if self.spec is not None:  # the cost model behind the adaptive draft length
            self.spec.observe_step(sched, self.spec.clock() - t0)
        return self._finish_step(sched, result, failed)

    def _finish_step(self, sched, result, failed: list[RequestOutput]) -> list[RequestOutput]:
        updated = self.scheduler.update_from_output(sched, result)
        touched: dict[str, tuple[RequestGroup, list[int]]] = {}
        for req in updated:
            group = self._child_to_group.get(req.request_id)
            if group is None:
                continue
            idx = group.children.index(req)
            if req.grammar is not None and not req.is_finished and req.sampling_params.structured_outputs.jump_forward:
                self._jump_forward(req)
            if self.detokenize_in_step:
                detokenize(group, idx, req, self._finish, self._decode_one)
            touched.setdefault(group.request_id, (group, []))[1].append(idx)
        outputs = failed
        for group, idxs in touched.values():
            if not self.detokenize_in_step:
                outputs.append(group_delta(group, idxs))
            elif group.finished or group.children[0].sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
                outputs.append(make_output(group, self._decode_one))
            if group.finished:
                self._forget(group)
        if self.spec is not None:  # proposals for the next step (none for requests whose batch is in flight)
            self.spec.propose(self.scheduler.running, self.pipeline.busy if self.pipeline is not None else ())
        if self.kv_connector is not None:  # a prefill instance tells where the prompt's blocks wait
            for out in outputs:
                if out.finished:
                    out.kv_transfer_params = self.kv_connector.transfer_params(out.request_id)
        return outputs

    def poll_idle(self) -> None:
        """Between steps of an idle engine: give back KV blocks a producer held and that were sent or expired."""
        if self.kv_connector is not None:
            self.kv_connector.poll()

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish_request(req.request_id, status)

    def _output(self, group: RequestGroup):
        return make_output(group, self._decode_one) if self.detokenize_in_step else group_delta(group)

    def finish_late(self, request_id: str, stop: str) -> None:
        """The output side (off this thread) found stop string `stop` in sample `request_id` after this engine
        went on with it: finish it now (the tokens sampled since never reach an output)."""
        group = self._child_to_group.get(request_id)
        if group is None:
            return
        req = next(c for c in group.children if c.request_id == request_id)
        if not req.is_finished:
            req.stop_reason = stop
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
        if group.finished:
            self._forget(group)

    def _jump_forward(self, req: Request) -> None:
        """Append the text the grammar forces next as tokens, without sampling them: the scheduler then computes
        them like a prompt chunk in the next step. The forced text is tokenized on its own (how the tokenizer
        would write it); tokens the matcher refuses, and anything after them, are left for sampling."""
        forced = req.grammar.find_jump_forward_string()
        if not forced or req.sampling_params.logprobs is not None:  # forced tokens have no log-probs
            return
        room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
        for token in self.tokenizer.encode(forced, add_special_tokens=False)[:max(room, 0)]:
            if not req.grammar.accept_token(token):
                break
            req.append_token(token)
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
        elif req.grammar.is_terminated():
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
