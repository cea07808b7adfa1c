"""Speculative decoding on the packaged demo model: its distilled draft, its MTP module, and n-gram lookup.

    python benchmarks/spec_decode.py [--ks 1,2,4,8] [--batches 1,4,16,64] [--tokens 24] [--json-out FILE]
                                     [--plot-dir docs] [--compiled] [--throughput-only]

Two workloads: held-out python-docs prompts (the validation documents of the demo model's training split) and
a code-editing workload whose prompt holds a function and asks for it back with one name changed (the answer
restates most of the prompt). Greedy decoding in float32, so every speculative run is checked token for token
against the plain run (lossless). For each K: acceptance rate, acceptance per position and mean accepted
length (batch 4); output tokens/s at each batch size with and without speculation, and the speedup the
measured acceptance and step costs predict (all times are CPU seconds of the benchmark process, which runs
torch on one thread: on a shared CPU that is the work done, whatever else runs; wall-clock figures are
recorded beside them):

    predicted = (tokens per request-step: generated / (generated - accepted))
                * (plain step seconds) / (verify step seconds + proposer seconds per step)

beside the measured end-to-end ratio. A last row per batch size runs adaptive K (up to the largest K).
Throughput runs on --workloads (default docs; `--workloads docs,edit` adds the code-editing one, where prompt
lookup has the prompt to copy from).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FRONTIERLM_LOG_LEVEL", "WARNING")

from frontierlm import LLM, SamplingParams  # noqa: E402
from frontierlm.assets import default_draft, default_model  # noqa: E402

METHODS = {"draft": {"method": "draft_model", "model": None}, "mtp": {"method": "mtp"}, "ngram": {"method": "ngram"}}


def docs_prompts(tok, n: int) -> list[list[int]]:
    from frontierlm.train.corpus import python_docs, split_documents

    _, val = split_documents(python_docs(), 0.05, seed=0)  # the demo model's validation documents
    out = []
    for doc in val:
        for para in doc.split("\n\n"):
            ids = tok.encode(para.strip(), add_special_tokens=False)
            if len(ids) >= 40:
                out.append(ids[:32])
            if len(out) == n:
                return out
    return (out * (n // max(len(out), 1) + 1))[:n]


def edit_prompts(tok, n: int) -> list[list[int]]:
    import json as js
    import textwrap

    funcs = [js.dumps, textwrap.dedent, textwrap.indent, inspect.getdoc, inspect.cleandoc, os.path.join,
             os.path.splitext, json.loads, argparse.ArgumentParser.add_argument_group, Path.with_suffix]
    out = []
    for f in funcs:
        try:
            src = textwrap.dedent(inspect.getsource(f))
        except (OSError, TypeError):  # built in C
            continue
        src = "\n".join(src.splitlines()[:24])
        prompt = (f"Rename the argument `s` to `text` in this function and return it unchanged otherwise.\n\n"
                  f"{src}\n\nThe function with the argument renamed:\n\n{src.splitlines()[0]}\n")
        out.append(tok.encode(prompt, add_special_tokens=False))
    return (out * (n // len(out) + 1))[:n]


class Timed:
    """Wraps the engine's runner.execute and proposer.propose to split a step's seconds."""

    @classmethod
    def of(cls, engine) -> "Timed":
        """One wrapper per engine (reset per run)."""
        if not hasattr(engine, "_bench_timed"):
            engine._bench_timed = cls(engine)
        engine._bench_timed.reset()
        return engine._bench_timed

    def reset(self) -> None:
        self.step_s = self.propose_s = 0.0
        self.steps = 0

    def __init__(self, engine):
        self.reset()
        runner = engine.runner
        inner = runner.execute

        def execute(sched):
            t0 = time.process_time()
            out = inner(sched)
            self.step_s += time.process_time() - t0
            self.steps += 1
            return out
        runner.execute = execute
        if engine.spec is not None:
            prop = engine.spec.proposer
            inner_p = prop.propose

            def propose(requests, ks):
                t0 = time.process_time()
                out = inner_p(requests, ks)
                self.propose_s += time.process_time() - t0
                return out
            prop.propose = propose


COMPILED = False  # --compiled: every engine (the plain one too) takes the static-shape compiled paths


def make_llm(spec: dict | None) -> LLM:
    return LLM(default_model(), dtype="float32", max_num_seqs=64, speculative_config=spec,
               enforce_eager=not COMPILED)


def run(llm: LLM, prompts, tokens: int) -> tuple[list, float, Timed]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm up
    if llm.llm_engine.spec is not None:
        llm.llm_engine.spec.stats.__init__(accepted_per_pos=[0] * llm.llm_engine.spec.config.num_speculative_tokens)
    timed = Timed.of(llm.llm_engine)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    timed.wall_s = time.perf_counter() - t0
    # CPU seconds of this process: with one torch thread this is the work done, whatever else the shared CPU runs
    return [o.outputs[0].token_ids for o in outs], time.process_time() - c0, timed


def spec_config(name: str, k: int, adaptive: bool) -> dict:
    cfg = dict(METHODS[name], num_speculative_tokens=k, adaptive=adaptive)
    if name == "draft":
        cfg["model"] = default_draft()
    return {c: v for c, v in cfg.items() if v is not None}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[-1].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--methods", default="draft,mtp,ngram")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (the fastest counts)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--throughput-only", action="store_true", help="skip the acceptance table (batch 4)")
    ap.add_argument("--workloads", default="docs", help="throughput on these workloads (docs,edit)")
    ap.add_argument("--adaptive-only", action="store_true", help="throughput rows: no speculation and adaptive K")
    ap.add_argument("--fixed-only", action="store_true", help="throughput rows: no adaptive K")
    ap.add_argument("--compiled", action="store_true",
                    help="enforce_eager=False for every engine: decode, verification and proposer steps compiled "
                         "(on first use, in the untimed warm-up runs)")
    args = ap.parse_args()
    if args.compiled:
        global COMPILED
        import frontierlm.engine.fast_decode as fd

        COMPILED, fd.WARMUP_DECODE_STEPS = True, 0
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")
    base_llm = make_llm(None)
    tok = base_llm.get_tokenizer()
    workloads = {"docs": docs_prompts(tok, max(batches)), "edit": edit_prompts(tok, max(batches))}
    results = {"load_before": load(), "acceptance": [], "throughput": []}

    # 1. acceptance per workload, proposer and K (batch 4), each checked against the plain run
    for wname, prompts in ({} if args.throughput_only else workloads).items():
        ref, _, _ = run(base_llm, prompts[:4], args.tokens)
        for m in methods:
            for k in ks:
                llm = make_llm(spec_config(m, k, adaptive=False))
                got, _, _ = run(llm, prompts[:4], args.tokens)
                st = llm.llm_engine.spec.stats
                row = {"workload": wname, "method": m, "k": k, "lossless": got == ref,
                       "acceptance_rate": st.acceptance_rate, "mean_accepted_length": st.mean_accepted_length,
                       "per_position": [n / max(st.num_drafts, 1) for n in st.accepted_per_pos]}
                results["acceptance"].append(row)
                print(json.dumps(row), flush=True)

    # 2. throughput on each --workloads workload: plain, each proposer at each K, adaptive. The CPU is shared,
    # so every configuration runs `repeats` times round-robin (engines built once, each warmed up on the same
    # batch) and the fastest run counts.
    configs = [("none", 0, False)] + ([] if args.adaptive_only else [(m, k, False) for m in methods for k in ks]) \
        + ([(m, max(ks), True) for m in methods] if not args.fixed_only else [])
    for b in batches:
        llms = {c: base_llm if c[0] == "none" else make_llm(spec_config(*c)) for c in configs}
        for wname in args.workloads.split(","):
            throughput(results, llms, configs, workloads[wname][:b], wname, b, args)
        del llms
    results["load_after"] = load()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    if args.plot_dir:
        plot(results, Path(args.plot_dir), ks, batches, methods)


def throughput(results, llms, configs, prompts, wname, b, args) -> None:
    """Every configuration on one batch of one workload, round-robin; rows into results["throughput"]."""
    best: dict = {}
    ref = None
    for rep in range(args.repeats + 1):
        for c, llm in llms.items():
            got, secs, t = run(llm, prompts[:b], args.tokens)
            if c[0] == "none":
                ref = got
            if rep == 0:
                continue  # warm-up on the same batch (shapes, caches, the adaptive cost model)
            if c not in best or secs < best[c][0]:
                t = dict(vars(t))  # a snapshot: the wrapper is reset by the next run
                t = type("T", (), t)
                best[c] = (secs, t, got, dict(llm.llm_engine.spec.stats.as_dict()) if c[0] != "none" else {})
    base_secs, t_base, _, _ = best[configs[0]]
    base_tps, base_step = b * args.tokens / base_secs, t_base.step_s / t_base.steps
    for c in configs:
        secs, t, got, st = best[c]
        tps = b * args.tokens / secs
        row = {"workload": wname, "batch": b, "method": c[0], "k": c[1], "adaptive": c[2], "tok_s": tps,
               "speedup": tps / base_tps, "wall_tok_s": b * args.tokens / t.wall_s,
               "wall_speedup": best[configs[0]][1].wall_s / t.wall_s,
               "lossless": got == ref, "load": load()}
        if st:
            per_step = (t.step_s + t.propose_s) / t.steps
            total = b * args.tokens
            per_req_step = total / (total - st["num_accepted_tokens"])  # tokens a request gains per step
            row.update(predicted=per_req_step * base_step / per_step,
                       acceptance_rate=st["acceptance_rate"], mean_accepted_length=st["mean_accepted_length"],
                       draft_tokens_per_step=st["num_draft_tokens"] / max(t.steps, 1))
        results["throughput"].append(row)
        print(json.dumps(row), flush=True)


def plot(results, out: Path, ks, batches, methods) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, w in zip(axes, ("docs", "edit")):
        for m in methods:
            rows = [r for r in results["acceptance"] if r["workload"] == w and r["method"] == m]
            ax.plot([r["k"] for r in rows], [r["acceptance_rate"] for r in rows], marker="o", label=m)
        ax.set_title(f"acceptance vs K ({w})")
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accepted / proposed")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "spec_acceptance.png", dpi=110)
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.6), sharey=True)
    for ax, m in zip(axes, methods):
        for b in batches:
            tp = [r for r in results["throughput"] if r["workload"] == "docs" and r["batch"] == b and r["method"] == m]
            rows = [r for r in tp if not r["adaptive"]]
            line, = ax.plot([r["k"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"batch {b}")
            ad = [r for r in tp if r["adaptive"]]
            if ad:
                ax.scatter([max(ks) + 0.6], [ad[0]["speedup"]], marker="*", s=80, color=line.get_color())
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{m}: speedup vs K (star: adaptive)")
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("output tok/s vs no speculation")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spec_speedup.png", dpi=110)


if __name__ == "__main__":
    main()
