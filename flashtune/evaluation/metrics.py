"""Multi-reference text-generation metrics, computed by well-kept libraries.

- BLEU: "BLEU: a Method for Automatic Evaluation of Machine Translation" (Papineni et al., ACL 2002), via
  sacrebleu (default 13a tokenization, cased), every reference of an input used ("A Call for Clarity in
  Reporting BLEU Scores", Post 2018, arXiv:1804.08771).
- ROUGE-L: "ROUGE: A Package for Automatic Evaluation of Summaries" (Lin, 2004), via rouge-score: per input,
  the best F-measure over its references; averaged over inputs.
- NIST: "Automatic evaluation of machine translation quality using n-gram co-occurrence statistics"
  (Doddington, 2002), via nltk (installed with rouge-score; needs no downloaded data), on 13a tokens.
METEOR (nltk needs the WordNet corpus downloaded) and CIDEr (no well-kept offline package) are not computed.
All scores are on a 0-100 scale except NIST (its own scale, about 0-10).
"""

from __future__ import annotations

from flashtune.errors import FlashtuneError


def _check(hyps, refs_list):
    if len(hyps) != len(refs_list):
        raise FlashtuneError(f"{len(hyps)} outputs but {len(refs_list)} reference lists; they must pair up")
    if not hyps:
        raise FlashtuneError("no outputs to score")
    for refs in refs_list:
        if not refs:
            raise FlashtuneError("every input needs at least one reference")


def corpus_bleu(hyps: list[str], refs_list: list[list[str]]) -> float:
    """Corpus BLEU (0-100) of `hyps[i]` against all of `refs_list[i]` (inputs may have different counts)."""
    import sacrebleu

    _check(hyps, refs_list)
    width = max(len(r) for r in refs_list)
    # sacrebleu takes reference *streams*: stream j holds the j-th reference of every input (None if absent).
    streams = [[refs[j] if j < len(refs) else None for refs in refs_list] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def rouge_l(hyps: list[str], refs_list: list[list[str]]) -> float:
    """Mean over inputs of the best ROUGE-L F-measure against that input's references (0-100)."""
    from rouge_score import rouge_scorer

    _check(hyps, refs_list)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hyps, refs_list))
    return 100.0 * total / len(hyps)


def nist(hyps: list[str], refs_list: list[list[str]], n: int = 5) -> float | None:
    """Corpus NIST-n on 13a tokens, or None when nltk is not installed."""
    try:
        from nltk.translate.nist_score import corpus_nist
    except ImportError:
        return None
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    _check(hyps, refs_list)
    tok = Tokenizer13a()
    hyp_t = [tok(h).split() for h in hyps]
    refs_t = [[tok(r).split() for r in refs] for refs in refs_list]
    if not any(hyp_t):
        return 0.0
    try:
        return float(corpus_nist(refs_t, hyp_t, n=n))
    except ZeroDivisionError:
        return 0.0


def score_all(hyps: list[str], refs_list: list[list[str]]) -> dict[str, float]:
    """{"bleu", "rouge_l", "nist" (when available)} for one set of outputs."""
    out = {"bleu": corpus_bleu(hyps, refs_list), "rouge_l": rouge_l(hyps, refs_list)}
    value = nist(hyps, refs_list)
    if value is not None:
        out["nist"] = value
    return out
