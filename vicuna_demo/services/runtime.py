"""Services built from settings: models planned and started, moderator, store, ChatService.

    runtime = build_runtime(settings)     # raises LoadError / ConfigError / PlanError with one clear line
    ... runtime.service, runtime.banners ...   # the page can be served now
    runtime.wait_ready(timeout_s)         # scripts: True once every model has loaded and warmed up
    runtime.close()

Models load in the background (engines/startup.py): ``build_runtime`` returns after the memory plan
and the tokenizers (seconds), so the page is up while weights load and engines warm up, each model's
status showing where it is. Nothing here needs gradio.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from moderation import create_moderator, parse_thresholds

from .battle import BattleService
from .chat import ChatService, Limits
from .judge import JudgeService
from ..config import ConfigError, Settings, default_model_specs, judge_unknown_message
from ..engines.startup import ModelStartup
from ..engines.zerogpu import zerogpu_spaces
from ..publish import start_dataset_push
from ..engines.local import EngineOptions
from ..engines.protocol import SamplingParams
from ..loading import EMBEDDED_HINT, EMBEDDED_NOTE, LoadError, cuda_available
from ..engines.remote import start_remote_engines
from ..data.storage import open_store

log = logging.getLogger("vicuna_demo")

MODERATION_OFF_NOTE = "Content moderation is OFF: messages are not checked."


@dataclass
class Runtime:
    service: ChatService
    banners: list[str] = field(default_factory=list)
    battles: BattleService | None = None   # side by side and the anonymous arena (Arena built once, here)
    engines: dict = field(default_factory=dict)
    store: object = None
    pusher: object = None        # deploy.DatasetPush when --hf-dataset is set
    judge: JudgeService | None = None   # --judge (JudgeService.available is False without one)
    startup: ModelStartup | None = None  # the local models' background start-up

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """True once every local model has loaded and warmed up (False on timeout or a failed model)."""
        return self.startup.wait(timeout_s) if self.startup is not None else True

    def close(self) -> None:
        if self.startup is not None:
            self.startup.close()
        if self.battles is not None:
            self.battles.close()
        for engine in self.engines.values():
            engine.close()
        if self.pusher is not None:
            self.pusher.close()
        if self.store is not None:
            self.store.close()


def engine_options(settings: Settings) -> EngineOptions:
    """The engine flags -> EngineOptions. The defaults are the fastest correct configuration on each device
    (see docs/performance.md): the fast path with CUDA graphs and Triton kernels on a GPU, its eager loop on
    a CPU, prefix reuse on; continuous batching for models the fast path does not support."""
    graphs = {"auto": None, "on": True, "off": False}[settings.cuda_graphs]
    return EngineOptions(backend=settings.engine, max_batch_requests=settings.max_batch_requests,
                         use_cuda_graph=graphs, compile_level=settings.compile_level,
                         prefix_cache=settings.prefix_cache)


def build_moderator(settings: Settings):
    try:
        thresholds = parse_thresholds(settings.moderation_thresholds)
        return create_moderator(
            settings.moderation, api_key=os.environ.get("OPENAI_API_KEY") or None,
            model=settings.moderation_model, timeout_s=settings.moderation_timeout,
            max_retries=settings.moderation_retries, thresholds=thresholds, on_error=settings.moderation_on_error,
            logger=logging.getLogger("vicuna_demo.moderation"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_runtime(settings: Settings, *, engines: dict | None = None, background: bool = True) -> Runtime:
    """Plan and start every local model (or use ``engines`` given by a test), then the services.

    The memory plan and the tokenizers are ready when this returns; weights, engines and warm-up follow on a
    background thread (``background=False``: before this returns)."""
    moderator = build_moderator(settings)
    banners: list[str] = []
    started: dict = {}
    startup = None
    embedded = False       # the small offline model is among those started (a note for visitors, a hint for you)
    if engines is None:
        spaces = zerogpu_spaces()  # on ZeroGPU, imported before CUDA is touched
        specs = default_model_specs(settings, gpu=cuda_available())
        startup = ModelStartup(specs, engine_options(settings), spaces=spaces, warmup=settings.warmup)
        startup.prepare()
        started = dict(startup.engines)
        embedded = any(spec.embedded for spec in startup.specs)
        if embedded:
            banners.append(EMBEDDED_NOTE)
        engines = started
    clash = sorted({spec.name for spec in settings.endpoints} & set(engines))
    if clash:
        raise ConfigError(f"Two models share the name {clash[0]!r}: give each a distinct name= in its spec.")
    remote = start_remote_engines(settings.endpoints)    # logs unreachable endpoints, never refuses to start
    engines, started = {**engines, **remote}, {**started, **remote}
    if not engines:
        raise LoadError("No model to serve: pass --model or --endpoint.")
    if settings.judge and settings.judge not in engines:
        for engine in started.values():
            engine.close()
        raise ConfigError(judge_unknown_message(settings.judge, list(engines)))
    if not moderator.enabled:   # how to turn it on is the operator's business: moderation's warning says it
        banners.append(MODERATION_OFF_NOTE)
    store = open_store(settings.log_dir or None, database=settings.database)
    limits = Limits(max_input_chars=settings.max_input_chars, max_turns=settings.max_turns,
                    rate_limit_per_min=settings.rate_limit, max_new_tokens_cap=settings.max_new_tokens_limit)
    # each model's own defaults (its engine's) with the sampling flags the user gave over them
    service = ChatService(engines, moderator, store, limits=limits, moderate_output=settings.moderate_output,
                          defaults=SamplingParams(max_new_tokens=settings.max_new_tokens),
                          flags=settings.sampling_flags())
    try:
        battles = BattleService.from_settings(service, settings)  # ArenaConfigError for bad --arena-weights
    except ConfigError:
        for engine in started.values():
            engine.close()
        store.close()
        raise
    judge = build_judge(service, settings)
    pusher = start_dataset_push(settings)
    for hint in operator_hints(settings, battles, judge, embedded=embedded):
        log.info(hint)
    if startup is not None:
        startup.start(background=background)
    return Runtime(service=service, banners=banners, engines=started, store=store, pusher=pusher, battles=battles,
                   judge=judge, startup=startup)


def build_judge(service: ChatService, settings: Settings) -> JudgeService:
    """The judge service over the app's engines; evaluations from the page use at most half of a batch."""
    return JudgeService.from_settings(service, settings)


def operator_hints(settings: Settings, battles: BattleService, judge: JudgeService, *, embedded: bool) -> list[str]:
    """What the person who started the app can add, for the start-up log (the page tells visitors only what
    they can do): a bigger model than the embedded one (``embedded``: it is among those served), a log for votes,
    a second model for battles, a judge."""
    hints = []
    if embedded:
        hints.append(EMBEDDED_HINT)
    if not settings.log_dir:
        hints.append("--log-dir '': conversations and votes are not kept, so the leaderboard stays empty.")
    if len(battles.arena.models) < 2:
        hints.append("One model only: the anonymous arena and the leaderboard need two or more --model or --endpoint "
                     "entries.")
    elif not battles.arena.can_battle:
        hints.append("The anonymous arena is off: --arena-weights leaves fewer than two models with a weight above 0 "
                     f"({', '.join(f'{m}={w:g}' for m, w in zip(battles.arena.models, battles.arena.weights))}).")
    if not judge.available:
        hints.append("No judge: \"Ask the judge\" is hidden and the Evaluate tab only generates answers. Add one "
                     "with --judge NAME, NAME being one of the models, best a strong one behind an --endpoint "
                     "(docs/evaluation.md).")
    return hints
