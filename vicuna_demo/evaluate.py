"""Evaluate two or more models on a question set with an LLM judge, from the command line.

    python -m vicuna_demo.evaluate --model lmsys/vicuna-7b-v1.5 --model lmsys/vicuna-13b-v1.5 \\
        --endpoint name=GPT-4o,base_url=https://api.openai.com/v1,model=gpt-4o,key_env=OPENAI_API_KEY \\
        --judge GPT-4o --a vicuna-7b-v1.5 --b vicuna-13b-v1.5 --questions question.jsonl --out results/
    python -m vicuna_demo.evaluate ... --mode single --a vicuna-7b-v1.5 --json
    python -m vicuna_demo.evaluate ... --models A,B,C [--pairs all | --baseline C] --out results/

Takes every flag of ``app.py`` (models, endpoints, engine, generation defaults...) plus the
evaluation flags below; models load exactly as the app loads them, and every answer is submitted
at once so the engines batch them. Without ``--questions`` the built-in set is used. The output
folder gets FastChat's ``model_answer`` / ``model_judgment`` files and ``summary.json`` (see
``evaluation/outputs.py``); the summary is printed (``--json``: as one JSON object). The question
file is the operator's own, so it is trusted: it is not sent to the moderation service (the app's
📋 Evaluate tab moderates questions, since visitors choose them there). Nothing is written to the
app's conversation log.

Exit status: 0 when every answer and judgment succeeded; 1 when a model failed to load, or anything
failed (an answer missing, a judge request failing after its retries, a cancelled run: stderr says how
many; the files keep what succeeded) or no judgment gave a verdict; 2 for a bad flag or question file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Sequence

from .config import ConfigError, build_parser, default_model_specs, load_settings
from .evaluation.outputs import answer_file

DEFAULT_JUDGE_TOKENS = 1024


def _add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--a", dest="eval_a", metavar="NAME", help="The first model to evaluate (its name).")
    group.add_argument("--b", dest="eval_b", metavar="NAME",
                       help="The second model (pairwise: required; single: optional, graded too).")
    group.add_argument("--models", dest="eval_models", metavar="A,B,...",
                       help="Evaluate two or more models (comma-separated names) instead of --a/--b: pairwise judges "
                            "every pair (--pairs all) or each against --baseline; each model answers once.")
    group.add_argument("--pairs", dest="eval_pairs", choices=("all", "baseline"),
                       help="Pairwise with --models: all = every pair (FastChat's pairwise-all; the default), "
                            "baseline = each model against --baseline (FastChat's pairwise-baseline, Arena-Hard).")
    group.add_argument("--baseline", dest="eval_baseline", metavar="NAME",
                       help="The model every other one is compared with (implies --pairs baseline; added to "
                            "--models if missing).")
    group.add_argument("--questions", dest="eval_questions", metavar="FILE",
                       help="Question file in FastChat's format (JSONL). Default: the built-in set.")
    group.add_argument("--out", dest="eval_out", metavar="DIR", help="Folder for the answers, judgments and summary.")
    group.add_argument("--mode", dest="eval_mode", choices=("pairwise", "single", "answers"), default="pairwise",
                       help="pairwise: A against B, both answer orders (default); single: grade each answer 1-10; "
                            "answers: only generate the answers (no judge needed: on a CPU, or to judge later with "
                            "--answers).")
    group.add_argument("--judge-prompts", dest="eval_judge_prompts", metavar="FILE",
                       help="Judge with FastChat's judge_prompts.jsonl (its pair-v2, pair-math-v1, single-v1 ... by "
                            "name, filled and parsed by FastChat's rules) instead of this project's own prompts.")
    group.add_argument("--answers", dest="eval_answers", metavar="DIR",
                       help="Judge existing answers: a FastChat benchmark folder (DIR/model_answer/<model>.jsonl, ours "
                            "or FastChat's). A model whose answers are all there needs no --model or --endpoint; "
                            "missing answers are generated.")
    group.add_argument("--reference", dest="eval_reference", metavar="FILE",
                       help="Reference answers in FastChat's format (e.g. data/mt_bench/reference_answer/gpt-4.jsonl), "
                            "shown to the judge for math, reasoning and coding questions as MT-Bench does (both turns' "
                            "on turn 2). Default: the question file's own reference fields, for those categories.")
    group.add_argument("--json", dest="eval_json", action="store_true", help="Print the summary as one JSON object.")


def build_evaluate_parser() -> argparse.ArgumentParser:
    """app.py's parser (every model, engine and generation flag) with the evaluation flags added."""
    parser = build_parser()
    parser.prog = "python -m vicuna_demo.evaluate"
    parser.description = ("Answer a question set with two models (or one) on the app's engines and have a judge model "
                          "compare (pairwise) or grade (single) the answers; writes FastChat-compatible outputs.")
    _add_evaluation_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, object]:
    """-> (evaluation flags, Settings). Raises ConfigError; argparse exits (2) on malformed flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    build_evaluate_parser().parse_args(argv)          # --help, unknown flags, bad choices
    only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_evaluation_flags(only)
    flags, rest = only.parse_known_args(argv)
    settings = load_settings(rest)
    if not settings.judge and flags.eval_mode != "answers":
        raise ConfigError("--judge NAME is required: the name of the --model or --endpoint that judges the answers "
                          "(or pass --mode answers to generate the answers only).")
    flags.models, flags.model_pairs = chosen_models(flags)
    if not flags.eval_out:
        raise ConfigError("--out DIR is required.")
    names = [m.display_name for m in settings.models] + [e.name for e in settings.endpoints]
    if flags.eval_answers and not Path(flags.eval_answers).is_dir():
        raise ConfigError(f"--answers {flags.eval_answers}: not a folder (a FastChat benchmark folder with "
                          "model_answer/<model>.jsonl).")
    for flag, name in model_flags(flags):
        if name and flags.eval_answers and answer_file(flags.eval_answers, name).is_file():
            continue
        if name and names and name not in names:
            raise ConfigError(f"{flag} {name!r}: no --model or --endpoint has that name; the models are: "
                              f"{', '.join(names)}.")
    # the command line keeps no conversation log and pushes nothing
    return flags, dataclasses.replace(settings, log_dir="", hf_dataset=None)


def chosen_models(flags) -> tuple[list[str], list[tuple[str, str]] | None]:
    """(the models to evaluate, the (A, B) pairs to judge or None outside pairwise) from --a/--b or --models,
    --pairs and --baseline. Raises ConfigError."""
    from .evaluation.runner import model_pairs
    if flags.eval_models and (flags.eval_a or flags.eval_b):
        raise ConfigError("pass either --a/--b or --models, not both.")
    if flags.eval_models:
        models = [m.strip() for m in flags.eval_models.split(",") if m.strip()]
        repeated = sorted({m for m in models if models.count(m) > 1})
        if repeated:
            raise ConfigError(f"--models names {', '.join(repeated)} more than once.")
    else:
        if not flags.eval_a:
            raise ConfigError("--a NAME (and --b NAME in pairwise mode), or --models A,B,..., is required.")
        if flags.eval_b and flags.eval_a == flags.eval_b:
            raise ConfigError(f"--a and --b are both {flags.eval_a!r}: compare two different models.")
        models = [m for m in (flags.eval_a, flags.eval_b) if m]
    how = flags.eval_pairs or ("baseline" if flags.eval_baseline else "all")
    if how == "baseline" and not flags.eval_baseline:
        raise ConfigError("--pairs baseline needs --baseline NAME.")
    if flags.eval_baseline and how != "baseline":
        raise ConfigError("--baseline compares each model with one model: it cannot go with --pairs all.")
    if flags.eval_baseline and flags.eval_baseline not in models:
        models.append(flags.eval_baseline)
    if flags.eval_mode != "pairwise":
        if flags.eval_pairs or flags.eval_baseline:
            raise ConfigError("--pairs and --baseline choose what pairwise mode compares: drop them with "
                              f"--mode {flags.eval_mode} (list the models in --models).")
        return models, None
    if len(models) < 2:
        raise ConfigError("pairwise mode compares two or more models: --a NAME --b NAME, or --models A,B,... "
                          "(or pass --mode single).")
    return models, model_pairs(models, how, flags.eval_baseline)


def model_flags(flags) -> list[tuple[str, str]]:
    """(flag, model name) for error messages: ("--a", A), ("--b", B), or ("--models", each name)."""
    if flags.eval_models or not flags.eval_a:
        return [("--baseline" if m == flags.eval_baseline else "--models", m) for m in flags.models]
    return [(flag, name) for flag, name in (("--a", flags.eval_a), ("--b", flags.eval_b),
                                            ("--baseline", flags.eval_baseline)) if name]


def main(argv: Sequence[str] | None = None) -> int:
    from .evaluation.questions import QuestionFileError, builtin_questions, load_questions
    try:
        flags, settings = parse_args(argv)
        questions = load_questions(flags.eval_questions) if flags.eval_questions else builtin_questions()
        judge_prompts = None
        if flags.eval_judge_prompts:
            from .evaluation.prompts import JudgePromptsError, load_judge_prompts
            try:
                judge_prompts = load_judge_prompts(flags.eval_judge_prompts)
            except JudgePromptsError as exc:
                raise ConfigError(f"--judge-prompts: {exc}.") from None
        references = None
        if flags.eval_reference:
            from .evaluation.outputs import read_references
            try:
                references = read_references(flags.eval_reference)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--reference: {exc}.") from None
    except (ConfigError, QuestionFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from .evaluation.outputs import format_summary, summarize, write_outputs
    from .evaluation.runner import JUDGE_PARAMS, EvaluationRunner
    from .loading import LoadError, check_spec, cuda_available
    from .services.runtime import build_runtime
    try:
        for spec in default_model_specs(settings, gpu=cuda_available()):
            check_spec(spec)
        runtime = build_runtime(settings)
    except (LoadError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    models = flags.models
    reuse_answers = earlier_answers(flags, models, questions)
    reuse_judgments = earlier_judgments(flags, settings.judge, questions) if settings.judge else {}
    try:
        for flag, name in model_flags(flags):
            complete = len([a for a in reuse_answers.get(name, {}).values() if a.complete]) == len(questions)
            if name not in runtime.service.engines and not complete:
                print(f"error: {flag} {name!r}: no model has that name; the models are: "
                      f"{', '.join(runtime.service.engines)}.", file=sys.stderr)
                return 2
        # each model's recommended sampling (its generation_config.json, repetition penalty included) with the
        # flags given over it: what the chat tab starts from
        answer_params = {m: runtime.service.defaults_for(m) for m in models if m in runtime.service.engines}
        judge_params = dataclasses.replace(JUDGE_PARAMS, max_new_tokens=min(DEFAULT_JUDGE_TOKENS,
                                                                            settings.max_new_tokens_limit))
        runner = EvaluationRunner(runtime.service.engines, judge=settings.judge, answer_params=answer_params,
                                  judge_params=judge_params, references=references, judge_prompts=judge_prompts)
        last: dict = {}

        def progress(stage: str, done: int, total: int) -> None:
            step = max(1, total // 10)
            if done == total or done % step == 0 and last.get(stage) != done:
                last[stage] = done
                print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

        result, interrupted = run_until_done_or_interrupted(
            runner, lambda: runner.run(questions, *models, mode=flags.eval_mode, pairs=flags.model_pairs,
                                       progress=progress, reuse_answers=reuse_answers,
                                       reuse_judgments=reuse_judgments))
    finally:
        runtime.close()
    summary = summarize(result)
    try:
        paths = write_outputs(result, flags.eval_out, summary)
    except OSError as exc:
        print(f"error: cannot write the outputs to {flags.eval_out}: {exc}", file=sys.stderr)
        return 1
    if flags.eval_json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(format_summary(summary))
        print(f"Outputs: {', '.join(str(p) for p in paths)}")
    if interrupted:
        print("Interrupted: what was done is written; run the same command again to compute only what is missing.",
              file=sys.stderr)
        return 130
    return exit_status(result)


def earlier_answers(flags, models: list[str], questions) -> dict:
    """model -> question_id -> Answer from --answers DIR, then from --out (an earlier run of this command,
    whose complete answers win): what a rerun need not generate again."""
    from .evaluation.outputs import read_answers
    found: dict = {model: {} for model in models}
    for folder in (flags.eval_answers, flags.eval_out):
        if folder and Path(folder).is_dir():
            for model in models:
                for qid, answer in read_answers(folder, model, questions).items():
                    if answer.complete or qid not in found[model]:
                        found[model][qid] = answer
    return found


def earlier_judgments(flags, judge: str, questions) -> dict:
    """Judgment.key -> Judgment of an earlier run into the same --out (same judge and mode)."""
    from .evaluation.outputs import read_judgments
    if not Path(flags.eval_out).is_dir():
        return {}
    return read_judgments(flags.eval_out, judge, flags.eval_mode, questions)


def run_until_done_or_interrupted(runner, work) -> tuple[object, bool]:
    """Run ``work()`` (the evaluation) in a thread; Ctrl-C cancels the runner, whose result then holds what
    was done. -> (result, interrupted)."""
    outcome: dict = {}
    finished = threading.Event()  # not Thread.join: a join interrupted by Ctrl-C can report a live thread dead

    def target():
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=target, name="evaluation", daemon=True).start()
    interrupted = False
    while not finished.is_set():
        try:
            finished.wait(0.2)
        except KeyboardInterrupt:
            if not interrupted:
                print("\nStopping: cancelling the requests in flight and writing what is done ...", file=sys.stderr,
                      flush=True)
            interrupted = True
            runner.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], interrupted


def exit_status(result) -> int:
    """0 when everything was answered and judged; 1 when anything failed (a missing answer, a failed or
    timed-out judge request, a cancelled run) or no judgment gave a verdict. The files keep what succeeded."""
    failed = failures(result)
    if failed:
        print(f"error: the evaluation is incomplete: {failed}. The outputs keep everything that succeeded.",
              file=sys.stderr)
        return 1
    if result.mode != "answers" and not any(j.outcome != "no_verdict" for j in result.judgments):
        print("error: no judgment gave a verdict.", file=sys.stderr)
        return 1
    return 0


def failures(result) -> str:
    """'' or what failed, counted: "3 of 160 answers missing, 2 of 80 judgments failed"."""
    answers = [a for by_question in result.answers.values() for a in by_question.values()]
    missing = sum(1 for a in answers if not a.complete)
    judged = sum(1 for j in result.judgments if j.error)
    parts = [f"{missing} of {len(answers)} answers missing"] if missing else []
    parts += [f"{judged} of {len(result.judgments)} judgments failed"] if judged else []
    parts += ["the run was cancelled"] if result.cancelled else []
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
