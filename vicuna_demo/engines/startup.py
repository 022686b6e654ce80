"""Starting every local model of the process: planned, ordered, in the background, with progress on the page.

    startup = ModelStartup(specs, options, warmup=True)   # plans memory (PlanError if they cannot fit)
    startup.prepare()               # tokenizers and templates (seconds): the page can show every model now
    startup.start()                 # weights, engines, warm-up on one background thread
    service = ChatService(startup.engines, ...)   # StartingEngine placeholders, each says where it is
    startup.wait(timeout_s)         # for scripts and benchmarks: True once every model is ready

Order (engines/gpugate.py says why): every model's weights load first, one after another; then, device
by device, each engine measures its activation peak, the device's free memory is divided into KV
caches by the rule of engines/memory.py, and the engines warm up one at a time. An engine serves as
soon as its own warm-up is done; the GPU gate keeps the next engine's graph capture clear of its steps.

A model that cannot load or start says so in its status and in the reply to every request; the others
go on. Requests to a model that is still loading wait for it (up to ``wait_s``), then get a clear
message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from typing import Callable, Sequence

from ..specs import ModelSpec
from ..loading import LoadError, load_model, load_tokenizer, choose_template, read_config, recommended_sampling
from .gpugate import GPU_GATE
from .memory import (ALLOC_CONF, KvClaim, ModelNeeds, PlanError, check_fit, divide_kv, gib, kv_total, model_needs,
                     place)
from .protocol import Engine, EngineError, Prompt, SamplingParams
from .sampling_defaults import engine_defaults

log = logging.getLogger("vicuna_demo.engines.startup")


def _device_of(spec: ModelSpec) -> str:
    from ..loading import resolve_device  # noqa: PLC0415 - the loader's own rule
    device, _ = resolve_device(spec)
    return device


def plan_memory(specs: Sequence[ModelSpec]) -> list[ModelNeeds]:
    """What each model on a CUDA device needs (from its config), checked against the free memory of each
    device before anything loads. With several GPUs, models whose spec gave no device= are placed
    (memory.place) and the plan's device is where they load (``placed_specs``). Raises PlanError (one line)
    or LoadError."""
    import torch
    needs, movable = [], set()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for spec in specs:
        device = _device_of(spec)
        if not device.startswith("cuda"):
            continue                       # CPU (RAM) and device=multi are not planned
        if gpus > 1 and (spec.device or "auto").lower() == "auto":
            movable.add(spec.display_name)
        precision = "8-bit" if spec.load_8bit else "4-bit" if spec.load_4bit else "fp16"
        dtype_bytes = 4 if (spec.dtype or "").lower() in ("float32", "fp32") else 2
        needs.append(model_needs(spec.display_name, device, read_config(spec), precision=precision,
                                 context=spec.context_window, kv_share=spec.kv_share,
                                 dtype_bytes=dtype_bytes))
    devices = {n.device for n in needs} | ({f"cuda:{i}" for i in range(gpus)} if movable else set())
    free, total = {}, {}
    for device in devices:
        free[device], total[device] = torch.cuda.mem_get_info(torch.device(device))
    if movable:
        needs = place(needs, movable, free)
    check_fit(needs, free, total)
    for n in needs:
        log.info("plan: %s on %s%s (%s): %s weights, at least %s KV cache", n.name, n.device,
                 " (placed: no device= given)" if n.name in movable else "", n.precision, gib(n.weights),
                 gib(n.context * n.kv_per_token))
    return needs


def placed_specs(specs: Sequence[ModelSpec], needs: Sequence[ModelNeeds]) -> list[ModelSpec]:
    """The specs with the device the plan chose for each model it placed (the others unchanged)."""
    where = {n.name: n.device for n in needs}
    return [replace(s, device=where[s.display_name])
            if s.display_name in where and (s.device or "auto").lower() == "auto" else s for s in specs]


class StartingEngine:
    """Implements ``protocol.Engine`` for a model that is loading: its status says how far it is; requests
    wait for it (``wait_s``); once its engine exists, everything is that engine's."""

    def __init__(self, spec: ModelSpec, wait_s: float = 600.0):
        self.spec = spec
        self.name = spec.display_name
        self.wait_s = wait_s
        self.template_name = spec.template or "-"
        self.default_system = ""
        self.engine: Engine | None = None     # the loaded model's, once it exists
        self.error: str | None = None
        self._defaults = SamplingParams()      # until set_defaults: the built-in values
        self._status = f"{self.name}: waiting to load"
        self._settled = threading.Event()       # the engine exists, or the model failed

    # -- filled in by ModelStartup ----------------------------------------------------------------------
    def set_template(self, template) -> None:
        self.template_name, self.default_system = template.name, template.system_message

    def set_defaults(self, defaults: SamplingParams) -> None:
        """The model's defaults, known before its weights load (its generation_config.json and device)."""
        self._defaults = defaults

    def set_status(self, text: str) -> None:
        self._status = f"{self.name}: {text}"
        log.info(self._status)

    def attach(self, engine) -> None:
        self.engine = engine
        self._settled.set()

    def fail(self, message: str) -> None:
        self.error = message
        self._status = f"{self.name}: could not start ({message})"
        log.error(self._status)
        self._settled.set()

    # -- Engine ---------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.engine.status if self.engine is not None else self._status

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(self.engine.ready)

    @property
    def capacity(self) -> str:
        return self.engine.capacity if self.engine is not None else ""

    @property
    def defaults(self) -> SamplingParams:
        """The engine's once it exists; before, the same values read from the model's files (set_defaults)."""
        return self.engine.defaults if self.engine is not None else self._defaults

    @property
    def unsupported_params(self) -> frozenset[str]:
        """The engine's once it exists; before, none (which back end serves the model is decided at load; a
        request is checked against the engine itself after ``prepare``, which waits for it)."""
        return self.engine.unsupported_params if self.engine is not None else frozenset()

    @property
    def continues_replies(self) -> bool:
        """The engine's once it exists; before, True (the local engines it stands for all continue)."""
        return self.engine.continues_replies if self.engine is not None else True

    def warmup(self, progress=lambda message: None, background: bool = False, timeout_s: float = 0.0) -> float:
        """ModelStartup warms the engine up in order; this only reports where it is."""
        progress(self.status)
        return 0.0

    def _engine(self):
        if not self._settled.wait(self.wait_s):
            raise EngineError(f"{self.name} is still starting ({self._status.split(': ', 1)[-1]}). "
                              "Please send your message again in a minute.")
        if self.engine is None:
            raise EngineError(f"{self.name} could not start: {self.error}")
        return self.engine

    def prepare(self, messages: list[dict], params: SamplingParams) -> Prompt:
        return self._engine().prepare(messages, params)

    def stream(self, prompt: Prompt, params: SamplingParams):
        return self._engine().stream(prompt, params)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        elif not self._settled.is_set():
            self.fail("the app is shutting down")


class ModelStartup:
    """Loads, plans and warms up the local models in order (see the module docstring)."""

    def __init__(self, specs: Sequence[ModelSpec], options, *, spaces=None, warmup: bool = True,
                 plan: bool = True, wait_s: float = 600.0):
        if spaces is None:    # before anything touches CUDA (memory.ALLOC_CONF says why)
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
        from .local import EngineOptions  # noqa: PLC0415 - torch-heavy; only when models are local
        self.specs = list(specs)
        self.options = options or EngineOptions()
        self.spaces = spaces
        self.warmup_on = warmup
        # ZeroGPU attaches a GPU per request and CUDA must not be touched here: nothing to plan
        self.needs = plan_memory(self.specs) if plan and spaces is None and _any_cuda(self.specs) else []
        self.specs = placed_specs(self.specs, self.needs)   # with several GPUs, where the plan put each model
        self.engines = {spec.display_name: StartingEngine(spec, wait_s) for spec in self.specs}
        self.kv_plan: dict[str, dict] = {}      # name -> measured reserve, KV bytes (for logs and benchmarks)
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._tokenizers: dict[str, object] = {}

    def prepare(self) -> None:
        """Tokenizers and templates of every model (seconds): names, templates and system prompts are known
        before the weights load. Raises LoadError."""
        for spec in self.specs:
            tokenizer = load_tokenizer(spec)
            self._tokenizers[spec.display_name] = tokenizer
            proxy = self.engines[spec.display_name]
            proxy.set_template(choose_template(spec, tokenizer))
            # the same values the loaded engine will have: zerogpu attaches a GPU, everything else runs where planned
            cpu = self.spaces is None and _device_of(spec) == "cpu"
            proxy.set_defaults(engine_defaults(recommended_sampling(spec), cpu=cpu))

    def start(self, background: bool = True) -> None:
        if background:
            self._thread = threading.Thread(target=self.run, name="model-startup", daemon=True)
            self._thread.start()
        else:
            self.run()

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once every model is ready (False on timeout or when one could not start)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._thread is not None:
            self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return all(e.ready for e in self.engines.values())

    def close(self) -> None:
        self._closed.set()
        for proxy in self.engines.values():
            proxy.close()

    # -- the background thread --------------------------------------------------------------------------
    def run(self) -> None:
        from .local import LocalEngine, start_engine  # noqa: PLC0415
        started = []
        n = len(self.specs)
        for i, spec in enumerate(self.specs, 1):
            proxy = self.engines[spec.display_name]
            if self._closed.is_set():
                return
            proxy.set_status(f"loading weights ({i} of {n} models)")
            try:
                with GPU_GATE.shared():
                    loaded = load_model(spec, progress=log.info, tokenizer=self._tokenizers.get(spec.display_name))
                engine = (start_engine(loaded, spaces=self.spaces) if self.spaces is not None else
                          LocalEngine(loaded, self.options, start=False))
            except LoadError as exc:
                proxy.fail(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
                log.exception("%s: start-up failed", spec.display_name)
                proxy.fail(f"{type(exc).__name__}: {exc}")
                continue
            if self._closed.is_set():
                engine.close()
                return
            # every model loads before any warms up (the KV caches are sized from what the weights leave)
            proxy.set_status("loaded; waiting for the other models before warming up" if i < n else "loaded")
            started.append((proxy, engine))
        local = [(p, e) for p, e in started if isinstance(e, LocalEngine)]
        for proxy, engine in started:
            if not isinstance(engine, LocalEngine):        # ZeroGPU: ready at once
                proxy.attach(engine)
                log.info(engine.status)
        for device in sorted({_engine_device(e) for _, e in local}):
            group = [(p, e) for p, e in local if _engine_device(e) == device]
            shares = self._divide(device, group) if device.startswith("cuda") else {}
            for proxy, engine in group:
                if self._closed.is_set():
                    engine.close()
                    continue
                self._warm(proxy, engine, shares.get(engine.name))

    def _divide(self, device: str, group: list) -> dict[str, int]:
        """Measure each engine's activation peak, then divide what is free into KV caches (memory.py)."""
        import torch
        reserves = {}
        estimates = {n.name: n.reserve for n in self.needs}
        for proxy, engine in group:
            proxy.set_status("measuring activation memory")
            try:
                with GPU_GATE.exclusive():
                    measured = engine.measure_reserve()
            except Exception as exc:  # noqa: BLE001 - fall back to the estimate
                log.warning("%s: measuring activation memory failed (%s); using the estimate", engine.name, exc)
                measured = None
            reserves[engine.name] = measured if measured is not None else estimates.get(engine.name, 2**30)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        total = kv_total(free, list(reserves.values()))
        claims = [KvClaim(e.name, e.kv_per_token, e.useful_kv_bytes(), p.spec.kv_share)
                  for p, e in group]
        shares = divide_kv(total, claims)
        for _, engine in group:
            self.kv_plan[engine.name] = dict(device=device, free_after_weights=free, reserve=reserves[engine.name],
                                             kv_total=total, kv_bytes=shares[engine.name])
            log.info("plan: %s gets %s of KV cache (%s free after weights, %s measured activation reserve)",
                     engine.name, gib(shares[engine.name]), gib(free), gib(reserves[engine.name]))
        return shares

    def _warm(self, proxy: StartingEngine, engine, kv_bytes: int | None) -> None:
        proxy.attach(engine)             # from now on its status is the engine's; requests queue in it
        try:
            engine.start(kv_bytes=kv_bytes)
            engine.warmup(trial_requests=self.warmup_on)
        except Exception as exc:  # noqa: BLE001 - the engine's status and replies say it
            log.error("%s: %s", engine.name, exc)


def _engine_device(engine) -> str:
    device = engine.model.device
    return device.type + (f":{device.index}" if device.index is not None else "")


def _any_cuda(specs: Sequence[ModelSpec]) -> bool:
    try:
        return any(_device_of(s).startswith("cuda") for s in specs)
    except LoadError:
        return False
