"""EAGLE-3 drafts exported in the speculators format (`flashtune export-heads --format speculators`) load with
vLLM's `speculators` package itself (the independent oracle): its config class parses the config, its model
class takes every tensor with none missing but the target's own (embedding, verifier norm / head), and its
decoder layer, fc, norm and head compute the draft's logits as flashtune's draft does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flashtune.decoding.drafters.eagle import Eagle3Draft
from flashtune.decoding.drafters.eagle.export import export_eagle3, import_eagle3
from tiny import VOCAB, tiny_model

LAYERS = 8  # speculators wants three distinct aux layers: (2, L//2, L-3) = (2, 4, 5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = tiny_model("llama", num_hidden_layers=LAYERS)
    target.save_pretrained(root / "target")  # the verifier that the speculators config names
    target.config._name_or_path = str(root / "target")
    draft = Eagle3Draft.build(target, range(5, VOCAB, 3), seed=1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms away from 1: a dropped or misnamed norm shows
    export_eagle3(draft, root / "draft", "speculators", dtype="float32", model=target)
    return target, draft, root / "draft"


def test_speculators_loads_every_tensor_of_the_export(exported):
    from speculators import SpeculatorModel
    from speculators.models.eagle3 import Eagle3DraftModel

    target, draft, folder = exported
    model = SpeculatorModel.from_pretrained(str(folder))
    assert isinstance(model, Eagle3DraftModel)
    assert model.config.eagle_aux_hidden_state_layer_ids == draft.config.aux_layers == [2, 4, 5]
    assert model.config.draft_vocab_size == draft.config.draft_vocab_size
    assert model.config.speculators_config.verifier.name_or_path == target.config._name_or_path
    state, written = model.state_dict(), load_file(str(folder / "model.safetensors"))
    assert set(written) <= set(state)
    assert set(state) - set(written) == {"embed_tokens.weight", "verifier_norm.weight", "verifier_lm_head.weight"}
    for key, value in written.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(model.d2t, draft.d2t) and torch.equal(model.t2d, draft.t2d)


def test_speculators_layer_computes_the_drafts_logits(exported):
    """fc -> speculators' first decoder layer (eager attention, causal) -> norm -> lm_head, against the draft's
    own first step (Eagle3Draft.unrolled, step 0) on the same features and tokens."""
    from speculators import SpeculatorModel

    target, draft, folder = exported
    model = SpeculatorModel.from_pretrained(str(folder)).eval()
    layer = model.layers[0]
    layer.self_attn.config._attn_implementation = "eager"
    torch.manual_seed(0)
    b, t, h = 2, 7, draft.config.hidden_size
    feats = torch.randn(b, t, 3 * h)  # [B, T, 3H]: the target's low / middle / high states
    ids = torch.randint(0, VOCAB, (b, t))
    with torch.no_grad():
        ours = draft.eval().unrolled(feats, ids, steps=1)[0]  # [B, T, Vd]: logits for t_{i+2}
        ahead = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=0)  # t_{i+1} at position i, as unrolled reads
        x = model.fc(feats)
        emb = target.get_input_embeddings()(ahead)
        pos = torch.arange(t)[None].expand(b, t)
        cos_sin = model.rotary_emb(x, pos)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
        out = layer(torch.cat([emb, x], dim=-1), attention_mask=mask, position_ids=pos,
                    position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        theirs = model.lm_head(model.norm(out))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_speculators_folder_imports_back_bit_for_bit(exported):
    target, draft, folder = exported
    back = import_eagle3(folder, target)
    assert back.config.aux_layers == draft.config.aux_layers
    for (k, a), (_, b) in zip(sorted(draft.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    config = json.loads((folder / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["norm_before_residual"] is False
