"""Evaluation: deterministic ODE sampling of a suite's prompts with a model, scored by the suite's rewards."""

from flowgrpo.eval.runner import SUITES, EvalSettings, SuiteResult, build_suite, evaluate_model

__all__ = ["SUITES", "EvalSettings", "SuiteResult", "build_suite", "evaluate_model"]
