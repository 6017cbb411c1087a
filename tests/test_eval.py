"""Evaluation: metrics against hand-written oracles, batched generation against one-by-one decoding, reports."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from flashtune.data import E2EExample, encode_prompt, stop_token_ids
from flashtune.errors import FlashtuneError
from flashtune.errors import ConfigError
from flashtune.evaluation import (corpus_bleu, evaluate_generation, generate_texts, nist, rouge_l, slot_error_scores,
                                  write_report)
from flashtune.evaluation.slot_errors import matcher_for
from test_data import char_tokenizer
from tiny import tiny_model

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello there world", "it is"]
REFS = [["the cat is on the mat", "there is a cat on the mat"],
        ["a fast brown fox jumped over the lazy dog"],
        ["hello world", "hello there", "well hello there world"],
        ["it is so", "this is it"]]


def bleu_oracle(hyps, refs_list, max_n=4):
    """Multi-reference corpus BLEU from Papineni et al., written out: clipped n-gram precision (max count over
    references), geometric mean, brevity penalty against the closest reference length (ties: shorter)."""
    match, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hyps, refs_list):
        h, rs = hyp.split(), [r.split() for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            best = Counter()
            for r in rs:
                for g, c in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                    best[g] = max(best[g], c)
            match[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def lcs(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def rouge_l_oracle(hyps, refs_list):
    total = 0.0
    for hyp, refs in zip(hyps, refs_list):
        best = 0.0
        for r in refs:
            h, rr = hyp.split(), r.split()
            m = lcs(h, rr)
            if m:
                p, rec = m / len(h), m / len(rr)
                best = max(best, 2 * p * rec / (p + rec))
        total += best
    return 100 * total / len(hyps)


def test_bleu_matches_the_written_out_definition():
    assert corpus_bleu(HYPS, REFS) == pytest.approx(bleu_oracle(HYPS, REFS), abs=1e-6)
    # One reference per input, and exact matches.
    assert corpus_bleu(HYPS, [[r[0]] for r in REFS]) == pytest.approx(bleu_oracle(HYPS, [[r[0]] for r in REFS]))
    assert corpus_bleu(HYPS, [[h, "x"] for h in HYPS]) == pytest.approx(100.0)


def test_more_references_never_lower_bleu_precision():
    one = corpus_bleu(HYPS[:2], [REFS[0][:1], REFS[1]])
    both = corpus_bleu(HYPS[:2], [REFS[0], REFS[1]])
    assert both >= one


def test_rouge_l_is_the_best_lcs_f_measure_per_input():
    assert rouge_l(HYPS, REFS) == pytest.approx(rouge_l_oracle(HYPS, REFS), abs=1e-9)
    assert rouge_l(["a b c"], [["a b c"]]) == pytest.approx(100.0)


def test_nist_rewards_matches_and_metrics_check_their_inputs():
    good = nist(HYPS, REFS)
    bad = nist(["zzz qqq"] * 4, REFS)
    assert good is not None and good > bad >= 0.0
    with pytest.raises(FlashtuneError, match="pair up"):
        corpus_bleu(HYPS, REFS[:2])
    with pytest.raises(FlashtuneError, match="at least one reference"):
        rouge_l(["a"], [[]])


def _greedy_one(model, ids, stops, max_new):
    """Plain decoding oracle: full re-forward each step, argmax, no padding, no cache."""
    ids = list(ids)
    out = []
    for _ in range(max_new):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


MRS = ["name[Blue Oak], area[riverside]", "name[X]", "name[The Red Lion], eatType[pub], food[French], near[Y]",
       "name[Ab], familyFriendly[no]", "name[Q], priceRange[cheap], customer rating[high], area[city centre]"]


def test_batched_left_padded_greedy_equals_one_by_one_decoding():
    tok = char_tokenizer()
    model = tiny_model("llama", seed=1)
    mrs = MRS[:4]
    outs = generate_texts(model, tok, mrs, batch_size=3, max_new_tokens=6)
    stops = stop_token_ids(tok)
    for mr, out in zip(mrs, outs):
        expected = _greedy_one(model, encode_prompt(tok, mr), stops, 6)
        assert out == tok.decode(expected, skip_special_tokens=True).strip()


def test_batched_beam_search_equals_unbatched_beam_search():
    tok = char_tokenizer()
    model = tiny_model("qwen2", seed=2)
    mrs = MRS[:3]
    batched = generate_texts(model, tok, mrs, batch_size=3, num_beams=3, max_new_tokens=6)
    single = [generate_texts(model, tok, [mr], batch_size=1, num_beams=3, max_new_tokens=6)[0] for mr in mrs]
    assert batched == single


def test_evaluate_generation_scores_what_it_generated():
    tok = char_tokenizer()
    model = tiny_model("llama", seed=3)
    examples = [E2EExample(mr, [f"{mr} is good", "another ref"]) for mr in MRS]
    res = evaluate_generation(model, tok, examples, batch_size=2, max_new_tokens=6)
    outs = [s["output"] for s in res["samples"]]
    assert [s["mr"] for s in res["samples"]] == MRS
    assert res["metrics"]["bleu"] == pytest.approx(corpus_bleu(outs, [e.refs for e in examples]))
    assert res["metrics"]["rouge_l"] == pytest.approx(rouge_l(outs, [e.refs for e in examples]))
    assert res["metrics"]["n_inputs"] == len(MRS)


def test_report_folder(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * s / 10, "tokens_per_s": 100.0} for s in range(1, 11)]
    history.append({"step": 10, "eval_loss": 0.5})
    samples = [{"mr": "name[A|B]", "output_before": "x", "output": "A is nice", "refs": ["A is nice."]}]
    metrics = {"before": {"bleu": 1.5, "rouge_l": 10.0}, "after": {"bleu": 50.25, "rouge_l": 70.0}}
    summary = write_report(tmp_path / "rep", metrics, samples, history, title="demo", config={"lr": 1e-3})
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved == {"metrics": metrics, "config": {"lr": 1e-3}}
    assert [json.loads(x) for x in (tmp_path / "rep" / "samples.jsonl").read_text().splitlines()] == samples
    import matplotlib.image as mpimg

    for name in ("loss.png", "lr.png"):
        img = mpimg.imread(tmp_path / "rep" / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0   # a real, non-blank picture
    text = summary.read_text()
    assert "final training loss 0.30, validation loss 0.50" in text
    assert "50.25" in text and "| after |" in text and "![loss](loss.png)" in text and "name[A\\|B]" in text
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.startswith(".")]   # no temp files left


# A word-level tokenizer over a few E2E words, so that a tiny random model's beam candidates differ in the slot
# values they say (a character model's candidates are gibberish that says none).
WORDS = ["cotto", "is", "a", "pub", "near", "aromi", "cheap", "expensive", "riverside", "in", "the", "city",
         "centre", "restaurant", "and", "."]
E2E_MRS = ["name[Cotto], eatType[pub], near[Aromi]", "name[Aromi], priceRange[cheap], area[riverside]",
           "name[Cotto], area[city centre], eatType[restaurant]"]


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)     # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _hf_beams(model, tok, mr, num_beams, max_new):
    """Oracle candidates: Hugging Face beam search on one unpadded prompt, all beams, best first."""
    ids = torch.tensor([encode_prompt(tok, mr)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, num_beams=num_beams, num_return_sequences=num_beams, early_stopping=True,
                         eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
    texts = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop_token_ids(tok)), len(row))
        texts.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("seed", [0, 1])
def test_rerank_by_slots_keeps_the_beam_with_fewest_slot_errors(seed):
    tok = word_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tok))
    examples = [E2EExample(mr, ["ref"]) for mr in E2E_MRS]
    plain = evaluate_generation(model, tok, examples, batch_size=3, num_beams=4, max_new_tokens=8)
    reranked = evaluate_generation(model, tok, examples, batch_size=3, num_beams=4, max_new_tokens=8, rerank="slots")
    matcher = matcher_for(E2E_MRS)
    changed = 0
    for mr, p, r in zip(E2E_MRS, plain["samples"], reranked["samples"]):
        beams = _hf_beams(model, tok, mr, 4, 8)
        errors = [matcher.errors(mr, b).errors for b in beams]
        best = errors.index(min(errors))                 # fewest errors, ties to the better beam
        assert p["output"] == beams[0]
        assert r["output"] == beams[best]
        changed += best != 0
    assert changed >= 1                                  # the model's candidates really differ (test has power)
    assert reranked["metrics"]["slot_error_rate"] < plain["metrics"]["slot_error_rate"]
    assert reranked["metrics"]["rerank"] == "slots"


def test_evaluate_generation_reports_slot_errors_for_e2e_inputs():
    tok = word_tokenizer()
    model = tiny_model("llama", seed=0, vocab_size=len(tok))
    examples = [E2EExample(mr, ["Cotto is a pub near Aromi ."]) for mr in E2E_MRS]
    res = evaluate_generation(model, tok, examples, batch_size=2, num_beams=2, max_new_tokens=8)
    outs = [s["output"] for s in res["samples"]]
    want = slot_error_scores(E2E_MRS, outs)
    m = res["metrics"]
    assert m["slot_error_rate"] == pytest.approx(want["slot_error_rate"]) and m["slot_error_rate"] > 0
    assert (m["slots_missing"], m["slots_wrong"], m["slots_added"], m["slots_total"]) == \
        (want["missing"], want["wrong"], want["added"], 9)
    assert m["outputs_correct"] == pytest.approx(want["outputs_correct"])
    assert [s["slot_errors"] for s in res["samples"]] == [e.describe() for e in want["per_output"]]
    # Not E2E MRs: no slot errors, and reranking by them is refused with one clear line.
    other = [E2EExample("colour[red]", ["red"])]
    assert "slot_error_rate" not in evaluate_generation(model, tok, other, max_new_tokens=2)["metrics"]
    with pytest.raises(ConfigError, match="E2E MRs"):
        evaluate_generation(model, tok, other, num_beams=2, max_new_tokens=2, rerank="slots")
    with pytest.raises(ConfigError, match="num_beams >= 2"):
        evaluate_generation(model, tok, examples, num_beams=1, max_new_tokens=2, rerank="slots")
    with pytest.raises(ConfigError, match="rerank="):
        evaluate_generation(model, tok, examples, num_beams=2, max_new_tokens=2, rerank="bleu")


def test_report_shows_slot_errors(tmp_path):
    mrs = ["name[Cotto], eatType[pub]", "name[Aromi], area[riverside]", "name[Cotto], near[Aromi]"]
    outs = ["Cotto is a pub.", "Aromi is in the city centre.", "Cotto."]
    slots = slot_error_scores(mrs, outs)
    metrics = {"bleu": 10.0, "slot_error_rate": slots["slot_error_rate"], "outputs_correct": slots["outputs_correct"],
               "slots_missing": slots["missing"], "slots_wrong": slots["wrong"], "slots_added": slots["added"],
               "slots_total": slots["slots"]}
    samples = [{"mr": m, "output": o, "refs": ["r"], "slot_errors": e.describe()}
               for m, o, e in zip(mrs, outs, slots["per_output"])]
    text = write_report(tmp_path / "rep", metrics, samples, n_samples=1).read_text()
    assert "Slot errors: 33.33% of 6 MR values (missing 1, wrong value 1, added 0); 33.3% of outputs" in text
    assert "*slot errors*: ok" in text                                   # the first sample, shown as a sample
    assert "## Outputs with slot errors (2 of 3" in text
    assert "*slot errors*: wrong area[city centre] for [riverside]" in text
