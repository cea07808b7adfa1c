"""llama.cpp (llama-cpp-python) on the CPU anchor workload, the peer that benchmarks/anchor.py is compared with.

    pip install llama-cpp-python==0.3.36 gguf sentencepiece     # builds from source for this CPU (~10-16 min)
    python benchmarks/llamacpp_peer.py convert --model /tmp/anchor-model --out /tmp/anchor-gguf --types f32,bf16,q8_0
    python benchmarks/llamacpp_peer.py run --gguf /tmp/anchor-gguf/anchor-f32.gguf [--slots 8,16,32] [--threads 2]

Run it in its own process, never in one with torch (the two OpenMP runtimes in one process have crashed here).
`convert` uses the sdist's own convert_hf_to_gguf.py (LLAMA_CPP_SRC: its vendor/llama.cpp directory) and maps a
BPE pre-tokenizer hash it does not know to "gpt-2" (our tokenizers are GPT-2 byte-level BPE; prompts are fed as
token ids, so the choice never affects timing). Figures, each the median of --rounds rounds:
- b1: the first 4 requests one at a time through `Llama.generate`, decode tok/s after the first token;
- slotsN: continuous batching over N sequence slots through the C API (`llama_batch`, one sequence id per slot,
  a finished slot refilled at once, new prompts prefilled in their own `llama_decode` calls), output tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor import anchor_workload  # noqa: E402

LLAMA_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/llamacpp-src/vendor/llama.cpp"))
CTX_PER_SLOT = 1024
BATCH_TOKENS = 512


def convert(model_dir: str, out_dir: str, types: list[str]) -> None:
    """One GGUF per type in a child process each (the converter is a script with global state)."""
    import subprocess
    os.makedirs(out_dir, exist_ok=True)
    for t in types:
        out = Path(out_dir) / f"anchor-{t}.gguf"
        if not out.exists():
            subprocess.run([sys.executable, __file__, "_convert_one", model_dir, t, str(out)], check=True)
        print(f"{out}: {out.stat().st_size} bytes", file=sys.stderr)


def _convert_one(model_dir: str, outtype: str, out: str) -> None:
    sys.path[:0] = [str(LLAMA_SRC), str(LLAMA_SRC / "gguf-py")]
    import conversion.base as base
    known = base.TextModel.get_vocab_base_pre

    def vocab_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:  # a freshly trained tokenizer's hash is in no list
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_pre
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", outtype, "--outfile", out]
    runpy.run_path(str(LLAMA_SRC / "convert_hf_to_gguf.py"), run_name="__main__")


def no_weight_repacking() -> None:
    """Load models without llama.cpp's extra buffer types (the AMX / AVX-512 weight repacking of quantized types):
    on this VM's Xeon (AMX) the repacked q8_0 / q4_0 path segfaults in its first llama_decode; f32 / bf16 never
    repack, so only quantized files need this."""
    import llama_cpp
    import llama_cpp.llama as high_level
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = high_level.llama_cpp.llama_model_default_params = params


def greedy_decode(llm, ids: list[int], out_len: int) -> tuple[int, float]:
    """Run `out_len` greedy tokens after prompt `ids` on a `llama_cpp.Llama`: (tokens after the first, seconds
    after the first). generate() never stops on its own, so the output length is exact."""
    llm.reset()
    n, t_first = 0, None
    gen = llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True)
    for _ in gen:
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n == out_len:
            break
    gen.close()
    return n - 1, time.perf_counter() - t_first


def batch1(path: str, reqs, threads: int) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
    greedy_decode(llm, [5 + i for i in range(32)], 8)   # warm-up
    decoded, seconds = 0, 0.0
    for ids, out_len in reqs:
        n, s = greedy_decode(llm, ids, out_len)
        decoded, seconds = decoded + n, seconds + s
    llm.close()
    return decoded / seconds


class Slots:
    """Greedy continuous batching over `slots` sequence ids of one llama.cpp context."""

    def __init__(self, path: str, slots: int, threads: int):
        import llama_cpp as L
        import numpy as np
        self.L, self.np, self.slots = L, np, slots
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = slots * CTX_PER_SLOT, BATCH_TOKENS, BATCH_TOKENS, slots
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(BATCH_TOKENS, 0, 1)

    def _decode(self, items) -> list[int]:
        """items: (token, position, seq_id, wants_logits); the argmax of each item that wants logits."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(want)
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())
                for i, it in enumerate(items) if it[3]]

    def run(self, reqs) -> float:
        self.L.llama_memory_clear(self.mem, True)
        pending, free, live, produced = list(reqs), list(range(self.slots)), {}, 0
        t0 = time.perf_counter()
        while pending or live:
            admitted = []
            while free and pending:
                admitted.append((free.pop(0), pending.pop(0)))
            while admitted:   # prefill, packed up to BATCH_TOKENS per call
                items, group = [], []
                while admitted and len(items) + len(admitted[0][1][0]) <= BATCH_TOKENS:
                    seq, (ids, out_len) = admitted.pop(0)
                    items += [(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)]
                    group.append((seq, len(ids), out_len))
                for (seq, pos, out_len), tok in zip(group, self._decode(items)):
                    live[seq] = [pos, out_len, [tok]]
            self._retire(live, free)
            if live:
                seqs = sorted(live)
                for s, tok in zip(seqs, self._decode([(live[s][2][-1], live[s][0], s, True) for s in seqs])):
                    live[s][0] += 1
                    live[s][2].append(tok)
                produced += len(seqs)
                self._retire(live, free)
        return (produced + len(reqs)) / (time.perf_counter() - t0)

    def _retire(self, live, free) -> None:
        for s in [s for s, (_, out_len, out) in live.items() if len(out) >= out_len]:
            del live[s]
            self.L.llama_memory_seq_rm(self.mem, s, -1, -1)
            free.append(s)
        free.sort()

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--types", default="f32")
    r = sub.add_parser("run")
    r.add_argument("--gguf", required=True)
    r.add_argument("--slots", default="8")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--skip-b1", action="store_true")
    r.add_argument("--no-repack", action="store_true", help="no extra buffer types (needed for q8_0 / q4_0 here)")
    o = sub.add_parser("_convert_one")
    o.add_argument("args", nargs=3)
    a = p.parse_args(argv)
    if a.cmd == "_convert_one":
        return _convert_one(*a.args)
    if a.cmd == "convert":
        return convert(a.model, a.out, a.types.split(","))
    import llama_cpp
    if a.no_repack:
        no_weight_repacking()
    reqs = anchor_workload(8192)
    runs: dict[str, list[float]] = {}
    engines = {f"slots{n}": Slots(a.gguf, int(n), a.threads) for n in a.slots.split(",") if n}
    for eng in engines.values():
        eng.run(reqs[:2])   # warm-up
    for rnd in range(a.rounds):
        if not a.skip_b1:
            runs.setdefault("b1", []).append(round(batch1(a.gguf, reqs[:4], a.threads), 1))
        for name, eng in engines.items():
            runs.setdefault(name, []).append(round(eng.run(reqs), 1))
        print(json.dumps({"round": rnd, **{k: v[-1] for k, v in runs.items()}, "load1": os.getloadavg()[0]}),
              file=sys.stderr, flush=True)
    print(json.dumps({"engine": "llama.cpp", "version": llama_cpp.__version__, "gguf": a.gguf, "threads": a.threads,
                      "repack": not a.no_repack,
                      "median": {k: statistics.median(v) for k, v in runs.items()}, "runs": runs}))


if __name__ == "__main__":
    main()
