"""Writes benchmarks/RESULTS.md from the raw files in benchmarks/results/: one current table per claim.

Each claim below names its raw file (JSON lines written by a benchmark's ``--out``), the device, the date, the
command that produced it and what it shows; the table lists every measurement of that run, so a figure's
baseline (``generate``, transformers' continuous batching, fp16 beside 4-bit) is the row beside it, from the
same process. Older runs stay in git history. A new run: add its file to results/, point its claim here at
it (or add a claim), run this script.

    python benchmarks/results_page.py            # rewrite RESULTS.md
    python benchmarks/results_page.py --check    # exit 1 if RESULTS.md is not what the raw files give
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE / "RESULTS.md"


@dataclass(frozen=True)
class Claim:
    title: str
    file: str          # under results/
    device: str
    date: str
    command: str
    shows: str         # what the table is evidence of, and its setting
    columns: tuple[str, ...] = ()   # a plain table of these fields of each record (runs that are not streams)


CLAIMS = (
    Claim("Vicuna-7B fp16 and 8-bit on an H100: the fast path against generate and continuous batching",
          "2026-11-26_h100_engine_bench.jsonl", "NVIDIA H100 80GB HBM3", "2026-11-26",
          "python3 benchmarks/engine_bench.py --budget-s 420 --stages baseline,steps,fast,cb,int8",
          "Vicuna-7B shape, random fp16 weights, 512-token prompts, 256 new tokens, greedy, through LocalEngine; "
          "baselines: generate + streamer and transformers' continuous batching with CUDA graphs."),
    Claim("Vicuna-7B fp16 and 8-bit on an H200", "2026-11-26_h200_engine_bench.jsonl", "NVIDIA H200", "2026-11-26",
          "python3 benchmarks/engine_bench.py --budget-s 420 --stages baseline,steps,fast,cb,int8",
          "The same run on an H200."),
    Claim("Vicuna-7B 4-bit (NF4) beside fp16 in one run", "2026-12-06c_h100_quant.jsonl", "NVIDIA H100 80GB HBM3",
          "2026-12-06", "python3 benchmarks/quant_bench.py --stages nf4,fp16,card13,card33 --budget-s 280",
          "NF4 (bitsandbytes, double-quantized) and fp16 fast path, 512-token prompts, 256 new tokens; fp16 and "
          "plain generate on the 4-bit model are the baselines; teacher-forced agreement with the de-quantized "
          "model."),
    Claim("Vicuna-7B fp16, 8-bit and NF4 in one run, with every kernel candidate timed", "2026-12-07e_h200_quant.jsonl",
          "NVIDIA H200", "2026-12-07", "python3 benchmarks/quant_bench.py --stages fp16,nf4,int8 --streams 1,8,64",
          "fp16, LLM.int8 and NF4 fast path at 1/8/64 streams (512-token prompts, 256 new tokens), teacher-forced "
          "agreement with the (de-quantized) model; the warm-up's time for every matmul candidate at every batch "
          "size is in the raw file (`*_tuning` records): the evidence for which kernel variants were kept. "
          "Code: 955eb6c, before the variants that never won were deleted."),
    Claim("13B and 33B 4-bit on simulated cards", "2026-12-07_h100_quant_cards.jsonl", "NVIDIA H100 80GB HBM3",
          "2026-12-07", "python3 benchmarks/quant_bench.py --stages card13,card33 --budget-s 100",
          "The app's start-up on a card of the stated size (memory capped), then streams."),
    Claim("Every architecture the fast path serves, at its real shape", "*_arch_bench.jsonl", "(see rows)",
          "(see rows)", "python3 benchmarks/arch_bench.py --out benchmarks/results/DATE_DEVICE_arch_bench.jsonl",
          "Random fp16 weights of each model's published shape; teacher-forced argmax agreement with "
          "transformers' forward; 1 and 64 streams (128-token prompts, 128 new tokens) through LocalEngine "
          "beside transformers' continuous batching (48 new tokens) in the same process; one-stream floor from "
          "a device copy; KV tokens in the same 16 GiB pool relative to Vicuna-7B. 2026-12-07 (code cebe6d4, "
          "the engines of 2a4ad68): vicuna-7b, llama3-8b and qwen3-8b in one process; mistral, qwen2.5, gemma2 "
          "and gemma3 each in its own process (run together, models built later found the GPU still full). "
          "gemma2-9b's continuous-batching baseline ran out of memory at 64 streams (0.0)."),
    Claim("The app's start-up after the fast-path redesign, and evaluation answers",
          "2026-12-07c_h100_gpu_acceptance.json", "NVIDIA H100 80GB HBM3", "2026-12-07",
          "python3 benchmarks/gpu_acceptance.py --out acc --models-dir /tmp/models --budget 150 --timeout 130 "
          "--only card24_fp16,card16_4bit,eval_two_7b,card16_8bit",
          "Code cebe6d4 (the fast path of 2a4ad68). eval_two_7b: 80 questions x 2 fp16 7B models x 512 new "
          "tokens through the app's start-up, against FastChat's sequential generate in the same process."),
    Claim("Before and after the fast-path redesign, same run (card24_fp16)",
          "2026-12-07d_h100_gpu_acceptance_ab.json", "NVIDIA H100 80GB HBM3", "2026-12-07",
          "python3 benchmarks/gpu_acceptance.py --only card24_fp16 (the tree at 2a4ad68, then at d2374f7)",
          "The same scenario twice in one call: one stream (512-token prompt) is unchanged, but 8 and 16 "
          "streams of 1,500-token prompts are 5.0% and 7.6% slower after the redesign: a regression to find."),
    Claim("The app's start-up on simulated cards, and a GPU without Triton", "2026-12-07b_h100_gpu_acceptance.json",
          "NVIDIA H100 80GB HBM3", "2026-12-07",
          "python3 benchmarks/gpu_acceptance.py --out acc --models-dir /tmp/models --budget 420 --timeout 150 "
          "--only card24_fp16,no_triton,card16_4bit,card48_two_fp16,card16_8bit",
          "python app.py as a user starts it, on a card of the stated size (the rest of the GPU held); no_triton: "
          "the 24 GB card with triton unimportable (eager ops, and the status says why)."),
    Claim("The app's start-up on every card size, NVIDIA H200",
          "2026-12-02c_h200_gpu_acceptance.json", "NVIDIA H200", "2026-12-02",
          "python3 benchmarks/gpu_acceptance.py --out acc --models-dir /tmp/models --budget 430 --timeout 240",
          "python app.py as a user starts it, on a card of the stated size (the rest of the GPU held): whether it "
          "starts, how long, KV tokens per model, one stream after it."),
    Claim("Evaluation answers of two 7B models at once", "2026-12-02_h200_gpu_acceptance.json", "NVIDIA H200",
          "2026-12-02", "python3 benchmarks/gpu_acceptance.py --out acc --models-dir /tmp/models --only eval_two_7b",
          "eval_two_7b: two fp16 7B engines started as the app starts them answer the question set at once "
          "(the other rows: the cards of that day's run)."),
    Claim("The store: SQLite and PostgreSQL writes and the leaderboard read", "*_cpu_store_bench.jsonl",
          "CPU, 2 shared cores", "(see rows)",
          "python benchmarks/store_bench.py --out benchmarks/results/DATE_cpu_store_bench.jsonl",
          "64 concurrent writers of votes and of turns on each back end (PostgreSQL 16 from the pgserver wheel, "
          "on the same machine); then the leaderboard of 100k battles among 30 models read from each.",
          columns=("backend", "what", "writers", "rows", "p50_ms", "p95_ms", "rows_per_s", "battles",
                   "read_s_median", "ratings_s_median")),
    Claim("The leaderboard at 100k battles and 30 models: raw, reweighted, style-controlled",
          "*_cpu2_leaderboard_bench.json", "CPU, 2 shared cores", "(see rows)",
          "python benchmarks/leaderboard_bench.py --out benchmarks/results/DATE_cpu2_leaderboard_bench.json",
          "Seconds per fit and per page refresh (the leaderboard tab's own computation) on generated battles.",
          columns=("what", "seconds")),
    Claim("The embedded SmolLM2-135M on 2 CPU cores", "2026-11-26_cpu_engine_bench.jsonl", "CPU, 2 shared cores",
          "2026-11-26", "python benchmarks/engine_bench.py --device cpu --stages baseline,fast,cb --new-tokens 96 "
          "--rounds 3 --streams 1,4", "Fast path on CPU against generate and continuous batching."),
    Claim("Through the UI: what a gradio_client visitor receives", "2026-11-26_cpu_e2e_bench.jsonl",
          "CPU, 2 shared cores", "2026-11-26", "python benchmarks/e2e_bench.py --runs 5 --max-tokens 128",
          "Tokens/s and TTFT at the client against the engine's own count."),
)

SKIP_STAGES = ("build", "env", "start", "done", "tuning", "quantize", "warmup", "profile", "step", "ready", "end",
               "stopped", "load_back")
RATE = ("aggregate_tok_s", "overall_tok_s", "client_tok_s")
DECODE = ("per_stream_decode_tok_s_median", "decode_tok_s", "engine_tok_s")
TTFT = ("ttft_median_s", "ttft_s", "client_ttft_s")
NOTES = ("argmax_agree", "agreement", "max_gap_where_different", "largest_gap", "matching_prefix", "copy_gb_s",
         "floor_tok_s_bs1", "kv_tokens", "backend", "ms_per_step", "weights_ratio_vs_fp16", "error", "errors")


def first(record: dict, keys) -> object:
    return next((record[k] for k in keys if record.get(k) is not None), "")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "/")[:120]


def records(path: Path) -> list[dict]:
    if path.suffix == ".json":          # gpu_acceptance: a list of scenarios
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else [data]
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def measurement_table(rows: list[dict]) -> list[str]:
    lines = ["| stage | streams | tok/s (aggregate) | decode tok/s (per stream) | TTFT median / p95 s | notes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        stage = str(r.get("stage", ""))
        if not stage or any(stage == s or stage.endswith("_" + s) for s in SKIP_STAGES) or stage == "summary":
            continue
        ttft = first(r, TTFT)
        ttft = f"{fmt(ttft)} / {fmt(r['ttft_p95_s'])}" if r.get("ttft_p95_s") is not None else fmt(ttft)
        notes = ", ".join(f"{k} {fmt(r[k])}" for k in NOTES if r.get(k) not in (None, ""))
        label = stage + (f" ({r['arch']})" if r.get("arch") else "")
        lines.append(f"| {label} | {fmt(r.get('streams', ''))} | {fmt(first(r, RATE))} | {fmt(first(r, DECODE))} "
                     f"| {ttft} | {notes} |")
    return lines


def scenario_table(rows: list[dict]) -> list[str]:
    lines = ["| scenario | card GiB | started | start-up s | engines: KV tokens | measured |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        engines = ", ".join(f"{name} {fmt(e.get('kv_tokens', ''))}" for name, e in (r.get("engines") or {}).items())
        measured = ", ".join(f"{k} {fmt(v)}" for k, v in r.items() if isinstance(v, (int, float)) and not
                             isinstance(v, bool) and k not in ("card_gib", "startup_s", "simulated_free_gib"))
        for key, value in r.items():
            if isinstance(value, dict) and key != "engines":
                measured += "; " + key + ": " + ", ".join(f"{k} {fmt(v)}" for k, v in value.items()
                                                         if isinstance(v, (int, float)) and not isinstance(v, bool))
        started = "yes" if r.get("started") else f"no: {fmt(r.get('refused', ''))}"
        lines.append(f"| {r.get('scenario', '')} | {fmt(r.get('card_gib') or '')} | {started} | "
                     f"{fmt(r.get('startup_s', ''))} | {engines} | {measured.strip('; ')} |")
    return lines


def plain_table(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    """One row per record (a record holding a ``seconds`` mapping gives one row per entry of it)."""
    flat = []
    for r in rows:
        if isinstance(r.get("seconds"), dict):
            flat += [{"what": what, "seconds": value} for what, value in r["seconds"].items()]
        else:
            flat.append(r)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in flat]


def summary_table(rows: list[dict]) -> list[str]:
    summaries = [r for r in rows if r.get("stage") == "summary"]
    if not summaries:
        return []
    keys = ["arch", "argmax_agree", "fast_tok_s", "cb_tok_s", "floor_tok_s", "one_stream_of_floor",
            "one_stream_decode_of_floor", "x_cb_at_64",
            "kv_vs_vicuna_7b", "backend", "startup_s", "unsupported_reason"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in summaries:
        lines.append("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")
    return lines + [""]


def render() -> str:
    out = ["# Benchmark results", "",
           "Generated by `benchmarks/results_page.py` from the raw files in `benchmarks/results/` (edit the",
           "claims there, not this page). One table per claim, each from one run: a figure's baseline is in the",
           "same table. Tok/s: aggregate = all streams' tokens over the wall time (prefill included); decode =",
           "one stream's (tokens - 1) / (last token - first token). EOS is disabled, so replies run to their",
           "budget. Earlier runs and the reasoning behind each change are in git history.", ""]
    for claim in CLAIMS:
        matches = sorted(RESULTS.glob(claim.file))
        out += [f"## {claim.title}", ""]
        if not matches:
            out += [f"No run yet (`results/{claim.file}`). Command: `{claim.command}`", ""]
            continue
        path = matches[-1]
        rows = records(path)
        device = claim.device if not claim.device.startswith("(") else \
            next((r["device"] for r in rows if r.get("device")), "?")
        date = claim.date if not claim.date.startswith("(") else path.name[:10]
        out += [f"Device: {device}. Date: {date}. Raw: `results/{path.name}`.", "",
                f"    {claim.command}", "", claim.shows, ""]
        if claim.columns:
            out += plain_table(rows, claim.columns) + [""]
        elif path.suffix == ".json":
            out += scenario_table(rows) + [""]
        else:
            out += summary_table(rows) + measurement_table(rows) + [""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            print("benchmarks/RESULTS.md is not what the raw files give: python benchmarks/results_page.py")
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
