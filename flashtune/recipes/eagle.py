"""Training an EAGLE-3 draft with the training-time test (EAGLE-3, Li et al., arXiv 2503.01840, §3).

The target runs once per batch (no gradient): its three aux layers' inputs give the features g_i, and its
logits, restricted to the draft vocabulary, give the soft targets. The draft is unrolled for `ttt_steps` steps
(model.Eagle3Draft.unrolled): step 0 reads the target's features, step j its own step j-1 outputs, so the
draft is trained on the states it will actually see when drafting j tokens ahead. Loss of step j at anchor i:
the cross-entropy of the draft's distribution against softmax(target logits at i + j + 1 over the draft
vocabulary) (= KL up to a constant), over positions whose next token is an answer token and whose target argmax
lies in the draft vocabulary (as EAGLE-3 masks), weighted 0.8^j. A small AdamW loop of its own (warm-up, cosine
decay, clipping); the target stays frozen, its embedding shared. `train_eagle3(cfg)` is the whole recipe:
data (Magpie self-synthesis by default, synth.py), draft vocabulary, training, held-out acceptance, files.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import Counter
from pathlib import Path

import torch

from flashtune.decoding.drafters.eagle.model import Eagle3Draft
from flashtune.errors import ConfigError, FlashtuneError, check_choice, check_range
from flashtune.fileio import atomic_write_json
from flashtune.training.trainer import lr_multiplier


@dataclasses.dataclass
class Eagle3TrainConfig:
    """`flashtune train-heads --method eagle3`. data: "magpie" (self-synthesised prompts, synth.py), a file
    written by synth.py (.jsonl), or a text file with one prompt per line (answers self-distilled)."""

    out_dir: str = "runs/eagle3"
    model: str = ""  # "" = the default SmolLM2-135M-Instruct
    dtype: str = "float32"  # the target's dtype
    device: str = ""  # "" = cuda when available
    data: str = "magpie"
    num_prompts: int = 256
    prompt_tokens: int = 64  # longest synthesised user turn
    answer_tokens: int = 128  # longest self-distilled answer
    draft_vocab_size: int = 8192
    aux_layers: list | None = None  # None: (2, L//2, L-3)
    ttt_steps: int = 7
    step_decay: float = 0.8
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    precision: str = "fp32"  # the draft's compute: "fp32" | "bf16" (autocast, CUDA)
    holdout: int = 16  # records kept out of training for the acceptance report
    seed: int = 0

    def __post_init__(self):
        check_choice("precision", self.precision, ("fp32", "bf16"))
        for name, low in (("num_prompts", 2), ("prompt_tokens", 4), ("answer_tokens", 2), ("draft_vocab_size", 2),
                          ("ttt_steps", 1), ("steps", 1), ("batch_size", 1), ("warmup", 0), ("holdout", 0)):
            check_range(name, getattr(self, name), low, integer=True)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("step_decay", self.step_decay, 0, 1, low_open=True)
        if self.aux_layers is not None and len(self.aux_layers) != 3:
            raise ConfigError(f"aux_layers={self.aux_layers} must name 3 target layers (or be None for the default)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown EAGLE-3 training field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


def draft_vocabulary(records: list[dict], vocab_size: int, size: int) -> torch.Tensor:
    """The `size` most frequent target tokens of the records' answers (then prompts; ties and any shortfall
    filled by the lowest unused ids), sorted ascending -> long [size]."""
    counts = Counter()
    for r in records:
        counts.update(r["answer_ids"])
    prompt_counts = Counter()
    for r in records:
        prompt_counts.update(r["prompt_ids"])
    ranked = sorted(set(counts) | set(prompt_counts), key=lambda t: (-counts[t], -prompt_counts[t], t))
    ids = [t for t in ranked if 0 <= t < vocab_size][:size]
    if len(ids) < size:
        have = set(ids)
        ids += [t for t in range(vocab_size) if t not in have][: size - len(ids)]
    return torch.sort(torch.tensor(ids, dtype=torch.long)).values


def batch_of(records: list[dict], device) -> dict:
    """Right-padded input_ids / attention_mask and answer_mask [B, T] (position p: token p + 1 is an answer
    token, so the target's distribution at p is a training target)."""
    seqs = [list(r["prompt_ids"]) + list(r["answer_ids"]) for r in records]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    att = torch.zeros(len(seqs), t, dtype=torch.bool)
    ans = torch.zeros(len(seqs), t, dtype=torch.bool)
    for b, (s, r) in enumerate(zip(seqs, records)):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = True
        ans[b, max(0, len(r["prompt_ids"]) - 1): len(s) - 1] = True
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "answer_mask": ans.to(device)}


@torch.no_grad()
def target_pass(model, draft: Eagle3Draft, input_ids, attention_mask):
    """(features [B, T, 3H] = inputs of the aux layers, target logits over the draft vocabulary [B, T, Vd] in
    fp32, in_vocab bool [B, T]: the target's argmax has a draft id)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask.long(), output_hidden_states=True)
    hs = out.hidden_states  # hs[i] = input of layer i (i < L); hs[-1] = after the final norm
    feats = torch.cat([hs[i] for i in draft.config.aux_layers], dim=-1)
    full = model.get_output_embeddings()(out.last_hidden_state).float()  # [B, T, V]
    ids = draft.draft_ids()
    return feats, full[..., ids], draft.t2d[full.argmax(-1)]


def ttt_loss(draft: Eagle3Draft, model, batch: dict, steps: int, decay: float = 0.8):
    """(loss, per-step accuracy list, per-step position counts) of the training-time test on one batch."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    feats, tl, in_vocab = target_pass(model, draft, ids, att)
    valid = batch["answer_mask"] & in_vocab  # [B, T]: target position p is a training target
    p = torch.softmax(tl, dim=-1)
    outs = draft.unrolled(feats, ids, steps, att)
    t = ids.shape[1]
    loss = feats.new_zeros((), dtype=torch.float32)
    accs, counts = [], []
    for j, logits in enumerate(outs):
        # step j at anchor i is judged against the target at position i + j + 1
        m = torch.zeros_like(valid)
        m[:, : t - j - 1] = valid[:, j + 1:]
        pj = torch.zeros_like(p)
        pj[:, : t - j - 1] = p[:, j + 1:]
        logq = torch.log_softmax(logits.float(), dim=-1)
        ce = -(pj * logq).sum(-1)  # [B, T]
        n = m.sum()
        loss = loss + (decay ** j) * (ce * m).sum() / n.clamp(min=1)
        hit = (logits.argmax(-1) == pj.argmax(-1)) & m
        accs.append(float(hit.sum()) / max(1, int(n)))
        counts.append(int(n))
    return loss, accs, counts


def new_draft(model, records: list[dict], cfg: Eagle3TrainConfig) -> Eagle3Draft:
    """A draft for `model` over the records' draft vocabulary; its norm and LM head start as the target's
    final norm and LM-head rows (the draft's output space starts as the target's)."""
    ids = draft_vocabulary(records, model.config.vocab_size, min(cfg.draft_vocab_size, model.config.vocab_size))
    draft = Eagle3Draft.build(model, ids, cfg.aux_layers, seed=cfg.seed)
    with torch.no_grad():
        draft.lm_head.weight.copy_(model.get_output_embeddings().weight[ids.to(draft.lm_head.weight.device)].float())
        draft.norm.weight.copy_(model.model.norm.weight.float())
    return draft.float()


def fit_draft(model, draft: Eagle3Draft, records: list[dict], cfg: Eagle3TrainConfig, log=None) -> list[dict]:
    """Train `draft` on `records` ({"prompt_ids", "answer_ids"}) for cfg.steps; returns the loss history."""
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(records), generator=gen).tolist()
    autocast = cfg.precision == "bf16" and device.type == "cuda"
    history, pos = [], 0
    draft.train()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(records), generator=gen).tolist(), 0
        batch = batch_of([records[i] for i in order[pos: pos + cfg.batch_size]], device)
        pos += cfg.batch_size
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_multiplier(step, cfg.warmup, cfg.steps, "cosine", min_ratio=0.1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, accs, _ = ttt_loss(draft, model, batch, cfg.ttt_steps, cfg.step_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        history.append({"step": step, "loss": float(loss.detach()), "acc": accs})
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"step {step}: loss {float(loss.detach()):.3f}, acc by step {[round(a, 3) for a in accs]}")
    draft.eval()
    return history


@torch.no_grad()
def heldout_accuracy(model, draft: Eagle3Draft, records: list[dict], steps: int, batch_size: int = 16) -> list[float]:
    """Top-1 agreement with the target's argmax per unrolled step, over held-out records."""
    device = next(model.parameters()).device
    hits, total = [0.0] * steps, [0] * steps
    for s in range(0, len(records), batch_size):
        _, accs, counts = ttt_loss(draft, model, batch_of(records[s: s + batch_size], device), steps)
        for j in range(steps):
            hits[j] += accs[j] * counts[j]
            total[j] += counts[j]
    return [h / max(1, c) for h, c in zip(hits, total)]


def measure_acceptance(model, draft: Eagle3Draft, records: list[dict], max_new_tokens: int = 64, depth: int = 5,
                       topk: int = 1, stop_tokens=None) -> float:
    """Mean tokens per step (greedy) of the engine with the draft on the records' prompts."""
    from flashtune.decoding import Engine
    from flashtune.decoding.drafters.eagle.draft import Eagle3Drafter

    prompts = [list(r["prompt_ids"]) for r in records]
    device = next(model.parameters()).device
    engine = Engine(model, max_batch_size=min(8, len(prompts)), device=device,
                    max_seq_len=max(len(p) for p in prompts) + max_new_tokens + 64)
    drafter = Eagle3Drafter(draft, depth=depth, topk=topk)
    made = steps = 0.0
    for s in range(0, len(prompts), 8):
        out = engine.generate(prompts[s: s + 8], max_new_tokens=max_new_tokens, speculative=drafter,
                              stop_tokens=stop_tokens)
        n = sum(len(t) - 1 for t in out.tokens)
        made += n
        steps += n / max(out.accepted_per_step, 1e-9)
    return made / max(steps, 1e-9)


def load_records(cfg: Eagle3TrainConfig, model, tokenizer, device, log=print) -> tuple[list[dict], str]:
    """The recipe's records and the path they are kept at."""
    from flashtune.decoding.drafters.eagle import synth

    out = Path(cfg.out_dir)
    if cfg.data == "magpie":
        path = out / "data.jsonl"
        if path.is_file():
            head, records = synth.read_records(path)
            if head.get("seed") == cfg.seed and head.get("n_requested") == cfg.num_prompts:
                log(f"reusing {len(records)} synthesised records from {path}")
                return records, str(path)
        records = synth.synthesize(model, tokenizer, cfg.num_prompts, path, seed=cfg.seed,
                                   prompt_tokens=cfg.prompt_tokens, answer_tokens=cfg.answer_tokens,
                                   batch_size=64 if device.type == "cuda" else 8, device=device)
        return records, str(path)
    if synth.is_synthesised(cfg.data):
        return synth.read_records(cfg.data)[1], cfg.data
    from flashtune.data import head_training_prompts
    from flashtune.decoding import Engine

    # a .txt file of prompts, a chat / prompt data file or a Hub dataset name: the target answers each prompt
    prompts, _ = head_training_prompts(cfg.data, cfg.num_prompts, cfg.seed, tokenizer)
    longest = max(len(p) for p in prompts)
    batch = min(64 if device.type == "cuda" else 8, len(prompts))
    engine = Engine(model, tokenizer, max_batch_size=batch, device=device, max_seq_len=longest + cfg.answer_tokens + 8)
    records = synth.self_distill(engine, tokenizer, prompts, cfg.answer_tokens, batch)
    del engine
    gc.collect()  # the engine's CUDA graphs and KV cache hold memory until its reference cycle is collected
    return records, cfg.data


def train_eagle3(cfg: Eagle3TrainConfig, model=None, tokenizer=None, log=print) -> dict:
    """The whole recipe; writes the draft (model.Eagle3Draft.save) and eagle3_report.json into cfg.out_dir.
    Returns the report."""
    from flashtune.models import load_base_model

    t0 = time.time()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, tokenizer = load_base_model(cfg.model or None, dtype=cfg.dtype)
    model.to(device).eval()
    torch.manual_seed(cfg.seed)
    records, data_path = load_records(cfg, model, tokenizer, device, log)
    records = [r for r in records if r["answer_ids"]]
    if cfg.data == "magpie":  # the same prompts as text, one per line, for training other drafters on them
        from flashtune.fileio import atomic_write_bytes

        lines = [" ".join(r["prompt"].split()) for r in records if r.get("prompt")]
        atomic_write_bytes(Path(cfg.out_dir) / "prompts.txt", "\n".join(lines) + "\n")
    if len(records) <= cfg.holdout + 1:
        raise FlashtuneError(f"only {len(records)} usable records for holdout={cfg.holdout}; raise num_prompts")
    train, held = records[: len(records) - cfg.holdout], records[len(records) - cfg.holdout:]
    t_data = time.time() - t0
    draft = new_draft(model, train, cfg)
    before = heldout_accuracy(model, draft, held, cfg.ttt_steps) if held else []
    history = fit_draft(model, draft, train, cfg, log)
    after = heldout_accuracy(model, draft, held, cfg.ttt_steps) if held else []
    draft.save(cfg.out_dir)
    from flashtune.decoding.drafters.eagle.synth import end_of_turn_ids

    stop = end_of_turn_ids(tokenizer) if tokenizer is not None else []
    tps = measure_acceptance(model, draft, held, stop_tokens=stop) if held else None
    report = {"method": "eagle3", "config": cfg.to_dict(), "data": data_path, "records": len(records),
              "draft_vocab_size": draft.config.draft_vocab_size, "aux_layers": draft.config.aux_layers,
              "heldout_step_accuracy_before": before, "heldout_step_accuracy": after,
              "heldout_tokens_per_step_chain5": tps, "final_loss": history[-1]["loss"],
              "seconds_data": t_data, "seconds_total": time.time() - t0, "device": str(device)}
    atomic_write_json(Path(cfg.out_dir) / "eagle3_report.json", report)
    return report
