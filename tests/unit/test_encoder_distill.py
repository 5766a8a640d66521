"""Encoder distillation: layer selection, a shrinking student that learns, resumable checkpoints, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.encoder_distill import (RESULT_FILE, EncoderDistillConfig, _Training, batch_indices, distill_encoder,
                                   paragraphs, select_layers)
from tasks.encoder_eval import TorchEncoderRunner, embed_texts
from tasks.errors import ConfigError, UnsupportedModelError
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm

# Documents of several sentences, so paragraphs of 60-200 characters come out of each.
DOCS = [" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(4)) for i in range(10)]
# One thread: a tiny model on shared cores is many times slower with two.
FAST = dict(min_chars=60, max_chars=200, batch_size=8, max_length=48, lr=1e-3, warmup_ratio=0.0, threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "bert", layers=4)


@pytest.fixture(scope="module")
def strong(tiny, tmp_path_factory):
    """The tiny encoder with large layer weights, so dropping layers really changes its embeddings
    (at the default init of 0.02 every layer is nearly the identity)."""
    import shutil

    import torch
    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("strong") / "bert"
    shutil.copytree(tiny, folder)
    model = AutoModel.from_pretrained(tiny)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.4)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_select_layers_keeps_first_and_last_when_spacing_evenly():
    assert select_layers(6, EncoderDistillConfig(student_layers=3)) == [0, 3, 5]
    assert select_layers(4, EncoderDistillConfig(student_layers=2)) == [0, 3]
    assert select_layers(6, EncoderDistillConfig(student_layers=6)) == list(range(6))
    assert select_layers(6, EncoderDistillConfig(layer_map=(1, 4))) == [1, 4]


def test_select_layers_raises_config_error_when_student_is_deeper_than_teacher():
    with pytest.raises(ConfigError, match="only 4 layers"):
        select_layers(4, EncoderDistillConfig(student_layers=5))
    with pytest.raises(ConfigError, match="layers 0..3"):
        select_layers(4, EncoderDistillConfig(layer_map=(0, 4)))


def test_encoder_distill_config_rejects_layer_map_when_not_increasing():
    with pytest.raises(ValueError, match="strictly increasing"):
        EncoderDistillConfig(layer_map=(2, 1))


def test_paragraphs_respect_length_bounds_and_remember_their_document_when_cut():
    paras, doc_of = paragraphs(DOCS, 60, 200)
    assert paras and all(60 <= len(p) <= 200 for p in paras)
    assert len(doc_of) == len(paras) and set(doc_of) <= set(range(len(DOCS)))
    assert all(p in DOCS[d] for p, d in zip(paras, doc_of))


def test_batch_indices_are_a_pure_function_of_step_when_resampled():
    doc_of = [i // 3 for i in range(30)]
    a = batch_indices(5, 8, doc_of, seed=0)
    assert a == batch_indices(5, 8, doc_of, seed=0)
    assert a != batch_indices(6, 8, doc_of, seed=0)
    assert len(a) == 8 and len(set(a)) == 8
    # The first quarter-batch pairs come from one article each: the similarity term sees related items.
    assert doc_of[a[0]] == doc_of[a[1]] and doc_of[a[2]] == doc_of[a[3]]


def test_distill_encoder_student_shrinks_and_reloads_when_layers_are_dropped(tiny, tmp_path):
    from transformers import AutoModel

    r = distill_encoder(EncoderDistillConfig(student_layers=2, steps=0), tiny, [], tmp_path / "s", tmp_path / "r")
    assert r["layer_map"] == [0, 3] and r["student_layers"] == 2
    assert r["num_parameters"] < r["teacher_parameters"]
    student = AutoModel.from_pretrained(tmp_path / "s")
    assert student.config.num_hidden_layers == 2 and len(student.encoder.layer) == 2
    saved = json.loads((tmp_path / "s" / RESULT_FILE).read_text())
    assert EncoderDistillConfig.model_validate(saved["config"]) == EncoderDistillConfig(student_layers=2, steps=0)
    assert (tmp_path / "s" / "tokenizer.json").is_file()


def test_distill_encoder_copies_teacher_layers_when_all_are_kept(tiny, tmp_path):
    distill_encoder(EncoderDistillConfig(student_layers=4, steps=0), tiny, [], tmp_path / "s", tmp_path / "r")
    a = embed_texts(TorchEncoderRunner(tiny, threads=1), CORPUS)
    b = embed_texts(TorchEncoderRunner(tmp_path / "s", threads=1), CORPUS)
    assert np.abs(a - b).max() < 1e-6


def test_distill_encoder_moves_student_towards_teacher_when_trained(strong, tmp_path):
    cfg = EncoderDistillConfig(student_layers=2, steps=15, **FAST)
    r = distill_encoder(cfg, strong, DOCS, tmp_path / "s", tmp_path / "r")
    untrained = distill_encoder(cfg.model_copy(update={"steps": 0}), strong, DOCS, tmp_path / "u", tmp_path / "r0")
    assert r["steps"] == 15 and r["final_loss"] < r["first_loss"]
    teacher = embed_texts(TorchEncoderRunner(strong, threads=1), CORPUS)
    trained = embed_texts(TorchEncoderRunner(tmp_path / "s", threads=1), CORPUS)
    before = embed_texts(TorchEncoderRunner(tmp_path / "u", threads=1), CORPUS)
    assert (trained * teacher).sum(1).mean() > (before * teacher).sum(1).mean()
    assert untrained["steps"] == 0


def test_distill_encoder_runs_hidden_state_term_when_weighted(tiny, tmp_path):
    cfg = EncoderDistillConfig(student_layers=2, steps=2, hidden_weight=1.0, **FAST)
    r = distill_encoder(cfg, tiny, DOCS, tmp_path / "s", tmp_path / "r")
    assert r["steps"] == 2 and np.isfinite(r["final_loss"])


def test_distill_encoder_resumes_to_the_same_weights_when_interrupted(tiny, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    cfg = EncoderDistillConfig(student_layers=2, steps=4, checkpoint_every=2, **FAST)
    distill_encoder(cfg, tiny, DOCS, tmp_path / "straight", tmp_path / "r1")

    real_save = _Training._save

    def save_then_die(self):
        real_save(self)
        if self.step == 2:
            raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(_Training, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill_encoder(cfg, tiny, DOCS, tmp_path / "resumed", tmp_path / "r2")
    monkeypatch.setattr(_Training, "_save", real_save)
    r = distill_encoder(cfg, tiny, DOCS, tmp_path / "resumed", tmp_path / "r2")
    assert r["resumed_from_step"] == 2 and r["steps"] == 4
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_distill_encoder_raises_config_error_when_resume_dir_holds_another_run(tiny, tmp_path):
    cfg = EncoderDistillConfig(student_layers=2, steps=2, checkpoint_every=1, **FAST)
    distill_encoder(cfg, tiny, DOCS, tmp_path / "a", tmp_path / "r")
    with pytest.raises(ConfigError, match="different run"):
        distill_encoder(cfg.model_copy(update={"lr": 5e-4}), tiny, DOCS, tmp_path / "b", tmp_path / "r")


def test_distill_encoder_raises_config_error_when_training_texts_are_too_few(tiny, tmp_path):
    with pytest.raises(ConfigError, match="fewer than one batch"):
        distill_encoder(EncoderDistillConfig(steps=5, **FAST), tiny, [], tmp_path / "s", tmp_path / "r")
    assert not (tmp_path / "s").exists()


def test_distill_encoder_raises_unsupported_model_error_when_teacher_is_a_causal_lm(tmp_path):
    llm = make_tiny_llm(tmp_path / "llm")
    with pytest.raises(UnsupportedModelError, match="model_type 'llama'"):
        distill_encoder(EncoderDistillConfig(steps=0), llm, [], tmp_path / "s", tmp_path / "r")
