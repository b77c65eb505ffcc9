"""Evaluation: fixed prompt × seed sets, judges, strict accuracy, diversity, KL to base; plots and reports."""

from diffalign.evaluate.evaluation import EvalSet, Evaluation, diversity, evaluate_policy, kl_to_base, weight_drift
from diffalign.evaluate.summary import RunSummary

__all__ = ["EvalSet", "Evaluation", "RunSummary", "diversity", "evaluate_policy", "kl_to_base", "weight_drift"]
