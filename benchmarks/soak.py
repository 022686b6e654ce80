"""Soak test: N simulated visitors use the app through gradio_client for M minutes (single chat, and
side-by-side comparisons with a vote when the app has that tab), then the log is checked.

    python benchmarks/soak.py --visitors 32 --minutes 10 --out benchmarks/results/soak-32x10.json
    python benchmarks/soak.py --visitors 8 --minutes 1                     # a quick look
    python benchmarks/soak.py --url http://127.0.0.1:7860/ --log-dir logs --pid 1234   # an app already running

Without --url it starts `python app.py --model embedded` itself (rate limit and moderation off, a
fresh log folder) and stops it at the end. Each visitor is its own gradio session, with think time
between requests: it chats (sometimes pressing Clear to start a new conversation) or, when the app
has /compare_send, runs one comparison round of the model against itself and votes. A few visitors
leave in the middle of a reply (the request is cancelled once text has streamed, as a closed tab is):
their turn must still be logged, as cancelled.

Every message carries a unique tag, so the store can be checked against what was sent:
- hung: no final update within --deadline seconds (the job is then cancelled);
- error: the request ended in an exception from the app (gradio_client AppError or a broken stream);
- rejected: the app refused the message with a notice (e.g. the rate limit), so nothing was sent;
- lost: a sent turn whose tag is not in the store; logged turns are compared with sent turns (chat
  = 1 turn, comparison = 2) and stored votes with votes the app thanked for.
Also: RSS of the app process at the start (after a warm-up request) and the end, and its peak;
latency p50/p95 from submit to the final update, and to the first streamed text. Prints one JSON
line and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTIONS = (
    "What is the capital of France?", "Give me three tips for sleeping better.", "What is 17 times 3?",
    "Write a haiku about autumn.", "Explain what a prime number is.", "Name three colours of the rainbow.",
    "How do I boil an egg?", "What does a CPU do?", "Translate 'good morning' into Spanish.",
    "Suggest a name for a pet cat.", "Why is the sky blue?", "List two uses of a paperclip.",
)
TAG = re.compile(r"\[(soak-[0-9a-f]+-\d+-\d+)\]")
CURSOR = "▌"


# -- the app process ----------------------------------------------------------------------------------------

def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux /proc), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppUnderTest:
    """`python app.py --model embedded ...` in a subprocess with a fresh log folder."""

    def __init__(self, app_args: list[str], start_timeout_s: float = 900.0):
        import httpx
        self.log_dir = Path(tempfile.mkdtemp(prefix="soak-logs-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.output = open(self.log_dir.parent / f"{self.log_dir.name}.app.log", "w")
        command = [sys.executable, str(ROOT / "app.py"), "--model", "embedded", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-dir", str(self.log_dir), "--rate-limit", "0",
                   "--moderation", "off", "--log-level", "WARNING", *app_args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.output, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}; see {self.output.name}")
            try:
                if httpx.get(self.url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the app did not answer within {start_timeout_s:.0f} s; see {self.output.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.output.close()

    def cleanup(self) -> None:
        """Remove the log folder and the app's output (kept when the run found a problem)."""
        shutil.rmtree(self.log_dir, ignore_errors=True)
        Path(self.output.name).unlink(missing_ok=True)


# -- visitors -----------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the visitors did, merged under a lock."""

    counts: dict = field(default_factory=dict)
    latency_s: dict = field(default_factory=dict)       # kind -> [submit -> final update]
    first_text_s: dict = field(default_factory=dict)    # kind -> [submit -> first streamed text]
    sent_tags: dict = field(default_factory=dict)       # tag -> turns expected in the store (1 or 2)
    problems: list = field(default_factory=list)        # a few examples of what went wrong
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, latency: float | None = None, first: float | None = None,
            tag: str | None = None, turns: int = 0, problem: str | None = None) -> None:
        with self.lock:
            key = f"{kind}_{outcome}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if latency is not None:
                self.latency_s.setdefault(kind, []).append(latency)
            if first is not None:
                self.first_text_s.setdefault(kind, []).append(first)
            if tag and turns:
                self.sent_tags[tag] = turns
            if problem and len(self.problems) < 20:
                self.problems.append(f"{kind}: {problem}"[:300])


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return "" if content is None else str(content)


def _assistant_texts(chatbot) -> list[str]:
    return [_text(m) for m in (chatbot or []) if m.get("role") == "assistant"]


def _users(chatbot) -> list[str]:
    return [_text(m) for m in (chatbot or []) if m.get("role") == "user"]


def _started(chatbots) -> bool:
    """Has any reply shown text beyond the cursor?"""
    return any(texts and texts[-1].replace(CURSOR, "").strip() for texts in map(_assistant_texts, chatbots))


def wait_job(job, deadline_s: float, chatbots_of) -> tuple[str, float, float | None, object]:
    """Follow a streaming job -> (finished | hung | error, seconds, seconds to first text, final output)."""
    started = time.perf_counter()
    first = None
    while not job.done():
        now = time.perf_counter()
        if first is None:
            outputs = job.outputs()
            if outputs and _started(chatbots_of(outputs[-1])):
                first = now - started
        if now - started > deadline_s:
            job.cancel()
            return "hung", now - started, first, None
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    try:
        result = job.result(timeout=5)
    except Exception as exc:  # noqa: BLE001 - AppError, a broken connection: the app failed this request
        return "error", elapsed, first, f"{type(exc).__name__}: {exc}"
    if first is None and _started(chatbots_of(result)):
        first = elapsed
    return "finished", elapsed, first, result


@dataclass
class Plan:
    url: str
    end: float
    deadline_s: float
    think_s: tuple[float, float]
    max_tokens: tuple[int, ...]
    compare_share: float
    abandon_share: float
    model: str
    compare: bool
    run_id: str
    seed: int


def visitor(index: int, plan: Plan, tally: Tally) -> None:
    from gradio_client import Client
    rng = random.Random(plan.seed * 1000 + index)
    try:
        client = Client(plan.url, verbose=False)
    except Exception as exc:  # noqa: BLE001
        tally.add("visitor", "could_not_connect", problem=str(exc))
        return
    n, chat_turns = 0, 0
    time.sleep(rng.uniform(0, plan.think_s[1]))  # arrivals spread out
    while time.monotonic() < plan.end:
        n += 1
        tag = f"soak-{plan.run_id}-{index}-{n}"
        message = f"[{tag}] {rng.choice(QUESTIONS)}"
        params = (rng.choice((0.0, 0.7, 1.0)), rng.choice((0.9, 1.0)), rng.choice(plan.max_tokens))
        try:
            if plan.compare and rng.random() < plan.compare_share:
                compare_round(client, message, tag, params, plan, tally, rng)
            else:
                if chat_turns >= 6 or (chat_turns and rng.random() < 0.2):
                    client.predict(api_name="/clear")
                    chat_turns = 0
                leave = rng.random() < plan.abandon_share
                if chat_once(client, message, tag, params, plan, tally, abandon=leave):
                    chat_turns += 1
        except Exception as exc:  # noqa: BLE001 - e.g. Clear failed: count it, keep visiting
            tally.add("control", "error", problem=f"{tag}: {type(exc).__name__}: {exc}")
        time.sleep(rng.uniform(*plan.think_s))


def chat_once(client, message, tag, params, plan: Plan, tally: Tally, abandon: bool = False) -> bool:
    job = client.submit(message, plan.model, "", *params, api_name="/chat")
    if abandon:  # leave once the reply has started, as a visitor closing the tab does
        started, deadline = time.perf_counter(), time.perf_counter() + plan.deadline_s
        while not job.done() and time.perf_counter() < deadline:
            outputs = job.outputs()
            if outputs and _started([outputs[-1][0]]):
                job.cancel()
                tally.add("chat", "abandoned", tag=tag, turns=1)
                return False
            time.sleep(0.05)
        if not job.done():
            job.cancel()
            tally.add("chat", "hung", tag=tag, turns=1, problem=f"{tag}: no text in {plan.deadline_s:.0f} s")
            return False
    outcome, elapsed, first, result = wait_job(job, plan.deadline_s, lambda out: [out[0]])
    if outcome == "hung":
        tally.add("chat", "hung", tag=tag, turns=1, problem=f"{tag}: no final update in {elapsed:.0f} s")
        return False
    if outcome == "error":
        tally.add("chat", "error", tag=tag, turns=1, problem=f"{tag}: {result}")
        return False
    chatbot, _, notice = result
    if message not in _users(chatbot):
        tally.add("chat", "rejected", problem=f"{tag}: {notice}")
        return False
    reply = (_assistant_texts(chatbot) or [""])[-1]
    kind = "error_reply" if "⚠️" in reply else "finished"
    tally.add("chat", kind, latency=elapsed, first=first, tag=tag, turns=1,
              problem=f"{tag}: {reply[-200:]}" if kind == "error_reply" else None)
    return True


def compare_round(client, message, tag, params, plan: Plan, tally: Tally, rng: random.Random) -> None:
    client.predict(api_name="/compare_clear")
    job = client.submit(message, plan.model, plan.model, *params, *params, api_name="/compare_send")
    outcome, elapsed, first, result = wait_job(job, plan.deadline_s, lambda out: [out[0], out[1]])
    if outcome in ("hung", "error"):
        tally.add("compare", outcome, tag=tag, turns=2, problem=f"{tag}: {result or f'{elapsed:.0f} s'}")
        return
    chat_a, chat_b, _reveal, notice, _ = result
    if message not in _users(chat_a) or message not in _users(chat_b):
        tally.add("compare", "rejected", problem=f"{tag}: {notice}")
        return
    replies = [(_assistant_texts(c) or [""])[-1] for c in (chat_a, chat_b)]
    kind = "error_reply" if any("⚠️" in r for r in replies) else "finished"
    tally.add("compare", kind, latency=elapsed, first=first, tag=tag, turns=2)
    try:
        voted = client.predict(rng.choice(("a", "b", "tie", "bothbad")), api_name="/compare_vote")
    except Exception as exc:  # noqa: BLE001
        tally.add("vote", "error", problem=f"{tag}: {type(exc).__name__}: {exc}")
        return
    tally.add("vote", "recorded" if str(voted[3]).startswith("Thanks for voting") else "refused",
              problem=None if str(voted[3]).startswith("Thanks") else f"{tag}: {voted[3]}")


# -- checking the log ---------------------------------------------------------------------------------------

def check_store(log_dir: Path, run_id: str, sent_tags: dict) -> dict:
    """Count this run's turns and votes in the store."""
    from vicuna_demo.data.storage import Store
    store = Store(log_dir, read_only=True)
    try:
        rows: dict[str, int] = {}
        battles = set()
        for turn in store.turns():
            users = [m.get("content", "") for m in turn.messages if m.get("role") == "user"]
            found = TAG.search(users[-1] if users else "")
            if found and found.group(1).startswith(f"soak-{run_id}-"):
                rows[found.group(1)] = rows.get(found.group(1), 0) + 1
                if turn.battle_id:
                    battles.add(turn.battle_id)
        votes = [v for v in store.vote_rows(first_per_battle=False) if v["battle_id"] in battles]
        problem = store.problem
    finally:
        store.close()
    lost = sorted(tag for tag, expected in sent_tags.items() if rows.get(tag, 0) < expected)
    extra = sorted(tag for tag, expected in sent_tags.items() if rows.get(tag, 0) > expected)
    return {"logged_turns": sum(min(rows.get(t, 0), e) for t, e in sent_tags.items()),
            "logged_rows_total": sum(rows.values()), "lost": len(lost), "lost_examples": lost[:10],
            "duplicated": len(extra), "votes_stored": len(votes), "store_problem": problem}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


# -- the run ------------------------------------------------------------------------------------------------

def run_soak(url: str, log_dir: str | Path, pid: int, *, visitors: int = 8, seconds: float = 60.0,
             deadline_s: float = 300.0, think_s: tuple[float, float] = (1.0, 5.0),
             max_tokens: tuple[int, ...] = (32, 64), compare_share: float = 0.25, abandon_share: float = 0.05,
             seed: int = 0,
             model: str | None = None, progress=lambda message: None) -> dict:
    """Drive ``visitors`` visitors for ``seconds`` against the app at ``url`` (whose process is ``pid`` and
    whose store is in ``log_dir``) and return the summary (see the module docstring)."""
    from gradio_client import Client
    probe = Client(url, verbose=False)
    endpoints = set(probe.view_api(return_format="dict", print_info=False)["named_endpoints"])
    config_model = model or _first_model(probe)
    compare = "/compare_send" in endpoints and "/compare_vote" in endpoints
    warm = probe.predict("[warm-up] Hello", config_model, "", 0.0, 1.0, 16, api_name="/chat")
    del warm
    rss_start = rss_mib(pid)
    peak = [rss_start or 0.0]
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    plan = Plan(url=url, end=started + seconds, deadline_s=deadline_s, think_s=think_s, max_tokens=max_tokens,
                compare_share=compare_share, abandon_share=abandon_share, model=config_model, compare=compare,
                run_id=run_id, seed=seed)
    tally = Tally()
    done = threading.Event()

    def sample_memory():
        while not done.wait(2.0):
            value = rss_mib(pid)
            if value:
                peak[0] = max(peak[0], value)
            counts = dict(sorted(tally.counts.items()))
            progress(f"{time.monotonic() - started:5.0f} s  rss {value or 0:.0f} MiB  {counts}")

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=visitor, args=(i, plan, tally), daemon=True) for i in range(visitors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + deadline_s + 120)
    stuck_visitors = sum(t.is_alive() for t in threads)
    wall = time.monotonic() - started
    done.set()
    rss_end = rss_mib(pid)
    store = check_store(Path(log_dir), run_id, tally.sent_tags)
    counts = tally.counts
    sent_turns = sum(tally.sent_tags.values())
    hung = counts.get("chat_hung", 0) + counts.get("compare_hung", 0)
    summary = {
        "visitors": visitors, "minutes": round(seconds / 60, 2), "wall_s": round(wall, 1), "model": config_model,
        "comparison": compare, "requests": sum(v for k, v in counts.items() if not k.startswith("vote_")),
        "counts": dict(sorted(counts.items())),
        "hung": hung, "lost": store["lost"], "errors": counts.get("chat_error", 0) + counts.get("compare_error", 0),
        "error_replies": counts.get("chat_error_reply", 0) + counts.get("compare_error_reply", 0),
        "sent_turns": sent_turns, "logged_turns": store["logged_turns"], "duplicated_turns": store["duplicated"],
        "votes_recorded": counts.get("vote_recorded", 0), "votes_stored": store["votes_stored"],
        "rss_mib_start": round(rss_start, 1) if rss_start else None,
        "rss_mib_end": round(rss_end, 1) if rss_end else None, "rss_mib_peak": round(peak[0], 1),
        "latency_s": {kind: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95),
                             "mean": round(statistics.fmean(v), 3)} for kind, v in sorted(tally.latency_s.items())},
        "first_text_s": {kind: {"p50": percentile(v, 50), "p95": percentile(v, 95)}
                         for kind, v in sorted(tally.first_text_s.items())},
        "stuck_visitors": stuck_visitors, "store_problem": store["store_problem"],
        "lost_examples": store["lost_examples"], "problems": tally.problems,
        "settings": {"deadline_s": deadline_s, "think_s": list(think_s), "max_tokens": list(max_tokens),
                     "compare_share": compare_share if compare else 0.0, "abandon_share": abandon_share,
                     "seed": seed},
    }
    return summary


def _first_model(client) -> str:
    """The chat tab's model dropdown's first choice, read from the app's config."""
    for component in client.config.get("components", []):
        props = component.get("props", {})
        if component.get("type") == "dropdown" and props.get("label") == "Model" and props.get("choices"):
            choice = props["choices"][0]
            return choice[0] if isinstance(choice, (list, tuple)) else choice
    raise RuntimeError("could not find the chat tab's model dropdown; pass --model-name")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--url", help="an app already running (then give --log-dir and --pid)")
    parser.add_argument("--log-dir", help="the running app's --log-dir")
    parser.add_argument("--pid", type=int, help="the running app's process id (for its memory)")
    parser.add_argument("--model-name", help="model to use (default: the chat tab's first)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds before a request counts as hung")
    parser.add_argument("--think", default="1,5", help="think time between requests, MIN,MAX seconds")
    parser.add_argument("--max-tokens", default="32,64", help="reply lengths to pick from")
    parser.add_argument("--compare-share", type=float, default=0.25, help="share of rounds that compare and vote")
    parser.add_argument("--abandon-share", type=float, default=0.05, help="share of chats left mid-reply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--app-arg", action="append", default=[], help="extra flag for app.py (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    think = tuple(float(x) for x in args.think.split(","))
    max_tokens = tuple(int(x) for x in args.max_tokens.split(","))
    progress = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    app = None
    if args.url:
        if not (args.log_dir and args.pid):
            parser.error("--url needs --log-dir and --pid")
        url, log_dir, pid = args.url, args.log_dir, args.pid
    else:
        progress("starting the app with the embedded model ...")
        app = AppUnderTest(args.app_arg)
        url, log_dir, pid = app.url, app.log_dir, app.pid
    try:
        summary = run_soak(url, log_dir, pid, visitors=args.visitors, seconds=args.minutes * 60,
                           deadline_s=args.deadline, think_s=think, max_tokens=max_tokens,
                           compare_share=args.compare_share, abandon_share=args.abandon_share, seed=args.seed,
                           model=args.model_name, progress=progress)
    finally:
        if app is not None:
            app.stop()
    summary["machine"] = {"cpus": os.cpu_count(), "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                          "python": sys.version.split()[0]}
    line = json.dumps(summary, ensure_ascii=False)
    print(line, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    ok = summary["hung"] == 0 and summary["lost"] == 0 and summary["logged_turns"] == summary["sent_turns"]
    if app is not None:
        if ok:
            app.cleanup()
        else:
            print(f"kept for inspection: {app.log_dir} and {app.output.name}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
