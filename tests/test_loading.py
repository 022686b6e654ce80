"""Model loading (vicuna_demo/loading.py): what loads, and what a user sees when it cannot.

Every failure a user can cause (a missing path, a folder without config.json, a bad .gguf, an unknown
dtype, device or template, a GPU that is not there, a Hub id while offline, bitsandbytes absent, out
of memory, a corrupt file) must become one ``LoadError`` line that names the model and the fix.
``python app.py`` is run as a subprocess to check the user sees that one line on stderr, a non-zero
exit and no traceback.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vicuna_demo.config import ModelSpec
from vicuna_demo.loading import EMBEDDED_HINT, EMBEDDED_NOTE, LoadError, check_spec, embedded_gguf_path, load_model

REPO = Path(__file__).resolve().parent.parent


def load_error(spec: ModelSpec) -> str:
    with pytest.raises(LoadError) as info:
        load_model(spec)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert f"Model '{spec.display_name}'" in message
    assert len(message) < 400
    return message


# -- what loads ---------------------------------------------------------------------------------------

def test_local_folder_loads_in_fp32_on_cpu_with_its_own_chat_template(tiny_llama_dir):
    loaded = load_model(ModelSpec(str(tiny_llama_dir)))
    assert loaded.name == Path(tiny_llama_dir).name
    assert loaded.device == "cpu" and loaded.dtype == "float32" and not loaded.load_8bit
    assert loaded.model.dtype == torch.float32
    assert loaded.template.name == "chat_template"  # the SmolLM2 tokenizer ships one
    assert loaded.context_window == 512
    assert loaded.tokenizer.eos_token_id in loaded.eos_token_ids
    assert not loaded.embedded


def test_spec_options_choose_name_template_dtype_and_context(tiny_llama_dir):
    spec = ModelSpec.parse(f"{tiny_llama_dir},name=Tiny,template=vicuna_v1.1,dtype=bfloat16,ctx=128,device=cpu")
    loaded = load_model(spec)
    assert loaded.name == "Tiny"
    assert loaded.template.name == "vicuna_v1.1"
    assert loaded.model.dtype == torch.bfloat16 and loaded.dtype == "bfloat16"
    assert loaded.context_window == 128


def test_embedded_model_is_the_smollm2_gguf_with_chatml_and_a_visible_note(embedded_loaded):
    assert embedded_loaded.embedded and embedded_loaded.name == "SmolLM2-135M (offline)"
    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert type(embedded_loaded.model).__name__ == "LlamaForCausalLM"
    assert embedded_loaded.template.name == "chat_template"
    assert "<|im_start|>assistant" in embedded_loaded.template.render([{"role": "user", "content": "Hi"}])
    assert "small offline model" in EMBEDDED_NOTE and "--" not in EMBEDDED_NOTE     # the page's note: visitors
    assert "--model lmsys/vicuna-7b-v1.5" in EMBEDDED_HINT                             # the start-up log: operator


# -- what fails, and how it says so --------------------------------------------------------------------

def test_missing_local_path_names_the_path():
    message = load_error(ModelSpec("/nonexistent/models/vicuna"))
    assert "/nonexistent/models/vicuna does not exist" in message


def test_folder_without_config_json_says_what_to_point_at(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    message = load_error(ModelSpec(str(tmp_path), name="Mine"))
    assert "has no config.json" in message and "save_pretrained" in message and ".gguf" in message


def test_missing_gguf_file_is_named():
    message = load_error(ModelSpec("/tmp/no-such-dir/model.Q4_0.gguf"))
    assert "GGUF file /tmp/no-such-dir/model.Q4_0.gguf does not exist" in message


def test_corrupt_gguf_file_gives_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    message = load_error(ModelSpec(str(bad)))
    assert "broken" in message and "Traceback" not in message


def test_unknown_dtype_lists_the_valid_ones(tiny_llama_dir):
    message = load_error(ModelSpec(str(tiny_llama_dir), dtype="float8"))
    assert "unknown dtype 'float8'" in message and "float16, bfloat16 or float32" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda:1", "cuda", "multi"])
def test_gpu_device_without_a_gpu_says_so(tiny_llama_dir, device):
    message = load_error(ModelSpec(str(tiny_llama_dir), device=device))
    assert f"device={device}" in message
    assert "no CUDA GPU is visible" in message or "needs CUDA GPUs" in message


def test_unknown_device_lists_the_valid_ones(tiny_llama_dir):
    message = load_error(ModelSpec(str(tiny_llama_dir), device="tpu"))
    assert "unknown device 'tpu'" in message and "cuda:N" in message


def test_unknown_template_lists_the_known_ones(tiny_llama_dir):
    message = load_error(ModelSpec(str(tiny_llama_dir), template="alpaca"))
    assert "unknown template 'alpaca'" in message and "vicuna_v1.1" in message


def test_hub_id_while_offline_says_offline_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = load_error(ModelSpec("lmsys/vicuna-7b-v1.5"))
    assert "'lmsys/vicuna-7b-v1.5'" in message
    assert "HF_HUB_OFFLINE" in message and "--model embedded" in message


def test_8bit_without_bitsandbytes_says_how_to_install(tiny_llama_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k))
    message = load_error(ModelSpec(str(tiny_llama_dir), load_8bit=True))
    assert "pip install bitsandbytes" in message


def test_out_of_memory_suggests_8bit_or_another_gpu(tiny_llama_dir, monkeypatch):
    import transformers

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_memory)
    message = load_error(ModelSpec(str(tiny_llama_dir), name="Big"))
    assert "out of memory" in message and "--load-8bit" in message and "device=multi" in message


def test_check_spec_fails_fast_without_loading(tmp_path, monkeypatch):
    check_spec(ModelSpec("embedded"))
    with pytest.raises(LoadError, match="does not exist"):
        check_spec(ModelSpec(str(tmp_path / "gone")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="not in the local Hugging Face cache"):  # offline: no need to try
        check_spec(ModelSpec("someone/not-cached-anywhere", device="cpu"))


# -- a Hub id without network (subprocesses: huggingface_hub reads its cache and endpoint at import) ------

UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def hub_cache_with(tmp_path, repo: str, folder) -> Path:
    """An HF cache (HF_HUB_CACHE layout) holding ``folder``'s files as the main revision of ``repo``."""
    import shutil
    cache = tmp_path / "hub"
    entry = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return cache


def hub_env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OPENAI_API_KEY")}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=UNREACHABLE_HUB, GRADIO_ANALYTICS_ENABLED="False", **extra)
    return env


def test_a_hub_id_without_network_fails_within_seconds_with_one_line(tmp_path):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "app.py", "--model", "lmsys/vicuna-7b-v1.5", "--device", "cpu"],
                            cwd=REPO, env=hub_env(tmp_path / "empty-cache"), capture_output=True, text=True,
                            timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: Model 'vicuna-7b-v1.5': could not load 'lmsys/vicuna-7b-v1.5' (cannot reach http://127.0.0.1:9, "
        "and the model is not in the local Hugging Face cache). Check the network or download it once where there "
        "is one (`hf download lmsys/vicuna-7b-v1.5`); without network, pass a local folder or --model embedded."]
    assert elapsed < 15, f"took {elapsed:.1f} s"  # the Hub client's own retries took ~50 s


LOAD_AND_TIME = """
import sys, time
from vicuna_demo.config import ModelSpec
from vicuna_demo.loading import load_model
start = time.perf_counter()
loaded = load_model(ModelSpec("someone/tiny-llama", device="cpu"))
print(type(loaded.model).__name__, round(time.perf_counter() - start, 1))
"""


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE=1"])
def test_a_cached_hub_model_loads_from_the_cache_without_waiting_for_the_network(tmp_path, tiny_llama_dir, offline):
    cache = hub_cache_with(tmp_path, "someone/tiny-llama", tiny_llama_dir)
    env = hub_env(cache, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    result = subprocess.run([sys.executable, "-c", LOAD_AND_TIME], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    name, seconds = result.stdout.split()
    assert name == "LlamaForCausalLM" and float(seconds) < 15
    assert "Retrying" not in result.stderr


# -- what the user sees ---------------------------------------------------------------------------------

def run_app(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    environ.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("argv,expected", [
    (["--model", "/nonexistent"], "Model 'nonexistent': local path /nonexistent does not exist."),
    (["--model", "embedded,dtype=float8"], "unknown dtype 'float8'"),
    (["--model", "/tmp/nowhere/x.gguf"], "GGUF file /tmp/nowhere/x.gguf does not exist"),
])
def test_app_exits_with_one_clear_line_for_a_bad_model(argv, expected):
    result = run_app(*argv)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_app_exits_with_one_line_for_an_unreadable_spec():
    result = run_app("--model", "embedded,colour=blue")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot read 'colour=blue'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
