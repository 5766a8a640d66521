"""Pieces of the benchmarks that can be wrong without any benchmark failing: the bytes a decode step
reads from a Hugging Face folder, and the GPU distillation script (run here on the CPU, tiny model)."""

from __future__ import annotations

import json

import pytest

from tests.tiny import CORPUS, make_tiny_llm


@pytest.mark.parametrize("tied", [True, False])
def test_hf_weight_bytes_count_an_untied_embedding_as_one_row_per_token(tmp_path, tied: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.bench_llm import _hf_weight_bytes_per_token

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    stored = 4 * sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())  # tied: the table once
    table = 100 * 16 * 4
    # Tied: the LM head reads the whole table every token. Untied: the input side reads one row.
    assert _hf_weight_bytes_per_token(tmp_path) == (stored if tied else stored - table + 16 * 4)


def test_gpu_distill_script_reports_teacher_and_students_and_skips_what_the_budget_cannot_hold(tmp_path) -> None:
    from benchmarks import gpu_distill

    teacher = make_tiny_llm(tmp_path / "tiny", layers=3)
    data = tmp_path / "data"
    data.mkdir()
    for split, texts in (("train", CORPUS * 4), ("eval", CORPUS * 4)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "gpu.json"
    args = ["--source", str(teacher), "--data", str(data), "--out", str(out), "--batch", "2", "--seq-len", "32",
            "--windows", "2", "--window-len", "32", "--student", "2:2", "--student", "1:100000"]
    assert gpu_distill.main(args + ["--budget-s", "600"]) == 0
    r = json.loads(out.read_text())
    assert r["teacher"]["quality"] > 1 and r["teacher"]["quality_fp16"] > 1
    first = r["students"]["2:2"]
    assert first["student_layers"] == 2 and first["tokens_seen"] == 2 * 2 * 32
    assert first["quality_ratio"] == pytest.approx(first["quality"] / r["teacher"]["quality"], rel=1e-3)
    assert "would pass the 600 s budget" in r["students"]["1:100000"]["skipped"]
    assert r["best"]["student_layers"] == 2
