"""Start-up as users run it: every engine type implements the whole Engine interface; the services build and
serve without gradio installed; the page is served before the model has loaded, shows its progress, and a
message sent meanwhile waits for the model; a back end that cannot start fails once, with one status and the
same error for every request, and never restarts itself in a loop. Real tiny Llama weights on CPU."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from vicuna_demo.config import ModelSpec
from vicuna_demo.engines import backends, startup
from vicuna_demo.engines.fastpath import FastModel
from vicuna_demo.engines.local import EngineOptions, LocalEngine
from vicuna_demo.engines.protocol import Engine, EngineError, SamplingParams
from vicuna_demo.engines.remote import RemoteEngine
from vicuna_demo.engines.zerogpu import ZeroGPUEngine
from vicuna_demo.loading import load_model

REPO = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


def members(cls) -> dict:
    """The Engine protocol's members: data attributes and methods."""
    names = set(getattr(cls, "__annotations__", {})) | {n for n, v in vars(cls).items()
                                                         if not n.startswith("_") and (callable(v) or
                                                                                       isinstance(v, property))}
    return {n: getattr(cls, n, None) for n in names}


def one_of_each(loaded) -> list:
    from vicuna_demo.config import EndpointSpec

    def gpu(duration=None):
        return lambda task: task
    return [LocalEngine(loaded, start=False), ZeroGPUEngine(loaded, gpu),
            RemoteEngine(EndpointSpec(name="R", base_url="http://127.0.0.1:9/v1", model="m")),
            startup.StartingEngine(ModelSpec("somewhere", name="S"))]


def test_every_engine_type_implements_the_whole_engine_interface(tiny):
    engines = one_of_each(tiny)
    try:
        for engine in engines:
            kind = type(engine).__name__
            for name, declared in members(Engine).items():
                assert hasattr(engine, name), f"{kind} lacks {name}"
                if callable(declared) and not isinstance(declared, property):
                    mine = inspect.signature(getattr(engine, name))
                    for param in list(inspect.signature(declared).parameters)[1:]:
                        assert param in mine.parameters, f"{kind}.{name} does not take {param}"
            assert isinstance(engine.status, str) and isinstance(engine.capacity, str)
            assert isinstance(engine.ready, bool)
            assert isinstance(engine.defaults, SamplingParams) and isinstance(engine.unsupported_params, frozenset)
            assert engine.warmup(background=True) == 0.0 or kind == "LocalEngine"
    finally:
        for engine in engines:
            engine.close()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(ModelSpec(str(tiny_llama_dir), name="Tiny", device="cpu", template="vicuna_v1.1"))


def ask(engine, text="Hello") -> str:
    return "".join(engine.stream(engine.prepare([{"role": "user", "content": text}], GREEDY), GREEDY))


# -- fallbacks that do not loop -------------------------------------------------------------------------

def test_a_batching_back_end_that_cannot_start_fails_once_with_one_status_and_error(tiny, monkeypatch):
    calls = []

    def broken(self):
        calls.append(1)
        raise RuntimeError("Invalid values: max_batch_tokens = 8192, num_sectors = -1")

    monkeypatch.setattr(backends.BatchingBackend, "_make_manager", broken)
    threads_before = threading.active_count()
    engine = LocalEngine(tiny, EngineOptions(backend="cb"))
    try:
        with pytest.raises(EngineError, match="Tiny could not start: Invalid values"):
            engine.warmup()
        assert engine.status == "Tiny: could not start (Invalid values: max_batch_tokens = 8192, num_sectors = -1)"
        assert not engine.ready
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(EngineError, match="could not start"):
                ask(engine)
            assert time.monotonic() - started < 1
        time.sleep(0.5)
        assert calls == [1] and threading.active_count() <= threads_before
    finally:
        engine.close()


def test_when_the_fast_path_and_its_fallback_both_fail_the_engine_reports_it_once(tiny, monkeypatch):
    def no_memory(self, n_blocks=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    manager_starts = []

    def broken(self):
        manager_starts.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(FastModel, "allocate_cache", no_memory)
    monkeypatch.setattr(backends.BatchingBackend, "_make_manager", broken)
    engine = LocalEngine(tiny, EngineOptions())
    try:
        assert engine.backend == "fast"
        with pytest.raises(EngineError, match="could not start"):
            engine.warmup()
        assert engine.backend == "cb" and "could not start" in engine.status and "out of memory" in engine.status
        with pytest.raises(EngineError, match="could not start"):
            ask(engine)
        assert manager_starts == [1]
    finally:
        engine.close()


def test_a_generation_thread_that_keeps_dying_is_replaced_a_few_times_then_the_engine_stops_for_good(tiny):
    engine = LocalEngine(tiny, EngineOptions(backend="cb"))
    embedding = tiny.model.get_input_embeddings()
    try:
        engine.warmup()
        embedding.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected fault"))
        errors = []
        for _ in range(backends.MAX_RESTARTS + 3):
            try:
                ask(engine)
            except EngineError as exc:
                errors.append(str(exc))
            time.sleep(0.3)
        assert all(errors) and len(errors) == backends.MAX_RESTARTS + 3
        assert "stopped serving" in engine.status and "stopped serving" in errors[-1]
        assert not engine.alive()
    finally:
        del embedding.forward
        engine.close()


# -- the page is up at once -----------------------------------------------------------------------------

def test_the_page_is_served_while_the_model_loads_and_a_message_waits_for_it(launch_app, tiny_llama_dir,
                                                                             monkeypatch, caplog):
    from vicuna_demo.services.status import model_statuses
    caplog.set_level(logging.INFO, logger="vicuna_demo.engines.startup")
    release = threading.Event()
    real_load = startup.load_model

    def slow_load(*args, **kwargs):
        assert release.wait(60), "the test never released the load"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(startup, "load_model", slow_load)
    started = time.monotonic()
    url, runtime = launch_app(["--model", f"{tiny_llama_dir},name=Tiny,device=cpu,template=vicuna_v1.1",
                               "--moderation", "off"])
    assert httpx.get(url, timeout=10).status_code == 200
    assert time.monotonic() - started < 30
    engine = runtime.service.engines["Tiny"]
    [status] = model_statuses(runtime.service)
    assert not engine.ready and (status.state, status.detail) == ("loading weights", "loading weights (1 of 1 models)")
    assert engine.default_system.startswith("A chat between a curious user")   # known before the weights

    answer = {}
    waiter = threading.Thread(target=lambda: answer.setdefault("text", ask(engine)))
    waiter.start()
    time.sleep(0.5)
    assert "text" not in answer          # waiting for the model, not failing
    release.set()
    waiter.join(120)
    assert answer.get("text") is not None
    assert runtime.wait_ready(60) and engine.ready
    [status] = model_statuses(runtime.service)
    assert status.state == "ready" and status.detail.startswith("KV cache ") and "conversations" in status.detail
    said = [r.getMessage() for r in caplog.records]
    assert "Tiny: loaded" in said                     # one model: nothing else to wait for
    assert not any("waiting for the other models" in line for line in said)


def test_a_model_that_fails_to_load_in_the_background_says_so_and_the_others_serve(launch_app, tiny_llama_dir,
                                                                                 tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(tiny_llama_dir).iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    url, runtime = launch_app(["--model", f"{tiny_llama_dir},name=Tiny,device=cpu,template=vicuna_v1.1",
                               "--model", f"{broken},name=Broken,device=cpu,template=vicuna_v1.1",
                               "--moderation", "off"])
    runtime.wait_ready(120)
    broken_engine = runtime.service.engines["Broken"]
    assert broken_engine.status.startswith("Broken: could not start (Model 'Broken':")
    with pytest.raises(EngineError, match="Broken could not start"):
        ask(broken_engine)
    assert runtime.service.engines["Tiny"].ready and ask(runtime.service.engines["Tiny"])


# -- no gradio needed -----------------------------------------------------------------------------------

WITHOUT_GRADIO = """
import sys
from importlib.abc import MetaPathFinder

class NoGradio(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gradio", "gradio_client"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoGradio())
from vicuna_demo.config import load_settings
from vicuna_demo.engines.protocol import SamplingParams
from vicuna_demo.services.runtime import build_runtime

settings = load_settings(["--model", sys.argv[1] + ",name=Tiny,device=cpu,template=vicuna_v1.1", "--moderation",
                          "off", "--log-dir", sys.argv[2]], environ={})
runtime = build_runtime(settings)
assert runtime.wait_ready(120), [e.status for e in runtime.engines.values()]
engine = runtime.service.engines["Tiny"]
params = SamplingParams(temperature=0, max_new_tokens=4)
reply = engine.stream(engine.prepare([{"role": "user", "content": "Hello"}], params), params)
text = "".join(reply)
runtime.close()
print("SERVED", reply.stats.n_tokens, [m for m in sys.modules if m.split(".")[0] == "gradio"])
"""


def test_the_services_build_and_serve_without_gradio_installed(tiny_llama_dir, tmp_path):
    done = subprocess.run([sys.executable, "-c", WITHOUT_GRADIO, str(tiny_llama_dir), str(tmp_path / "logs")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**dict(__import__("os").environ), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SERVED" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout
    assert int(done.stdout.split("SERVED")[1].split()[0]) >= 1


def test_starting_engine_waits_a_bounded_time_then_says_the_model_is_still_starting():
    proxy = startup.StartingEngine(ModelSpec("somewhere", name="Slow"), wait_s=0.2)
    proxy.set_status("loading weights (1 of 2 models)")
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"Slow is still starting \(loading weights \(1 of 2 models\)\)"):
        proxy.prepare([{"role": "user", "content": "hi"}], GREEDY)
    assert 0.15 < time.monotonic() - started < 2
    assert dataclasses.is_dataclass(proxy.spec)
