"""Services built from settings: models loaded, engines started, moderator, store, ChatService.

    runtime = build_runtime(settings)     # raises LoadError / ConfigError with one clear line
    ... runtime.service, runtime.banners ...
    runtime.close()
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
from ..engines.zerogpu import start_engine, zerogpu_spaces
from ..publish import start_dataset_push
from ..engines.local import EngineOptions
from ..engines.protocol import SamplingParams
from ..loading import EMBEDDED_NOTE, LoadError, cuda_available, load_model
from ..engines.remote import start_remote_engines
from ..data.storage import open_store

log = logging.getLogger("vicuna_demo")


@dataclass
class Runtime:
    service: ChatService
    banners: list[str] = field(default_factory=list)
    battles: BattleService | None = None   # side by side and the anonymous arena (Arena built once, here)
    engines: dict = field(default_factory=dict)
    store: object = None
    pusher: object = None        # deploy.DatasetPush when --hf-dataset is set
    judge: JudgeService | None = None   # --judge (JudgeService.available is False without one)

    def close(self) -> None:
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


def build_runtime(settings: Settings, *, engines: dict | None = None) -> Runtime:
    """Load every model and start its engine (or use ``engines`` given by a test), then the services."""
    moderator = build_moderator(settings)
    banners: list[str] = []
    started: dict = {}
    if engines is None:
        spaces = zerogpu_spaces()  # on ZeroGPU, imported before CUDA is touched
        try:
            for spec in default_model_specs(settings, gpu=cuda_available()):
                loaded = load_model(spec, progress=log.info)
                engine = start_engine(loaded, engine_options(settings), spaces=spaces)
                started[engine.name] = engine
                if loaded.embedded:
                    banners.append(EMBEDDED_NOTE)
                if settings.warmup:  # in the background: the UI starts now and shows engine.status
                    engine.warmup(background=True)  # the engine logs its own progress
        except BaseException:
            for engine in started.values():
                engine.close()
            raise
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
    if not moderator.enabled:
        banners.append("Content moderation is OFF: messages are not checked. Set OPENAI_API_KEY (or pass "
                       "--moderation openai) before sharing this demo.")
    store = open_store(settings.log_dir or None)
    limits = Limits(max_input_chars=settings.max_input_chars, max_turns=settings.max_turns,
                    rate_limit_per_min=settings.rate_limit, max_new_tokens_cap=settings.max_new_tokens_limit)
    defaults = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                              max_new_tokens=settings.max_new_tokens)
    service = ChatService(engines, moderator, store, limits=limits, moderate_output=settings.moderate_output,
                          defaults=defaults)
    try:
        battles = BattleService.from_settings(service, settings)  # ArenaConfigError for bad --arena-weights
    except ConfigError:
        for engine in started.values():
            engine.close()
        store.close()
        raise
    log.info(moderator.describe())
    judge = build_judge(service, settings)
    pusher = start_dataset_push(settings)
    return Runtime(service=service, banners=banners, engines=started, store=store, pusher=pusher, battles=battles, judge=judge)


def build_judge(service: ChatService, settings: Settings) -> JudgeService:
    """The judge service over the app's engines; evaluations from the page use at most half of a batch."""
    return JudgeService.from_settings(service, settings)
