"""Question-set evaluation with an LLM judge (MT-Bench's method), on the app's own engines.

- ``questions``: FastChat's question format (JSONL), loaded and checked; ``questions.jsonl`` is the
  built-in set written for this project.
- ``prompts``: the judge prompts (pairwise ``[[A]]/[[B]]/[[C]]``, single ``[[rating]]``).
- ``verdicts``: reading a verdict out of a judge's text; "no verdict" is counted, never guessed.
- ``runner``: every answer submitted at once (the engines batch them), then every judgment.
- ``outputs``: FastChat's ``model_answer`` / ``model_judgment`` JSONL files and the summary.
- ``statistics``: win rates with bootstrap intervals, per-model records, the length-controlled win rate.

``python -m vicuna_demo.evaluate`` is the command line; ``services/judge.py`` the app's side.
"""
