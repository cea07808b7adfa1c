"""Beam search over the engine (LLM.beam_search, vLLM's API; Hugging Face transformers' algorithm).

Each step asks the engine for one token of every live beam with the top 2 * beam_width log-probs (one request
per beam; the shared prefix comes from the prefix cache), then keeps the best beam_width continuations as in
transformers' `generate(num_beams=..., do_sample=False)` with its default `early_stopping=False`:
  - the best 2k candidates of (beam score + next-token logprob) are ranked; a candidate that ends (EOS, or the
    max_tokens-th token) and ranks among the first k becomes a finished hypothesis scored
    cumulative_logprob / generated_length ** length_penalty (the length counts the EOS token);
  - the best k candidates that did not end are the next beams;
  - the search stops when every candidate ended, or when k hypotheses are finished and the best running beam,
    scored at its current length, cannot beat the worst of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from frontierlm.outputs import Logprob
from frontierlm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


@dataclass
class BeamSearchSequence:
    """One hypothesis: `tokens` are prompt + generated ids, `text` the generated text (without EOS)."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first, beam_width of them


@dataclass
class _Instance:
    prompt_len: int
    max_tokens: int
    running: list[BeamSearchSequence]
    finished: list[tuple[float, BeamSearchSequence]] = field(default_factory=list)  # (score, seq), best first
    improvable: bool = True
    done: bool = False


def beam_search(engine, prompt_ids: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    k, lp = params.beam_width, params.length_penalty
    eos = set() if params.ignore_eos else set(engine.model_config.eos_token_ids)
    width = max(2, 1 + len(eos)) * k  # candidates kept per step, as transformers does
    instances = []
    for ids in prompt_ids:
        room = engine.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len ({engine.max_model_len}) leaves no room")
        instances.append(_Instance(len(ids), min(params.max_tokens, room), [BeamSearchSequence(list(ids))]))
    step_params = SamplingParams(max_tokens=1, logprobs=width, temperature=params.temperature, ignore_eos=True,
                                 detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
    gen_len = 0
    while not all(inst.done for inst in instances):
        gen_len += 1
        live = [(inst, beam) for inst in instances if not inst.done for beam in inst.running]
        tops = _next_token_logprobs(engine, [beam.tokens for _, beam in live], step_params, width)
        by_inst: dict[int, list] = {}
        for (inst, beam), top in zip(live, tops):
            by_inst.setdefault(id(inst), []).extend((beam.cum_logprob + lp_, beam, tok, entry)
                                                    for tok, lp_, entry in top)
        for inst in instances:
            if not inst.done:
                _advance(inst, sorted(by_inst[id(inst)], key=lambda c: -c[0])[:width], gen_len, k, lp, eos,
                         params.include_stop_str_in_output)
    tok = engine.tokenizer
    outputs = []
    for inst in instances:
        best = [seq for _, seq in inst.finished[:k]]
        for seq in best:
            gen = seq.tokens[inst.prompt_len:]
            if gen and gen[-1] in eos:
                gen = gen[:-1]
            seq.text = tok.decode(gen, skip_special_tokens=True) if tok is not None else None
        outputs.append(BeamSearchOutput(best))
    return outputs


def _advance(inst: _Instance, cands: list, gen_len: int, k: int, lp: float, eos: set, keep_eos: bool) -> None:
    ends = [tok in eos or gen_len >= inst.max_tokens for _, _, tok, _ in cands]
    if inst.improvable:
        for rank, ((cum, beam, tok, entry), end) in enumerate(zip(cands, ends)):
            if rank < k and end:
                stopped = tok in eos
                seq = BeamSearchSequence(beam.tokens + [tok] if keep_eos or not stopped else list(beam.tokens),
                                         beam.logprobs + [entry], cum, finish_reason="stop" if stopped else "length",
                                         stop_reason=tok if stopped else None)
                inst.finished.append((cum / gen_len ** lp, seq))
        inst.finished.sort(key=lambda f: -f[0])
        del inst.finished[k:]
    inst.running = [BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [entry], cum)
                    for (cum, beam, tok, entry), end in zip(cands, ends) if not end][:k]
    if len(inst.finished) >= k and inst.running:
        inst.improvable &= inst.running[0].cum_logprob / gen_len ** lp > inst.finished[-1][0]
    inst.done = not inst.improvable or all(ends)


def _next_token_logprobs(engine, sequences: list[list[int]], params: SamplingParams, width: int) -> list[list]:
    """For each sequence, its `width` most likely next tokens as (token, logprob, {token: Logprob})."""
    ids = [engine.add_request(None, {"prompt_token_ids": seq}, params) for seq in sequences]
    done: dict[str, object] = {}
    try:
        while len(done) < len(ids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    except BaseException:
        engine.abort_request([i for i in ids if i not in done])
        raise
    result = []
    for rid in ids:
        step = done[rid].outputs[0].logprobs[0]
        top = sorted(((t, l) for t, l in step.items() if l.rank is not None and l.rank <= width),
                     key=lambda x: x[1].rank)
        result.append([(t, l.logprob, {t: l}) for t, l in top])
    return result
