"""Typed settings: every command-line flag, its environment variable, and the parsed model specs.

Each flag also reads ``VICUNA_DEMO_<FLAG>`` (Hugging Face Spaces configure through variables);
a flag on the command line wins over the variable. Every number is checked against the range its
flag declares (``_Opt.low`` / ``high``) as the settings load, so ``--temperature 5`` stops the
start with one clear line instead of being used. Secrets are only ever read from the
environment (OPENAI_API_KEY, HF_TOKEN, and the key variables named by --endpoint).

Model and endpoint specs (``--model``, ``--endpoint``) are parsed in ``specs.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .data.ratings import MIN_BATTLES
from .specs import ConfigError, EndpointSpec, ModelSpec  # noqa: F401  (re-exported: their home is specs.py)
from .engines.protocol import (MAX_NEW_TOKENS_RANGE, REPETITION_PENALTY_RANGE,  # stdlib-only module
                               SAMPLING_FIELDS, TEMPERATURE_RANGE, TOP_P_RANGE, SamplingParams)

ENV_PREFIX = "VICUNA_DEMO_"
DEFAULT_GPU_MODEL = "lmsys/vicuna-7b-v1.5"
DEFAULT_IDENTITY_WORDS = (
    "vicuna", "lmsys", "llama", "meta ai", "smollm", "hugging face", "huggingface", "chatgpt", "gpt-3",
    "gpt-4", "openai", "claude", "anthropic", "gemini", "bard", "google", "mistral", "qwen", "deepseek",
)


@dataclass(frozen=True)
class Settings:
    # models
    models: tuple[ModelSpec, ...] = ()
    endpoints: tuple[EndpointSpec, ...] = ()
    load_8bit: bool = False
    load_4bit: bool = False
    device: str = "auto"
    judge: str | None = None          # the model (a --model or --endpoint name) that judges answers
    endpoint_concurrency: int = 16    # requests in flight at once per endpoint without its own concurrency=
    # performance
    engine: str = "auto"
    max_batch_requests: int | None = None
    cuda_graphs: str = "auto"
    compile_level: int = 0
    prefix_cache: bool = True
    warmup: bool = True
    # generation: the built-in values; a flag the user gave (see ``given``) wins over every model's own defaults
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    max_new_tokens: int = SamplingParams.max_new_tokens
    max_new_tokens_limit: int = MAX_NEW_TOKENS_RANGE[1]
    repetition_penalty: float = SamplingParams.repetition_penalty
    # moderation
    moderation: str = "auto"
    moderation_model: str = "omni-moderation-latest"
    moderation_on_error: str = "block"
    moderation_thresholds: str = ""
    moderation_timeout: float = 5.0
    moderation_retries: int = 2
    moderate_output: bool = False
    # serving
    host: str | None = None
    port: int | None = None
    share: bool = False
    auth: tuple[str, ...] = ()
    concurrency: int = 64
    max_queue: int | None = None
    max_input_chars: int = 12000
    max_turns: int = 50
    rate_limit: int = 30
    forwarded_allow_ips: str | None = None  # None: none trusted, or the Space's proxies on a Space
    self_test: bool = False           # start as usual, send one chat turn to each model through the page, exit
    # logging
    log_dir: str = "logs"
    # PostgreSQL URI shared by replicas (None: the SQLite file in log_dir); may hold a password, so never shown
    database: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    hf_dataset: str | None = None
    hf_push_minutes: float = 5.0
    # arena
    arena_weights: str = ""
    identity_words: tuple[str, ...] = DEFAULT_IDENTITY_WORDS
    min_battles: int = MIN_BATTLES
    daily_vote_cap: int = 50
    outlier_check_every: int = 100
    # the settings the user gave (flag or variable), by name: a default and a value given equal to it differ
    given: frozenset[str] = frozenset()

    def sampling_flags(self) -> dict[str, float | int]:
        """The sampling values the user gave (--temperature, --top-p, --max-new-tokens, --repetition-penalty):
        they win over every model's own defaults (engines/sampling_defaults.py); a request's value wins over them."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if name in self.given}


@dataclass(frozen=True)
class _Opt:
    group: str
    flag: str
    dest: str
    kind: str            # "str" | "int" | "float" | "bool" | "list" | "choice"
    help: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    low: float | None = None      # numeric flags: the smallest value allowed ...
    high: float | None = None     # ... the largest ...
    above: bool = False           # ... and whether low itself is excluded (timeouts > 0)


_GROUPS = ("models", "performance", "generation", "moderation", "serving", "logging", "arena")
_OPTIONS: tuple[_Opt, ...] = (
    _Opt("models", "--model", "models", "list", "Model to load (repeatable). SPEC = SOURCE[,name=][,template=][,dtype=]"
         "[,8bit|,4bit][,device=][,ctx=]. Default: lmsys/vicuna-7b-v1.5 with a GPU, else the embedded offline SmolLM2.",
         metavar="SPEC"),
    _Opt("models", "--endpoint", "endpoints", "list", "Remote OpenAI-compatible model (repeatable): "
         "name=,base_url=,model=[,key_env=VAR][,note=][,max_tokens=N][,ctx=N][,timeout=S][,concurrency=N][,retries=N].",
         metavar="SPEC"),
    _Opt("models", "--endpoint-concurrency", "endpoint_concurrency", "int", "Requests in flight at once per "
         "--endpoint (more wait their turn in the app); an endpoint's own concurrency=N wins. Requests refused with "
         "429 or 5xx, or timed out before any text, are retried with backoff, honouring Retry-After.", low=1),
    _Opt("models", "--load-8bit", "load_8bit", "bool", "Load every local model in 8-bit through bitsandbytes."),
    _Opt("models", "--load-4bit", "load_4bit", "bool", "Load every local model in 4-bit (NF4, fp16 compute) through "
         "bitsandbytes: a quarter of fp16's memory (Vicuna-13B on a 16 GB card, 33B on a 24 GB card)."),
    _Opt("models", "--device", "device", "str", "Default device for models: auto, cpu, cuda, cuda:N or multi."),
    _Opt("models", "--judge", "judge", "str", "The model that judges answers (LLM-as-a-judge): the name of a --model "
         "or --endpoint, e.g. a strong model behind an endpoint. Without it the page hides ⚖️ Ask the judge and says there is no judge; the start-up log says how to add one.",
         metavar="NAME"),
    _Opt("performance", "--engine", "engine", "choice",
         "How local models run: auto = the fast path (paged KV cache, CUDA graphs, Triton kernels) for "
         "Llama-family models and transformers' continuous batching for others; fast; cb.",
         choices=("auto", "fast", "cb")),
    _Opt("performance", "--max-batch-requests", "max_batch_requests", "int",
         "Most requests decoded together per model (default: 64 on a GPU, 8 on a CPU).", low=1),
    _Opt("performance", "--cuda-graphs", "cuda_graphs", "choice",
         "CUDA graphs for decode steps (auto = on with a GPU; off is slower, for debugging).",
         choices=("auto", "on", "off")),
    _Opt("performance", "--compile-level", "compile_level", "int",
         "torch.compile level of the continuous-batching back end (--engine cb), 0 (eager) to 3.", low=0, high=3),
    _Opt("performance", "--no-prefix-cache", "prefix_cache", "bool",
         "Do not reuse the previous turn's KV cache for the next turn of a conversation."),
    _Opt("performance", "--no-warmup", "warmup", "bool",
         "Skip the warm-up at start-up (the first request then pays for CUDA-graph capture and kernel loading)."),
    _Opt("generation", "--temperature", "temperature", "float", "Default temperature of every model (0 = greedy, "
         "up to 1). Not given: each model's recommended value (its generation_config.json), else the default shown.",
         low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1]),
    _Opt("generation", "--top-p", "top_p", "float", "Default top_p of every model (more than 0, up to 1). Not given: "
         "each model's recommended value, else the default shown.",
         low=TOP_P_RANGE[0], high=TOP_P_RANGE[1], above=True),
    _Opt("generation", "--max-new-tokens", "max_new_tokens", "int",
         f"Default reply length in tokens of every model ({MAX_NEW_TOKENS_RANGE[0]} to --max-new-tokens-limit). Not "
         "given: the model's own if it sets one, else 256 for a model on a CPU (a reply in seconds) and the default "
         "shown on a GPU or an endpoint.", low=MAX_NEW_TOKENS_RANGE[0]),
    _Opt("generation", "--max-new-tokens-limit", "max_new_tokens_limit", "int",
         "Upper bound a visitor may choose for the reply length.", low=MAX_NEW_TOKENS_RANGE[0]),
    _Opt("generation", "--repetition-penalty", "repetition_penalty", "float",
         "Default repetition penalty of every model (1 = off, up to 2; above 1 a token already in the conversation "
         "becomes less likely, as transformers' repetition_penalty). Not given: each model's recommended value, "
         "else off. Not applied by continuous batching (--engine cb); sent to endpoints as repetition_penalty.",
         low=REPETITION_PENALTY_RANGE[0], high=REPETITION_PENALTY_RANGE[1]),
    _Opt("moderation", "--moderation", "moderation", "choice",
         "Check every user message with the OpenAI moderation API. auto = on when OPENAI_API_KEY is set.",
         choices=("auto", "openai", "off")),
    _Opt("moderation", "--moderation-model", "moderation_model", "str", "Moderation model name."),
    _Opt("moderation", "--moderation-on-error", "moderation_on_error", "choice",
         "When the moderation service fails after retries: block the message, or allow it.",
         choices=("block", "allow")),
    _Opt("moderation", "--moderation-thresholds", "moderation_thresholds", "str",
         "Per-category score thresholds that also flag, e.g. sexual=0.2,violence=0.7.", metavar="CAT=SCORE,..."),
    _Opt("moderation", "--moderation-timeout", "moderation_timeout", "float", "Seconds per moderation attempt.",
         low=0, above=True),
    _Opt("moderation", "--moderation-retries", "moderation_retries", "int", "Retries after a failed attempt.",
         low=0),
    _Opt("moderation", "--moderate-output", "moderate_output", "bool",
         "Also check each finished reply; a flagged reply is withdrawn."),
    _Opt("serving", "--host", "host", "str", "Address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)."),
    _Opt("serving", "--port", "port", "int", "Port (default 7860, or the next free one, which the start-up output names).", low=1, high=65535),
    _Opt("serving", "--share", "share", "bool", "Create a temporary public gradio.live link."),
    _Opt("serving", "--auth", "auth", "list", "USER:PASSWORD (repeatable), or @FILE with one pair per line.",
         metavar="USER:PASSWORD"),
    _Opt("serving", "--concurrency", "concurrency", "int",
         "Replies generated at once across all visitors; the rest wait in the queue and see their position.",
         low=1),
    _Opt("serving", "--max-queue", "max_queue", "int", "Most visitors waiting in the queue (default: unlimited).",
         low=1),
    _Opt("serving", "--max-input-chars", "max_input_chars", "int", "Longest message a visitor may send.", low=1),
    _Opt("serving", "--max-turns", "max_turns", "int", "Most user turns in one conversation.", low=1),
    _Opt("serving", "--rate-limit", "rate_limit", "int", "Messages per visitor per minute (0 = unlimited).", low=0),
    _Opt("serving", "--forwarded-allow-ips", "forwarded_allow_ips", "str",
         "Proxies whose X-Forwarded-For names the visitor: comma list of IPs/CIDRs, * = any peer, '' = none "
         "(default: none; on a Hugging Face Space, its private network). See docs/deploy.md.", metavar="IPS"),
    _Opt("serving", "--self-test", "self_test", "bool",
         "Does my install work? Start the app as usual, wait for every model, send one chat turn to each through "
         "the page's own API, print what came back and exit: status 0 when every model replied, 1 otherwise "
         "(no share link; the turns go to a temporary store)."),
    _Opt("logging", "--log-dir", "log_dir", "str", "Folder for the conversation and vote store ('' = keep nothing)."),
    _Opt("logging", "--database", "database", "str",
         "Keep the store in PostgreSQL instead of <log-dir>/vicuna_demo.sqlite3, e.g. postgresql://demo@db/arena, so "
         "several replicas share votes, rate limits and the leaderboard. The password comes from PGPASSWORD, or give "
         "the whole URI in the variable; a password on the command line is refused. See docs/deploy.md.",
         metavar="URI"),
    _Opt("logging", "--log-level", "log_level", "choice", "Console log level.",
         choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    _Opt("logging", "--hf-dataset", "hf_dataset", "str",
         "Hugging Face dataset repo to push logs and votes to periodically (needs HF_TOKEN).", metavar="USER/REPO"),
    _Opt("logging", "--hf-push-minutes", "hf_push_minutes", "float", "Minutes between pushes to --hf-dataset.",
         low=0, above=True),
    _Opt("arena", "--arena-weights", "arena_weights", "str",
         "Sampling weights for anonymous battles, e.g. Vicuna-7B=2,Other=1 (default uniform).", metavar="NAME=W,..."),
    _Opt("arena", "--identity-words", "identity_words", "str",
         "Comma-separated words that reveal a model's identity; a battle whose reply contains one is not counted."),
    _Opt("arena", "--min-battles", "min_battles", "int",
         "Battles a model needs before the leaderboard ranks it; with fewer it is listed last as provisional.",
         low=0),
    _Opt("arena", "--daily-vote-cap", "daily_vote_cap", "int",
         "Counted votes per visitor in 24 hours; later ones are kept but not counted (0 = no cap).", low=0),
    _Opt("arena", "--outlier-check-every", "outlier_check_every", "int",
         "Run the outlier-voter check in the background after every N votes: the votes of a visitor who votes "
         "against the ratings far beyond chance are kept but no longer counted (0 = off).", low=0, metavar="N"),
)


def env_name(opt: _Opt) -> str:
    """--max-turns -> VICUNA_DEMO_MAX_TURNS; a negative flag names the positive variable (--no-warmup -> ..._WARMUP)."""
    flag = opt.flag.removeprefix("--").removeprefix("no-")
    return ENV_PREFIX + flag.replace("-", "_").upper()


def _coerce(opt: _Opt, raw: str) -> Any:
    raw = raw.strip()
    try:
        if opt.kind == "int":
            return int(raw)
        if opt.kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{env_name(opt)}={raw!r}: expected {'a whole number' if opt.kind == 'int' else 'a number'}.") \
            from None
    if opt.kind == "bool":
        value = raw.lower() in ("1", "true", "yes", "on")
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ConfigError(f"{env_name(opt)}={raw!r}: expected true or false.")
        return value
    if opt.kind == "list":
        return [item.strip() for item in raw.split(";") if item.strip()]
    if opt.kind == "choice" and raw not in opt.choices:
        raise ConfigError(f"{env_name(opt)}={raw!r}: expected one of {', '.join(opt.choices)}.")
    return raw


def _range_text(opt: _Opt) -> str:
    """'from 0 to 1', 'more than 0 and up to 1', 'at least 1', 'more than 0', 'at most 3'."""
    parts = []
    if opt.low is not None:
        parts.append(f"{'more than' if opt.above else 'at least'} {opt.low:g}")
    if opt.high is not None:
        parts.append(f"{'up to' if parts else 'at most'} {opt.high:g}")
    if opt.low is not None and opt.high is not None and not opt.above:
        return f"from {opt.low:g} to {opt.high:g}"
    return " and ".join(parts)


def _check_range(opt: _Opt, value: int | float, given_as: str) -> None:
    """ConfigError naming the flag (or variable) as the user gave it when ``value`` is out of range.

    ``given_as`` is "--flag {}" or "VARIABLE={}"."""
    if opt.low is None and opt.high is None:
        return
    bad = not math.isfinite(value)
    if opt.low is not None:
        bad |= value <= opt.low if opt.above else value < opt.low
    if opt.high is not None:
        bad |= value > opt.high
    if bad:
        raise ConfigError(f"{given_as.format(f'{value:g}')}: must be {_range_text(opt)}.")


def _metavar(opt: _Opt) -> str:
    """What --help shows after a flag: the choices when there are some (--cuda-graphs {auto,on,off})."""
    return "{" + ",".join(opt.choices) + "}" if opt.choices else opt.dest.upper()


def wrap_words(text: str, width: int) -> list[str]:
    """Greedy line wrapping that never splits a word; a word longer than the width is split only
    after its commas (``name=,base_url=,model=`` specs), and otherwise overflows the line."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        pieces = re.findall(r"[^,]+,?|,", word) if len(word) > width else [word]
        for number, piece in enumerate(pieces):
            sep = " " if line and number == 0 else ""
            if line and len(line) + len(sep) + len(piece) > width:
                lines.append(line)
                line = piece
            else:
                line += sep + piece
    if line:
        lines.append(line)
    return lines


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter wraps with textwrap, which breaks long words anywhere (``bas e_url``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return wrap_words(text, max(width, 20))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in wrap_words(text, max(width - len(indent), 20)))


class _Parser(argparse.ArgumentParser):
    """argparse, except that a malformed command line gets one line (the error and where to look), not the
    30-line usage text above it; the exit status stays argparse's 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python app.py",
        description="vicuna-demo: chat with local (and remote) models, compare them side by side, run anonymous "
                    "battles with a live leaderboard. Every flag also reads the environment variable shown.",
        formatter_class=_HelpFormatter,
        epilog="Secrets come only from the environment: OPENAI_API_KEY (moderation), OPENAI_BASE_URL (another "
               "moderation-compatible service), HF_TOKEN (gated models, --hf-dataset), and the variables named by "
               "key_env= in --endpoint.")
    defaults = Settings()
    groups = {g: parser.add_argument_group(g) for g in _GROUPS}
    for opt in _OPTIONS:
        env = env_name(opt)
        help_text = f"{opt.help} [env: {env}]"
        group = groups[opt.group]
        if opt.kind == "bool":
            group.add_argument(opt.flag, dest=opt.dest, action="store_const",
                               const=not opt.flag.startswith("--no-"), default=None, help=help_text)
        elif opt.kind == "list":
            group.add_argument(opt.flag, dest=opt.dest, action="append", default=None, metavar=opt.metavar,
                               help=help_text)
        else:
            default = getattr(defaults, opt.dest)
            if isinstance(default, tuple):
                default = ",".join(default)
            shown = f" (default: {default})" if default not in (None, "") else ""
            group.add_argument(opt.flag, dest=opt.dest, default=None, metavar=opt.metavar or _metavar(opt),
                               choices=opt.choices or None,
                               type={"int": int, "float": float}.get(opt.kind, str),
                               help=f"{opt.help}{shown} [env: {env}]")
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over VICUNA_DEMO_* variables, which win over the defaults."""
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for opt in _OPTIONS:
        value = args.get(opt.dest)
        given_as[opt.dest] = opt.flag + " {}"
        if value is None and env_name(opt) in environ:
            value = _coerce(opt, environ[env_name(opt)])
            given_as[opt.dest] = env_name(opt) + "={}"
        if value is not None:
            if opt.kind in ("int", "float"):
                _check_range(opt, value, given_as[opt.dest])
            values[opt.dest] = value
    values["given"] = frozenset(values)
    limit = values.get("max_new_tokens_limit", Settings.max_new_tokens_limit)
    if "max_new_tokens" not in values:     # each model's default is capped by the limit where it is used
        values["max_new_tokens"] = min(Settings.max_new_tokens, limit)
    elif values["max_new_tokens"] > limit:
        raise ConfigError(f"{given_as['max_new_tokens'].format(values['max_new_tokens'])}: the default reply length "
                          f"cannot exceed --max-new-tokens-limit ({limit}).")
    load_8bit = bool(values.get("load_8bit", False))
    load_4bit = bool(values.get("load_4bit", False))
    if load_8bit and load_4bit:
        raise ConfigError("--load-8bit and --load-4bit: choose one (a model's spec can still say 8bit or 4bit).")
    device = values.get("device") or "auto"
    values["models"] = tuple(ModelSpec.parse(s, default_8bit=load_8bit, default_4bit=load_4bit, default_device=device)
                             for s in values.get("models", []))
    per_endpoint = values.get("endpoint_concurrency", Settings.endpoint_concurrency)
    values["endpoints"] = tuple(dataclasses.replace(spec, concurrency=spec.concurrency or per_endpoint)
                                for spec in (EndpointSpec.parse(s) for s in values.get("endpoints", [])))
    if "auth" in values:
        values["auth"] = tuple(values["auth"])
    if "identity_words" in values:
        values["identity_words"] = tuple(w.strip().lower() for w in values["identity_words"].split(",") if w.strip())
    names = [m.display_name for m in values["models"]] + [e.name for e in values["endpoints"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Two models share the name {duplicates[0]!r}: give each a distinct name= in its spec.")
    if values.get("judge") and names and values["judge"] not in names:  # checked before anything loads
        raise ConfigError(judge_unknown_message(values["judge"], names))
    if values.get("database") is not None:
        values["database"] = _database_uri(values["database"], from_flag=given_as["database"].startswith("--"))
        if values["database"] and values.get("hf_dataset"):
            raise ConfigError("--hf-dataset pushes the SQLite store, which --database replaces: back PostgreSQL up "
                              "(pg_dump), or export it with python -m vicuna_demo.data.export --database env.")
    return Settings(**values)


def _database_uri(uri: str, *, from_flag: bool) -> str | None:
    """A PostgreSQL URI checked for shape; a password is accepted only from the environment (argv is public)."""
    uri = uri.strip()
    if not uri:
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ConfigError(f"--database: expected a postgresql:// URI, got a {parts.scheme or 'plain'!r} one "
                          "(leave it out to keep the store in --log-dir).")
    if from_flag and parts.password:
        raise ConfigError("--database: the URI holds a password, which every user of this machine can read in the "
                          "process list. Set PGPASSWORD (or put the whole URI in VICUNA_DEMO_DATABASE) instead.")
    return uri


def judge_unknown_message(judge: str, names: Sequence[str]) -> str:
    return (f"--judge {judge!r}: no --model or --endpoint has that name; the models are: {', '.join(names)}. "
            "Give the judge's spec a name= and pass that name.")


def check_judge(settings: Settings, specs: Sequence[ModelSpec]) -> None:
    """ConfigError unless --judge names one of the models that will be served (``specs``, the defaults when no
    --model was given, and the endpoints): checked before anything loads."""
    names = [s.display_name for s in specs] + [e.name for e in settings.endpoints]
    if settings.judge and settings.judge not in names:
        raise ConfigError(judge_unknown_message(settings.judge, names))


def default_model_specs(settings: Settings, gpu: bool) -> tuple[ModelSpec, ...]:
    """The models to load: those asked for, else Vicuna on a GPU box, else the embedded offline model."""
    if settings.models or settings.endpoints:
        return settings.models
    source = DEFAULT_GPU_MODEL if gpu else "embedded"
    return (ModelSpec(source=source, load_8bit=settings.load_8bit, load_4bit=settings.load_4bit,
                      device=settings.device),)
