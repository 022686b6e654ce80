"""End-to-end benchmark: tokens/s a gradio_client receives from the running app, against the engine's own
figure for the same request.

Starts the real app in-process (the embedded SmolLM2 on CPU, the default engine), streams replies through
the ``/chat`` API with ``gradio_client`` and times, on the client, the first and the last update that
brought new reply text. The engine's own figure for that request is the tok/s it printed under the reply
(``ReplyStats.summary()``); the token count is the one it printed too. Prints one JSON line per request
and a summary line; nothing here asserts a time.

    python benchmarks/e2e_bench.py                 # 3 greedy replies of up to 128 tokens
    python benchmarks/e2e_bench.py --runs 5 --max-tokens 256 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CURSOR = "▌"
FOOTER = re.compile(r"(\d+) tokens? · first token ([\d.]+) s · ([\d.]+) tok/s")
PROMPTS = ["Write a long story about a dragon who learns to cook.",
           "Explain in detail how a bicycle works, part by part.",
           "Describe a walk through a busy city market, with many details.",
           "Write a long letter to a friend about a trip to the mountains.",
           "Explain step by step how bread is made at home."]


def say(out: Path | None, **record) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as fh:
            fh.write(line + "\n")


def text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return "" if content is None else str(content)


def last_reply(chatbot) -> str:
    for message in reversed(chatbot or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return text_of(message)
    return ""


def one_request(client, model: str, system: str, prompt: str, max_tokens: int) -> dict:
    job = client.submit(prompt, model, system, 0.0, 1.0, max_tokens, api_name="/chat")
    started = time.perf_counter()
    first = last = None
    seen = ""
    final = ""
    for update in job:
        now = time.perf_counter()
        chatbot = update[0] if isinstance(update, (list, tuple)) else update
        reply = last_reply(chatbot)
        if FOOTER.search(reply):
            final = reply
            continue
        body = reply.replace(CURSOR, "")
        if body and body != seen:
            first = first or now
            last = now
            seen = body
    job.result()
    if not final and job.outputs():
        final = last_reply(job.outputs()[-1][0])
    match = FOOTER.search(final or "")
    if not match or first is None or last is None:
        return dict(error="no statistics line or no streamed text", reply=(final or seen)[-200:])
    n_tokens, ttft, engine_rate = int(match.group(1)), float(match.group(2)), float(match.group(3))
    client_rate = (n_tokens - 1) / (last - first) if last > first else None
    return dict(tokens=n_tokens, engine_tok_s=engine_rate, client_tok_s=round(client_rate, 2) if client_rate else None,
                ratio=round(client_rate / engine_rate, 3) if client_rate else None, engine_ttft_s=ttft,
                client_ttft_s=round(first - started, 3), wall_s=round(time.perf_counter() - started, 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engine", default="auto", choices=("auto", "fast", "cb"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None

    import torch
    from gradio_client import Client

    from app import create_app
    from vicuna_demo.config import ModelSpec, load_settings
    from vicuna_demo.engines.local import EngineOptions, LocalEngine
    from vicuna_demo.loading import load_model

    device = f"cpu ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"
    loaded = load_model(ModelSpec("embedded"))
    engine = LocalEngine(loaded, EngineOptions(backend=args.engine))
    engine.warmup()
    with tempfile.TemporaryDirectory() as logs:
        settings = load_settings(["--log-dir", logs, "--rate-limit", "0", "--max-new-tokens-limit",
                                  str(max(args.max_tokens, 16))], environ={})
        demo, runtime = create_app(settings, engines={engine.name: engine})
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            client = Client(url, verbose=False)
            say(out, stage="env", device=device, torch=torch.__version__, backend=engine.backend,
                max_tokens=args.max_tokens)
            ratios = []
            for i in range(args.runs):
                result = one_request(client, engine.name, engine.default_system, PROMPTS[i % len(PROMPTS)],
                                     args.max_tokens)
                say(out, stage="e2e_gradio_client", device=device, run=i, **result)
                if result.get("ratio"):
                    ratios.append(result["ratio"])
            if ratios:
                say(out, stage="e2e_summary", device=device, runs=len(ratios),
                    ratio_median=round(statistics.median(ratios), 3), ratio_min=min(ratios))
        finally:
            demo.close()
            runtime.close()
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
