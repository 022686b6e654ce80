"""Settings (vicuna_demo/config.py): model spec syntax, VICUNA_DEMO_* variables against flags, and
``python app.py --help`` listing every flag under its group with its environment variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vicuna_demo.config import (_GROUPS, _OPTIONS, ConfigError, EndpointSpec, ModelSpec, Settings,
                                default_model_specs, env_name, load_settings)

REPO = Path(__file__).resolve().parent.parent


# -- model specs ------------------------------------------------------------------------------------

def test_model_spec_with_every_option():
    spec = ModelSpec.parse("lmsys/vicuna-7b-v1.5, name=Vicuna-7B, template=vicuna_v1.1, dtype=float16, 8bit, "
                           "device=cuda:1, ctx=2048")
    assert spec == ModelSpec(source="lmsys/vicuna-7b-v1.5", name="Vicuna-7B", template="vicuna_v1.1",
                             dtype="float16", load_8bit=True, device="cuda:1", context_window=2048)
    assert spec.display_name == "Vicuna-7B"


def test_model_spec_source_alone_takes_the_defaults_given():
    assert ModelSpec.parse("embedded") == ModelSpec("embedded")
    spec = ModelSpec.parse("./models/vicuna", default_8bit=True, default_device="cpu")
    assert spec.load_8bit and spec.device == "cpu"
    assert not ModelSpec.parse("./models/vicuna,fp16", default_8bit=True).load_8bit  # per-model override


@pytest.mark.parametrize("source,name", [
    ("lmsys/vicuna-7b-v1.5", "vicuna-7b-v1.5"),
    ("/srv/models/vicuna-13b/", "vicuna-13b"),
    ("~/gguf/smol.Q4_0.gguf", "smol.Q4_0"),
    ("embedded", "SmolLM2-135M (offline)"),
])
def test_model_display_name_comes_from_the_source(source, name):
    assert ModelSpec.parse(source).display_name == name


@pytest.mark.parametrize("text,fragment", [
    ("", "must start with"),
    (",name=x", "must start with"),
    ("embedded,ctx=lots", "cannot read 'ctx=lots'"),
    ("embedded,ctx=0", "cannot read 'ctx=0'"),
    ("embedded,colour=blue", "cannot read 'colour=blue'"),
    ("embedded,name=", "cannot read 'name='"),
    ("embedded,8bit=yes", "cannot read '8bit=yes'"),
])
def test_unreadable_model_spec_says_which_part_and_shows_an_example(text, fragment):
    with pytest.raises(ConfigError) as info:
        ModelSpec.parse(text)
    assert fragment in str(info.value)
    assert "--model" in str(info.value)


def test_endpoint_spec_parses_and_never_takes_a_key_inline():
    spec = EndpointSpec.parse("name=Big,base_url=http://gpu:8000/v1,model=meta/llama,key_env=VLLM_KEY,max_tokens=512")
    assert (spec.name, spec.base_url, spec.model, spec.key_env, spec.max_tokens) == (
        "Big", "http://gpu:8000/v1", "meta/llama", "VLLM_KEY", 512)
    with pytest.raises(ConfigError, match="never put a key on the command line") as info:
        EndpointSpec.parse("name=Big,base_url=http://gpu:8000/v1,model=m,api_key=sk-secret123")
    assert "sk-secret123" not in str(info.value)
    with pytest.raises(ConfigError, match="missing model"):
        EndpointSpec.parse("name=Big,base_url=http://gpu:8000/v1")


# -- flags and variables ----------------------------------------------------------------------------------

def test_defaults_without_flags_or_variables():
    settings = load_settings([], environ={})
    assert settings == Settings()
    assert settings.temperature == 0.7 and settings.top_p == 1.0 and settings.max_new_tokens == 1024
    assert settings.max_turns == 50 and settings.max_input_chars == 12000


def test_every_option_has_a_distinct_variable_and_a_known_group():
    names = [env_name(opt) for opt in _OPTIONS]
    assert len(set(names)) == len(names)
    assert all(n.startswith("VICUNA_DEMO_") and n.isupper() for n in names)
    assert {opt.group for opt in _OPTIONS} <= set(_GROUPS)
    assert all(hasattr(Settings(), opt.dest) for opt in _OPTIONS)


def test_variables_set_values_and_flags_win_over_them():
    environ = {"VICUNA_DEMO_TEMPERATURE": "0.2", "VICUNA_DEMO_MAX_TURNS": "7", "VICUNA_DEMO_SHARE": "true",
               "VICUNA_DEMO_MODEL": "embedded,name=Small; /srv/vicuna,name=Big,8bit",
               "VICUNA_DEMO_LOG_LEVEL": "DEBUG", "VICUNA_DEMO_WARMUP": "false"}
    settings = load_settings([], environ=environ)
    assert settings.temperature == 0.2 and settings.max_turns == 7 and settings.share is True
    assert [m.display_name for m in settings.models] == ["Small", "Big"]
    assert [m.load_8bit for m in settings.models] == [False, True]
    assert settings.log_level == "DEBUG" and settings.warmup is False

    settings = load_settings(["--temperature", "0.9", "--model", "embedded,name=Flag", "--log-level", "ERROR"],
                             environ=environ)
    assert settings.temperature == 0.9
    assert [m.display_name for m in settings.models] == ["Flag"]  # the flag replaces the variable's list
    assert settings.log_level == "ERROR"
    assert settings.max_turns == 7  # untouched by flags: still the variable's


def test_load_8bit_and_device_apply_to_every_model_unless_the_spec_says_otherwise():
    settings = load_settings(["--load-8bit", "--device", "cpu", "--model", "a/b", "--model", "c/d,fp16,device=cuda:1"],
                             environ={})
    assert [(m.load_8bit, m.device) for m in settings.models] == [(True, "cpu"), (False, "cuda:1")]
    settings = load_settings(["--model", "a/b"], environ={"VICUNA_DEMO_LOAD_8BIT": "1"})
    assert settings.models[0].load_8bit


@pytest.mark.parametrize("variable,value,fragment", [
    ("VICUNA_DEMO_MAX_TURNS", "many", "expected a whole number"),
    ("VICUNA_DEMO_TEMPERATURE", "warm", "expected a number"),
    ("VICUNA_DEMO_SHARE", "perhaps", "expected true or false"),
    ("VICUNA_DEMO_CUDA_GRAPHS", "sometimes", "expected one of auto, on, off"),
    ("VICUNA_DEMO_MODEL", "embedded,colour=blue", "cannot read 'colour=blue'"),
])
def test_bad_variable_value_names_the_variable(variable, value, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings([], environ={variable: value})
    assert fragment in str(info.value)
    if variable != "VICUNA_DEMO_MODEL":
        assert variable in str(info.value)


def test_two_models_with_one_name_are_refused():
    with pytest.raises(ConfigError, match="share the name 'vicuna'"):
        load_settings(["--model", "a/vicuna", "--model", "b/vicuna"], environ={})
    load_settings(["--model", "a/vicuna", "--model", "b/vicuna,name=other"], environ={})


def test_identity_words_and_auth_lists():
    settings = load_settings(["--identity-words", " Vicuna, LLaMA ,,", "--auth", "a:b", "--auth", "c:d"], environ={})
    assert settings.identity_words == ("vicuna", "llama")
    assert settings.auth == ("a:b", "c:d")


def test_default_models_are_vicuna_with_a_gpu_and_the_embedded_one_without():
    settings = load_settings([], environ={})
    assert [m.source for m in default_model_specs(settings, gpu=True)] == ["lmsys/vicuna-7b-v1.5"]
    assert [m.source for m in default_model_specs(settings, gpu=False)] == ["embedded"]
    settings = load_settings(["--load-8bit"], environ={})
    assert default_model_specs(settings, gpu=True)[0].load_8bit
    settings = load_settings(["--model", "x/y"], environ={})
    assert [m.source for m in default_model_specs(settings, gpu=True)] == ["x/y"]


# -- --help ---------------------------------------------------------------------------------------------------

def test_help_lists_every_flag_in_its_group_with_its_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_")}
    env["COLUMNS"] = "120"
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    headings = {group: text.index(f" {group}: --") for group in _GROUPS}
    assert list(headings.values()) == sorted(headings.values())  # groups in their order
    ends = dict(zip(_GROUPS, [headings[g] for g in _GROUPS[1:]] + [len(text)]))
    for opt in _OPTIONS:
        at = text.index(f"[env: {env_name(opt)}]")
        assert headings[opt.group] < at < ends[opt.group], f"{opt.flag} is not under '{opt.group}'"
        flag_at = text.rindex(f" {opt.flag}", headings[opt.group], at)
        assert flag_at > headings[opt.group]
        for choice in opt.choices:
            assert choice in text[flag_at:at]
    assert "OPENAI_API_KEY" in text and "HF_TOKEN" in text


# -- numeric ranges -------------------------------------------------------------------------------------------

def test_every_numeric_flag_declares_the_range_it_accepts():
    numeric = [opt for opt in _OPTIONS if opt.kind in ("int", "float")]
    assert len(numeric) >= 15
    assert [opt.flag for opt in numeric if opt.low is None and opt.high is None] == []


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "5"], "--temperature 5: must be from 0 to 1."),
    (["--temperature", "-0.1"], "--temperature -0.1: must be from 0 to 1."),
    (["--temperature", "nan"], "--temperature nan: must be from 0 to 1."),
    (["--top-p", "0"], "--top-p 0: must be more than 0 and up to 1."),
    (["--top-p", "1.5"], "--top-p 1.5: must be more than 0 and up to 1."),
    (["--max-new-tokens", "4096"], "--max-new-tokens 4096: the default reply length cannot exceed "
                                   "--max-new-tokens-limit (2048)."),
    (["--max-new-tokens", "8"], "--max-new-tokens 8: must be at least 16."),
    (["--max-new-tokens-limit", "512", "--max-new-tokens", "1024"],
     "--max-new-tokens 1024: the default reply length cannot exceed --max-new-tokens-limit (512)."),
    (["--repetition-penalty", "0.9"], "--repetition-penalty 0.9: must be from 1 to 2."),
    (["--repetition-penalty", "2.5"], "--repetition-penalty 2.5: must be from 1 to 2."),
    (["--port", "0"], "--port 0: must be from 1 to 65535."),
    (["--port", "65536"], "--port 65536: must be from 1 to 65535."),
    (["--concurrency", "0"], "--concurrency 0: must be at least 1."),
    (["--max-queue", "0"], "--max-queue 0: must be at least 1."),
    (["--max-batch-requests", "0"], "--max-batch-requests 0: must be at least 1."),
    (["--compile-level", "4"], "--compile-level 4: must be from 0 to 3."),
    (["--moderation-timeout", "0"], "--moderation-timeout 0: must be more than 0."),
    (["--moderation-retries", "-1"], "--moderation-retries -1: must be at least 0."),
    (["--max-input-chars", "0"], "--max-input-chars 0: must be at least 1."),
    (["--max-turns", "0"], "--max-turns 0: must be at least 1."),
    (["--rate-limit", "-5"], "--rate-limit -5: must be at least 0."),
    (["--hf-push-minutes", "0"], "--hf-push-minutes 0: must be more than 0."),
    (["--min-battles", "-1"], "--min-battles -1: must be at least 0."),
])
def test_out_of_range_numbers_are_refused_naming_the_flag_and_the_range(argv, message):
    with pytest.raises(ConfigError) as info:
        load_settings(argv, environ={})
    assert str(info.value) == message


def test_range_limits_themselves_are_accepted():
    settings = load_settings(["--temperature", "0", "--top-p", "1", "--port", "65535", "--rate-limit", "0",
                              "--min-battles", "0", "--max-new-tokens", "2048", "--compile-level", "3",
                              "--moderation-retries", "0", "--concurrency", "1"], environ={})
    assert (settings.temperature, settings.top_p, settings.port, settings.min_battles) == (0.0, 1.0, 65535, 0)
    settings = load_settings(["--max-new-tokens-limit", "256", "--max-new-tokens", "256"], environ={})
    assert settings.max_new_tokens == settings.max_new_tokens_limit == 256


def test_sampling_flags_are_only_those_the_user_gave_by_flag_or_variable():
    """A flag the user gave wins over each model's own defaults; one left out does not (issue 15), even when the
    value given equals the built-in one. A lower limit alone caps the reply length instead of refusing."""
    assert load_settings([], environ={}).sampling_flags() == {}
    settings = load_settings(["--temperature", "0.7", "--repetition-penalty", "1.2"],
                             environ={"VICUNA_DEMO_TOP_P": "0.5"})
    assert settings.sampling_flags() == {"temperature": 0.7, "top_p": 0.5, "repetition_penalty": 1.2}
    assert {"temperature", "top_p", "repetition_penalty"} <= settings.given and "max_new_tokens" not in settings.given
    settings = load_settings(["--max-new-tokens-limit", "512"], environ={})
    assert settings.max_new_tokens == 512 and settings.sampling_flags() == {}


def test_an_out_of_range_variable_is_named_as_the_variable():
    with pytest.raises(ConfigError) as info:
        load_settings([], environ={"VICUNA_DEMO_TEMPERATURE": "3"})
    assert str(info.value) == "VICUNA_DEMO_TEMPERATURE=3: must be from 0 to 1."
    assert load_settings(["--temperature", "0.5"], environ={"VICUNA_DEMO_TEMPERATURE": "3"}).temperature == 0.5


def test_the_app_refuses_a_bad_number_with_one_error_line_before_loading_anything():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_")}
    result = subprocess.run([sys.executable, "app.py", "--temperature", "5"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: --temperature 5: must be from 0 to 1.\n"


# -- --help wrapping -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns", ["60", "80", "120"])
def test_help_never_splits_a_word_across_lines(columns):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_")}
    env["COLUMNS"] = columns
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = set(result.stdout.split())
    for opt in _OPTIONS:
        for word in opt.help.split():
            # a word may be broken only after one of its commas, and each comma-piece stays whole
            pieces = word.split(",") if len(word) > int(columns) // 2 else [word]
            for piece in filter(None, pieces):
                assert any(piece in token for token in printed), f"{opt.flag}: {piece!r} was split ({columns} cols)"
    assert "bas" not in printed and "hugging" not in printed


# -- a malformed command line: one line, not argparse's usage dump ---------------------------------------------

@pytest.mark.parametrize("argv, fragment", [(["--port", "abc"], "argument --port: invalid int value: 'abc'"),
                                            (["--bogus"], "unrecognized arguments: --bogus")])
def test_a_malformed_flag_gets_one_error_line_pointing_at_help_and_status_2(argv, fragment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_")}
    result = subprocess.run([sys.executable, "app.py", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {fragment}") and "python app.py --help" in lines[0]
    assert "usage:" not in result.stderr


def test_an_unknown_judge_is_refused_in_one_line_before_any_model_loads():
    """Without --model the judge is checked against the default model too (the embedded one here), at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICUNA_DEMO_")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "app.py", "--judge", "Nobody", "--moderation", "off"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2   # as every other setting that cannot be used
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: --judge 'Nobody': no --model or --endpoint has that name; the models are: SmolLM2-135M (offline). "
        "Give the judge's spec a name= and pass that name."]


def test_check_judge_accepts_a_model_an_endpoint_or_no_judge():
    from vicuna_demo.config import check_judge
    specs = (ModelSpec("someone/model", name="Local"),)
    check_judge(load_settings([], environ={}), specs)
    check_judge(load_settings(["--judge", "Local"], environ={}), specs)
    ends = load_settings(["--endpoint", "name=J,base_url=http://127.0.0.1:9/v1,model=m", "--judge", "J"], environ={})
    check_judge(ends, ())
    with pytest.raises(ConfigError, match="--judge 'Local': no --model"):
        check_judge(load_settings(["--judge", "Local"], environ={}), ())


def test_database_uri_comes_from_the_flag_or_the_variable_and_never_shows_in_settings():
    assert load_settings(["--database", "postgresql://demo@db.internal/arena"], environ={}).database == \
        "postgresql://demo@db.internal/arena"
    secret = "postgresql://demo:s3cret@db.internal/arena"
    settings = load_settings([], environ={"VICUNA_DEMO_DATABASE": secret})
    assert settings.database == secret and "s3cret" not in repr(settings)
    assert load_settings([], environ={}).database is None


def test_a_database_password_on_the_command_line_is_refused_with_where_to_put_it():
    with pytest.raises(ConfigError, match="PGPASSWORD") as caught:
        load_settings(["--database", "postgresql://demo:s3cret@db.internal/arena"], environ={})
    assert "s3cret" not in str(caught.value)
    with pytest.raises(ConfigError, match="postgresql://"):
        load_settings(["--database", "mysql://demo@db/arena"], environ={})


def test_a_dataset_push_with_a_database_is_refused_saying_why():
    with pytest.raises(ConfigError, match="pg_dump"):
        load_settings(["--database", "postgresql://demo@db/arena", "--hf-dataset", "me/logs"], environ={})
