"""Evaluation: deterministic ODE sampling of a suite's prompts with a model, scored by the suite's rewards,
resumable per image, cached per (model, suite, settings), summed up in HTML / Markdown reports.

* :mod:`.suites`   the suites (preset, geneval, drawbench, ocr, pickscore, shapes) and :func:`build_suite`;
* :mod:`.runner`   :class:`Evaluator` (sampling, scoring, resume, cache) and :func:`run_eval` (candidate vs base
  vs champion, gate, reports);
* :mod:`.results`  the per-image JSONL and the aggregation (GenEval per-tag / overall, reward mean and std);
* :mod:`.cache`    model identity and the evaluation cache;
* :mod:`.report`   Markdown and self-contained HTML reports; :mod:`.mlflow_log` logs a run to MLflow;
* :mod:`.cli`      ``flowgrpo eval``; :mod:`.bench` ``flowgrpo bench eval``.
"""

from flowgrpo.eval.runner import (EvalError, EvalRun, EvalSettings, EvalStateError, Evaluator, SuiteResult,
                                  evaluate_model, run_eval)
from flowgrpo.eval.suites import SUITES, Suite, SuiteError, build_suite

__all__ = ["SUITES", "EvalError", "EvalRun", "EvalSettings", "EvalStateError", "Evaluator", "Suite", "SuiteError",
           "SuiteResult", "build_suite", "evaluate_model", "run_eval"]
