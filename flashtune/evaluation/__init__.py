"""Evaluation: generation over a split (greedy or beam), BLEU / ROUGE-L / NIST, and report folders."""

from flashtune.evaluation.generation import evaluate_generation, generate_texts
from flashtune.evaluation.metrics import corpus_bleu, nist, rouge_l, score_all
from flashtune.evaluation.report import write_json, write_report

__all__ = ["corpus_bleu", "rouge_l", "nist", "score_all", "evaluate_generation", "generate_texts",
           "write_report", "write_json"]
