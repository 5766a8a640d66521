"""Distillation on the tiny random Llama: layer selection, KD training, checkpoint/resume, errors."""

from __future__ import annotations

import json

import pytest

from tasks import distill as distill_mod
from tasks.config import DistillConfig
from tasks.distill import batch_indices, distill, kd_loss, select_layers
from tasks.errors import ConfigError, UnsupportedModelError
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm

TEXTS = CORPUS * 8
SMALL = dict(student_layers=2, batch_size=2, seq_len=16, checkpoint_every=2, lr=3e-3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("teacher") / "tiny", layers=4)


def test_select_layers_spreads_evenly_and_keeps_first_and_last():
    assert select_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(1, 1) == [0]


@pytest.mark.parametrize("teacher_layers,student_layers", [(4, 5), (4, 1)])
def test_select_layers_raises_config_error_when_student_does_not_fit(teacher_layers, student_layers):
    with pytest.raises(ConfigError, match="distill.student_layers"):
        select_layers(teacher_layers, student_layers)


def test_batch_indices_are_a_seeded_permutation_per_epoch():
    epoch = [i for s in range(5) for i in batch_indices(s, 2, 10, seed=7)]
    assert sorted(epoch) == list(range(10))
    assert epoch != list(range(10))
    assert batch_indices(3, 2, 10, seed=7) == batch_indices(3, 2, 10, seed=7)
    assert batch_indices(0, 2, 10, seed=7) != batch_indices(0, 2, 10, seed=8)


def test_kd_loss_is_the_weighted_sum_of_scaled_kl_and_next_token_ce():
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    loss, kl, ce = kd_loss(s, t, ids, temperature=2.0, alpha_ce=0.25)

    p_t = F.softmax(t / 2, -1)
    manual_kl = (p_t * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    manual_ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert kl.item() == pytest.approx(manual_kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(manual_ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.75 * manual_kl.item() + 0.25 * manual_ce.item(), rel=1e-5)
    assert kd_loss(t, t, ids, 2.0, 0.0)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_distill_with_zero_steps_saves_the_layer_selected_student(teacher, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    result = distill(DistillConfig(**SMALL, steps=0), teacher, [], out, tmp_path / "resume")

    assert result["layer_map"] == [0, 3]
    assert result["steps"] == 0 and result["student_layers"] == 2 and result["teacher_layers"] == 4
    assert result["num_parameters"] < result["teacher_parameters"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    AutoTokenizer.from_pretrained(out)
    t = AutoModelForCausalLM.from_pretrained(teacher).state_dict()
    s = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(s[f"model.layers.1.{k}"], t[f"model.layers.3.{k}"])
        assert torch.equal(s[f"model.layers.0.{k}"], t[f"model.layers.0.{k}"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert not (tmp_path / "resume" / distill_mod.CHECKPOINT).exists()


def test_distill_loss_decreases_on_repeated_text(teacher, tmp_path):
    result = distill(DistillConfig(**SMALL, steps=16, alpha_ce=0.5), teacher, TEXTS, tmp_path / "out",
                     tmp_path / "resume")

    assert result["steps"] == 16 and result["resumed_from_step"] == 0
    curve = [loss for _, loss in result["loss_curve"]]
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3
    assert result["tokens_seen"] == 16 * 2 * 16
    assert result["seconds_per_step"] > 0
    assert json.loads((tmp_path / "out" / distill_mod.RESULT_FILE).read_text())["layer_map"] == [0, 3]


class _Killed(BaseException):
    """Stands in for the worker being killed right after a checkpoint was written."""


def test_distill_resumes_from_last_checkpoint_when_killed(teacher, tmp_path, monkeypatch):
    cfg = DistillConfig(**SMALL, steps=6)
    straight = distill(cfg, teacher, TEXTS, tmp_path / "a", tmp_path / "resume-a")

    real_save = distill_mod._save_checkpoint

    def save_then_die(train):
        real_save(train)
        if train.step == 4:
            raise _Killed()

    monkeypatch.setattr(distill_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        distill(cfg, teacher, TEXTS, tmp_path / "b", tmp_path / "resume-b")
    monkeypatch.setattr(distill_mod, "_save_checkpoint", real_save)
    resumed = distill(cfg, teacher, TEXTS, tmp_path / "b", tmp_path / "resume-b")

    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    # Same batches, optimizer and schedule state: the resumed run ends where the straight one did.
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-4)
    assert resumed["avg_loss"] == pytest.approx(straight["avg_loss"], rel=1e-4)

    again = distill(cfg, teacher, TEXTS, tmp_path / "c", tmp_path / "resume-b")
    assert again["resumed_from_step"] == 6 and again["final_loss"] == resumed["final_loss"]


def test_distill_raises_config_error_when_checkpoint_is_from_another_run(teacher, tmp_path):
    distill(DistillConfig(**SMALL, steps=2), teacher, TEXTS, tmp_path / "a", tmp_path / "resume")
    with pytest.raises(ConfigError, match="different run"):
        distill(DistillConfig(**{**SMALL, "lr": 1e-3}, steps=2), teacher, TEXTS, tmp_path / "b", tmp_path / "resume")


def test_distill_raises_config_error_when_texts_are_shorter_than_a_window(teacher, tmp_path):
    with pytest.raises(ConfigError, match="distill.seq_len"):
        distill(DistillConfig(**{**SMALL, "seq_len": 512}, steps=2), teacher, ["short text"], tmp_path / "o",
                tmp_path / "r")
    with pytest.raises(ConfigError, match="train_texts"):
        distill(DistillConfig(**SMALL, steps=2), teacher, [], tmp_path / "o", tmp_path / "r")


def test_distill_raises_unsupported_model_error_for_an_encoder(tmp_path):
    enc = make_tiny_encoder(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        distill(DistillConfig(**SMALL, steps=0), enc, [], tmp_path / "o", tmp_path / "r")


# -- issue 3: student source, depth/width forms, transfer losses, accumulation ------------------
def test_kd_config_raises_when_both_depth_forms_are_given():
    from pydantic import ValidationError

    from tasks.distill import KDConfig

    with pytest.raises(ValidationError, match="not both"):
        KDConfig(student_layers=2, layer_ratio=0.5)


def test_student_depth_applies_layer_ratio_and_skips_selection_when_source_is_not_deeper():
    from tasks.distill import KDConfig, student_depth

    assert student_depth(KDConfig(layer_ratio=0.5), 30) == 15
    assert student_depth(KDConfig(student_layers=24), 30) == 24
    assert student_depth(KDConfig(student_layers=24), 20) == 20  # src already shallower: kept as is
    assert student_depth(KDConfig(), 30) == 30
    with pytest.raises(ConfigError, match="distill.layer_ratio"):
        student_depth(KDConfig(layer_ratio=0.01), 30)


def test_lr_lambda_follows_the_named_schedule_after_warmup():
    from tasks.distill import lr_lambda

    for schedule, end in (("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)):
        f = lr_lambda(10, 0.2, schedule)
        assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
        assert f(10) == pytest.approx(end)  # the end of the run: 10% of the peak, or the peak
    assert lr_lambda(10, 0.2, "linear")(5) > lr_lambda(10, 0.2, "linear")(8)


def test_distill_narrows_every_tensor_consistently_and_the_student_reloads(teacher, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.distill import KDConfig

    cfg = KDConfig(**{**SMALL, "student_layers": None}, layer_ratio=0.5, hidden_ratio=0.5, intermediate_ratio=0.5,
                   head_ratio=0.5, steps=0)
    result = distill(cfg, teacher, TEXTS, tmp_path / "s", tmp_path / "r")

    conf = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (conf["num_hidden_layers"], conf["hidden_size"], conf["intermediate_size"]) == (2, 16, 32)
    assert (conf["num_attention_heads"], conf["num_key_value_heads"], conf["head_dim"]) == (2, 1, 8)
    s = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    t = AutoModelForCausalLM.from_pretrained(teacher)
    ch = torch.tensor(result["hidden_channels"])
    assert len(ch) == 16 and result["num_parameters"] < result["teacher_parameters"] / 3
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight[:, ch])
    assert torch.equal(s.model.norm.weight, t.model.norm.weight[ch])
    assert s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()  # still tied
    sl, tl = s.model.layers[1], t.model.layers[3]
    assert torch.equal(sl.input_layernorm.weight, tl.input_layernorm.weight[ch])
    # One KV group kept (8 k rows) with its 2 query heads (16 q rows); input columns = kept channels
    kv = 8 * int(torch.equal(sl.self_attn.k_proj.weight[:, :3], tl.self_attn.k_proj.weight[8:, ch[:3]]))
    assert torch.equal(sl.self_attn.k_proj.weight, tl.self_attn.k_proj.weight[kv:kv + 8][:, ch])
    assert tuple(sl.self_attn.q_proj.weight.shape) == (16, 16) and tuple(sl.self_attn.o_proj.weight.shape) == (16, 16)
    assert tuple(sl.mlp.down_proj.weight.shape) == (16, 32)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    assert torch.isfinite(s(input_ids=ids).logits).all()
    assert s.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)  # KV cache with the new shapes


def test_distill_starts_from_src_and_keeps_its_depth_when_it_is_shallower(teacher, tmp_path):
    from tasks.distill import KDConfig, LAYER_MAP_FILE

    first = distill(KDConfig(**SMALL, steps=0), teacher, [], tmp_path / "two", tmp_path / "r1")  # layers [0, 3]
    result = distill(KDConfig(**{**SMALL, "student_layers": 3}, steps=2), teacher, TEXTS, tmp_path / "out",
                     tmp_path / "r2", src_dir=tmp_path / "two")

    assert first["teacher_layer_map"] == [0, 3]
    assert result["src_layers"] == 2 and result["student_layers"] == 2 and result["layer_map"] == [0, 1]
    # The source's lineage is read back, so its layer 1 is compared with teacher layer 3.
    assert result["teacher_layer_map"] == [0, 3]
    assert json.loads((tmp_path / "out" / LAYER_MAP_FILE).read_text()) == {"teacher_layers": 4, "map": [0, 3]}
    assert result["src_parameters"] < result["teacher_parameters"]


def test_distill_hidden_state_loss_decreases_when_transfer_is_on(teacher, tmp_path):
    from tasks.distill import KDConfig

    # One sentence (5 windows) and alpha_ce=0: the curve then reflects training, not batch-to-batch
    # noise or a hard-label term that on a random teacher would dominate and move the states.
    cfg = KDConfig(**{**SMALL, "lr": 1e-3}, steps=10, hidden_weight=1.0, hidden_loss="mse", alpha_ce=0.0)
    result = distill(cfg, teacher, CORPUS[:1], tmp_path / "out", tmp_path / "r")

    assert result["final_hidden"] < 0.5 * result["first_hidden"]
    assert result["final_attention"] is None


def test_distill_hidden_transfer_through_a_learned_projection_when_src_is_already_narrower(teacher, tmp_path):
    from tasks.distill import KDConfig

    distill(KDConfig(**SMALL, steps=0, hidden_ratio=0.5), teacher, TEXTS, tmp_path / "narrow", tmp_path / "r1")
    result = distill(KDConfig(**SMALL, steps=3, hidden_weight=1.0, attention_weight=0.5), teacher, TEXTS,
                     tmp_path / "out", tmp_path / "r2", src_dir=tmp_path / "narrow")

    assert result["hidden_size"] == 16 and result["hidden_channels"] is None
    assert result["final_hidden"] > 0 and result["final_attention"] >= 0
    # The projection only serves the loss: the saved student is a plain 16-wide Llama.
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 16


def test_distill_grad_accumulation_multiplies_the_tokens_per_step(teacher, tmp_path):
    from tasks.distill import KDConfig

    result = distill(KDConfig(**SMALL, steps=2, grad_accum=3), teacher, TEXTS, tmp_path / "out", tmp_path / "r")

    assert result["tokens_seen"] == 2 * 3 * 2 * 16 and result["steps"] == 2


def test_distill_raises_config_error_before_work_when_width_keeps_nothing(teacher, tmp_path):
    from tasks.distill import KDConfig

    with pytest.raises(ConfigError, match="head_ratio"):
        distill(KDConfig(**SMALL, steps=0, head_ratio=0.2), teacher, TEXTS, tmp_path / "o", tmp_path / "r")
    assert not (tmp_path / "o").exists()


def test_distill_technique_trains_src_against_the_context_teacher(teacher, tmp_path):
    from tasks.distill import KDConfig, TECHNIQUES
    from tasks.technique import StepContext

    distill(KDConfig(**SMALL, steps=0), teacher, [], tmp_path / "src", tmp_path / "r0")
    ctx = StepContext(kind="causal_lm", teacher_dir=teacher, texts=lambda split: TEXTS, resume_dir=tmp_path / "r")
    result = TECHNIQUES[0].run(KDConfig(**SMALL, steps=1), tmp_path / "src", tmp_path / "out", ctx)

    assert result["teacher_layers"] == 4 and result["src_layers"] == 2
    assert (tmp_path / "r" / distill_mod.CHECKPOINT).is_file()
