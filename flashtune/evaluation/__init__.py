"""Evaluation: generation over a split (greedy or beam, optionally reranked by slot errors), BLEU / ROUGE-L /
NIST, E2E slot errors, and report folders."""

from flashtune.evaluation.generation import evaluate_generation, generate_texts
from flashtune.evaluation.metrics import corpus_bleu, nist, rouge_l, score_all
from flashtune.evaluation.report import write_json, write_report
from flashtune.evaluation.slot_errors import slot_error_scores

__all__ = ["corpus_bleu", "rouge_l", "nist", "score_all", "evaluate_generation", "generate_texts",
           "write_report", "write_json", "slot_error_scores"]
