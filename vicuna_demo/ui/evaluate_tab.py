"""The "📋 Evaluate" tab: two models answer a question set, the judge compares (or grades) the answers.

The visitor picks Model A, Model B and the mode, and optionally uploads a question file in FastChat's
format (without one, the built-in set of ``evaluation/questions.jsonl``). ``JudgeService.evaluate``
does the work: every question is checked by the app's moderator first, answers are generated with a
bounded share of each engine's batch (visitors' chats keep the rest), then the judge asks both
answer orders. One evaluation runs at a time per app; a second visitor is told to wait. The page
shows a progress bar (answers, then judgments), the per-category table, a plot and a zip of the
FastChat-compatible outputs. ⏹ Stop cancels the run in the service (every request in flight is cancelled on
its engine, the one-evaluation slot is freed); leaving the page closes the event, which does the same.

API name (gradio_client): ``/evaluate(model_a, model_b, mode, question_file, max_new_tokens) ->
(status, summary, table, plot, archive)``; ``/evaluate_stop() -> status`` stops the caller's own run.
"""

from __future__ import annotations

import gradio as gr

from ..services.chat import ChatService
from ..services.judge import EvaluationBusy, JudgeService, QuestionFileError

NONE = "(none)"
MODES = [("pairwise (A vs B, both answer orders)", "pairwise"), ("single (grade each answer 1-10)", "single")]
DEFAULT_TOKENS = 512


def _pairwise_text(summary: dict) -> str:
    return (f"**{summary['a']}** wins {summary['a_wins']} · **{summary['b']}** wins {summary['b_wins']} · "
            f"ties {summary['ties']} · no verdict {summary['no_verdict']} — over {summary['games']} judged turns "
            f"of {summary['questions']} questions. {summary['orders_disagree']} of the ties are rounds where the two "
            "answer orders disagreed (a verdict counts only when both orders agree).")


def summary_markdown(summary: dict) -> str:
    if summary["mode"] == "pairwise":
        text = _pairwise_text(summary)
    else:
        text = "\n".join(f"- **{m}**: " + (f"mean {r['mean']:.2f}" if r["mean"] is not None else "no grades") +
                         (f" (95% interval {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if r["ci95"] else "") +
                         f" over {r['n']} graded turns; no verdict {r['no_verdict']}"
                         for m, r in summary["models"].items())
    problems = "".join(f"\n> ⚠️ {p}" for p in summary["problems"])
    return f"{text}\n\nJudge: {summary['judge']}.{problems}"


def build_evaluate_tab(service: ChatService, judge: JudgeService, settings) -> None:
    names = service.model_names()
    cap = settings.max_new_tokens_limit
    gr.Markdown("Answer a question set with two models and let the judge model compare the answers, as in "
                "MT-Bench: each answer pair is judged twice with the order swapped, and a verdict counts only when "
                "both orders agree. See docs/evaluation.md for the method and its known biases.")
    if not judge.available:
        gr.Markdown(f"### ⚖️ No judge\n{judge.unavailable_reason()}", elem_id="evaluate-unavailable")
        return
    gr.Markdown(f"Judge: **{judge.judge}**. One evaluation runs at a time in this app.")
    with gr.Row():
        model_a = gr.Dropdown(names, value=names[0], label="Model A", elem_id="evaluate-model-a")
        model_b = gr.Dropdown(names + [NONE], value=names[1 % len(names)] if len(names) > 1 else NONE,
                              label="Model B", elem_id="evaluate-model-b")
        mode = gr.Radio(MODES, value="pairwise", label="Mode", elem_id="evaluate-mode")
    with gr.Row():
        questions = gr.File(label=f"Question file (FastChat JSONL; empty = the built-in {judge.builtin_size()} "
                                  "questions)", file_types=[".jsonl", ".json", ".txt"], type="filepath",
                            elem_id="evaluate-questions")
        max_tokens = gr.Slider(16, cap, value=min(DEFAULT_TOKENS, cap), step=16, label="Max tokens per answer",
                               elem_id="evaluate-max-tokens")
    with gr.Row():
        run = gr.Button("▶️ Evaluate", variant="primary", elem_id="evaluate-run")
        stop = gr.Button("⏹ Stop", variant="stop", elem_id="evaluate-stop")
    status = gr.Markdown(elem_id="evaluate-status")
    summary = gr.Markdown(elem_id="evaluate-summary")
    table = gr.Dataframe(interactive=False, elem_id="evaluate-table")
    plot = gr.Plot(label="Per category", elem_id="evaluate-plot")
    archive = gr.File(label="Outputs (FastChat model_answer / model_judgment + summary.json)",
                      elem_id="evaluate-archive")

    def evaluate(a, b, which, path, tokens, request: gr.Request, progress=gr.Progress()):
        nothing = dict.fromkeys([summary, table, plot, archive], gr.update())
        chosen_mode = which
        b = None if b in (None, "", NONE) or (chosen_mode == "single" and b == a) else b
        if chosen_mode == "pairwise" and (b is None or b == a):
            yield {status: "Pairwise evaluation needs two different models: pick Model B.", **nothing}
            return
        try:
            asked = judge.question_set(path)
        except QuestionFileError as exc:
            yield {status: f"This question file cannot be used: {exc}", **nothing}
            return
        try:
            tokens = int(min(max(float(tokens), 16), cap))
        except (TypeError, ValueError):
            tokens = DEFAULT_TOKENS
        label = {"answers": "Answers", "judgments": "Judgments"}
        cleared = {summary: "", table: None, plot: None, archive: None}    # no results of an earlier run
        try:
            for event in judge.evaluate(asked, a, b, mode=chosen_mode, max_new_tokens=tokens,
                                        owner=getattr(request, "session_hash", None)):
                if event.stage != "done":
                    text = f"{label[event.stage]}: {event.done}/{event.total}"
                    progress((event.done, event.total or 1), desc=text)
                    yield {status: f"⏳ {text}", **cleared}
                    cleared = nothing
                    continue
                headers, rows = event.table()
                note = judge.self_judging_note(a, *([b] if b else []))
                yield {status: "✅ Done." if not event.result.cancelled else "⏹ Stopped.",
                       summary: summary_markdown(event.summary) + (f"\n\n> ⚠️ {note}" if note else ""),
                       table: {"headers": headers, "data": rows}, plot: event.figure(),
                       archive: str(event.archive)}
        except (EvaluationBusy, ValueError) as exc:
            yield {status: str(exc), **nothing}

    outputs = [status, summary, table, plot, archive]
    running = run.click(evaluate, [model_a, model_b, mode, questions, max_tokens], outputs, api_name="evaluate",
                        concurrency_id="evaluate", concurrency_limit=2,
                        show_progress_on=[status])  # one progress bar, not one over every output

    def stop_evaluation(request: gr.Request):
        stopped = judge.stop_evaluation(getattr(request, "session_hash", None))
        return {status: "⏹ Stopped: the requests in flight were cancelled." if stopped else gr.update()}

    # the service stops the run (its engines' requests are cancelled at once, the slot is freed) and the page
    # stops waiting for it
    stop.click(stop_evaluation, None, [status], cancels=[running], api_name="evaluate_stop", queue=False)
