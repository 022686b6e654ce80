"""The "📋 Evaluate" tab: two models answer a question set, the judge compares (or grades) the answers.

The visitor picks Model A, Model B and the mode, and optionally uploads a question file in FastChat's
format (without one, the built-in set of ``evaluation/questions.jsonl``). ``JudgeService.evaluate``
does the work: every question is checked by the app's moderator first, answers are generated with a
bounded share of each engine's batch (visitors' chats keep the rest), then the judge asks both
answer orders. Mode "answers only" generates the answers and judges nothing: the one mode of an app
without a judge (which takes no uploads, so it answers the built-in questions). One evaluation runs at
a time per app; a second visitor is told to wait. Before the run, a line under the choices says how long
the answers will take (``JudgeService.estimate``, from the speeds measured in this app); the token
slider starts at the models' own default when it is shorter (a model on a CPU). The page shows one
progress bar (answers, then judgments), the per-category table (answers only: per model, its answers'
lengths), a plot and a zip of the FastChat-compatible outputs. ⏹ Stop cancels the run in the service
(every request in flight is cancelled on its engine, the one-evaluation slot is freed) and the page shows
what was done, in the same formats; leaving the page closes the event, which cancels the run too.

API name (gradio_client): ``/evaluate(model_a, model_b, mode, question_file, max_new_tokens) ->
(status, summary, table, plot, archive)``; ``/evaluate_stop() -> status`` stops the caller's own run;
``/evaluate_estimate(model_a, model_b, mode, question_file, max_new_tokens) -> text``.
"""

from __future__ import annotations

import gradio as gr

from ..services.chat import ChatService
from ..services.judge import EvaluationBusy, JudgeService, QuestionFileError

NONE = "(none)"
MODES = [("pairwise (A vs B, both answer orders)", "pairwise"), ("single (grade each answer 1-10)", "single"),
         ("answers only (no judge: the answers, to read or download)", "answers")]


def _pairwise_text(summary: dict) -> str:
    return (f"**{summary['a']}** wins {summary['a_wins']} · **{summary['b']}** wins {summary['b_wins']} · "
            f"ties {summary['ties']} · no verdict {summary['no_verdict']} — over {summary['games']} judged turns "
            f"of {summary['questions']} questions. {summary['orders_disagree']} of the ties are rounds where the two "
            "answer orders disagreed (a verdict counts only when both orders agree).")


def summary_markdown(summary: dict) -> str:
    if summary["mode"] == "answers":
        text = "\n".join(f"- **{m}**: {r['answers']} complete answers of {summary['questions']} questions" +
                         (f", {r['tokens_mean']:g} tokens on average" if r["tokens_mean"] is not None else "") +
                         (f", {r['cut_at_limit']} cut at the token limit" if r["cut_at_limit"] else "")
                         for m, r in summary["models"].items())
        judge = "Answers only: nothing was judged."
    else:
        text = _pairwise_text(summary) if summary["mode"] == "pairwise" else "\n".join(
            f"- **{m}**: " + (f"mean {r['mean']:.2f}" if r["mean"] is not None else "no grades") +
            (f" (95% interval {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if r["ci95"] else "") +
            f" over {r['n']} graded turns; no verdict {r['no_verdict']}" for m, r in summary["models"].items())
        judge = f"Judge: {summary['judge']}."
    problems = "".join(f"\n> ⚠️ {p}" for p in summary["problems"])
    return f"{text}\n\n{judge}{problems}"


def _chosen(a, b, mode) -> str | None:
    """Model B as the run takes it: None for none, or for the same model as A outside pairwise mode."""
    return None if b in (None, "", NONE) or (mode != "pairwise" and b == a) else b


def build_evaluate_tab(service: ChatService, judge: JudgeService, settings, tab: gr.Tab | None = None) -> None:
    """Add the tab's components; the time estimate is drawn again on every choice and (if given) on selecting
    ``tab`` (speeds measured since)."""
    names = service.model_names()
    cap = settings.max_new_tokens_limit
    modes = [(label, value) for label, value in MODES if value in judge.modes()]
    if judge.available:
        gr.Markdown("Answer a question set with two models and let the judge model compare the answers, as in "
                    "MT-Bench: each answer pair is judged twice with the order swapped, and a verdict counts only "
                    "when both orders agree; or only generate the answers. See docs/evaluation.md for the method "
                    "and its known biases.")
        gr.Markdown(f"Judge: **{judge.judge}**. One evaluation runs at a time in this app.")
    else:
        gr.Markdown(f"### ⚖️ No judge\n{judge.unavailable_reason()} Here the models can answer the built-in "
                    f"{judge.builtin_size()} questions (answers only), to read and download in FastChat's format. "
                    "One evaluation runs at a time in this app.", elem_id="evaluate-unavailable")
    first = (names[0], names[1 % len(names)] if len(names) > 1 and judge.available else NONE, modes[0][1])
    with gr.Row():
        model_a = gr.Dropdown(names, value=first[0], label="Model A", elem_id="evaluate-model-a")
        model_b = gr.Dropdown(names + [NONE], value=first[1], label="Model B", elem_id="evaluate-model-b")
        mode = gr.Radio(modes, value=first[2], label="Mode", elem_id="evaluate-mode")
    with gr.Row():
        # without a judge the app takes no uploads (app.launch_kwargs), so there is no file to offer
        questions = gr.File(label=f"Question file (FastChat JSONL; empty = the built-in {judge.builtin_size()} "
                                  "questions)", file_types=[".jsonl", ".json", ".txt"], type="filepath",
                            elem_id="evaluate-questions", visible=judge.available)
        # the models' own reply length when shorter (a model on a CPU): minutes, not an hour
        default_tokens = min(judge.answer_tokens([first[0], _chosen(*first)]), cap)
        max_tokens = gr.Slider(16, cap, value=default_tokens, step=16, label="Max tokens per answer",
                               elem_id="evaluate-max-tokens")

    def tokens_of(value) -> int:
        try:
            return int(min(max(float(value), 16), cap))
        except (TypeError, ValueError):
            return default_tokens

    def estimate_text(a, b, which, path, tokens) -> str:
        b = _chosen(a, b, which)
        if which == "pairwise" and (b is None or b == a):
            return "Pairwise evaluation needs two different models: pick Model B."
        try:
            asked = judge.question_set(path)
        except QuestionFileError as exc:
            return f"This question file cannot be used: {exc}"
        return judge.estimate(asked, a, b, mode=which, max_new_tokens=tokens_of(tokens)).text

    # drawn at each page load (speeds measured since), then at each choice
    estimate = gr.Markdown(lambda: estimate_text(*first, None, default_tokens),
                           elem_id="evaluate-estimate")
    with gr.Row():
        run = gr.Button("▶️ Evaluate", variant="primary", elem_id="evaluate-run")
        stop = gr.Button("⏹ Stop", variant="stop", elem_id="evaluate-stop")
    status = gr.Markdown(elem_id="evaluate-status")
    summary = gr.Markdown(elem_id="evaluate-summary")
    table = gr.Dataframe(interactive=False, elem_id="evaluate-table")
    plot = gr.Plot(label="Per category", elem_id="evaluate-plot", visible=first[2] != "answers")  # judged runs
    archive = gr.File(label="Outputs (FastChat model_answer / model_judgment + summary.json)",
                      elem_id="evaluate-archive")

    def evaluate(a, b, which, path, tokens, request: gr.Request, progress=gr.Progress()):
        nothing = dict.fromkeys([summary, table, plot, archive], gr.update())
        cleared = {summary: "", table: None, plot: None, archive: None}    # no results of an earlier run
        b = _chosen(a, b, which)
        if which == "pairwise" and (b is None or b == a):
            yield {status: "Pairwise evaluation needs two different models: pick Model B.", **nothing}
            return
        try:
            asked = judge.question_set(path)
        except QuestionFileError as exc:
            yield {status: f"This question file cannot be used: {exc}", **nothing}
            return
        label = {"answers": "Answers", "judgments": "Judgments"}
        try:
            for event in judge.evaluate(asked, a, b, mode=which, max_new_tokens=tokens_of(tokens),
                                        owner=getattr(request, "session_hash", None)):
                if event.stage != "done":
                    text = f"{label[event.stage]}: {event.done}/{event.total}"
                    progress((event.done, event.total or 1), desc=text)
                    yield {status: f"⏳ {text}", **cleared}
                    cleared = nothing
                    continue
                headers, rows = event.table()
                note = judge.self_judging_note(a, *([b] if b else [])) if which != "answers" else ""
                yield {status: "✅ Done." if not event.result.cancelled else f"⏹ Stopped: {event.done_line()}",
                       summary: summary_markdown(event.summary) + (f"\n\n> ⚠️ {note}" if note else ""),
                       table: {"headers": headers, "data": rows},
                       plot: gr.Plot(event.figure() if which != "answers" else None, visible=which != "answers"),
                       archive: str(event.archive)}
        except (EvaluationBusy, ValueError) as exc:
            yield {status: str(exc), **nothing}

    choices = [model_a, model_b, mode, questions, max_tokens]
    outputs = [status, summary, table, plot, archive]
    # Stop does not cancel this event: the service ends the run, and the event shows what was done
    running = run.click(evaluate, choices, outputs, api_name="evaluate", concurrency_id="evaluate",
                        concurrency_limit=2, show_progress_on=[status])  # one progress bar, not one per output
    estimating = dict(fn=estimate_text, inputs=choices, outputs=[estimate], show_progress="hidden", queue=False)
    max_tokens.change(**estimating, api_name="evaluate_estimate")
    for changed in (model_a.change, model_b.change, mode.change, questions.change, running.then,
                    *([tab.select] if tab is not None else [])):   # a choice, or a speed measured since
        changed(**estimating, api_name=False)

    def stop_evaluation(request: gr.Request):
        stopped = judge.stop_evaluation(getattr(request, "session_hash", None))
        return {status: "⏹ Stopped: the requests in flight were cancelled; what was done follows." if stopped
                else gr.update()}

    # the service stops the run at once (its engines' requests are cancelled, the slot is freed); the run's event
    # then shows and offers what was done
    stop.click(stop_evaluation, None, [status], api_name="evaluate_stop", queue=False)
