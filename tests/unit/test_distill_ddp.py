"""Distillation under torchrun: 2 CPU processes (gloo) train the same student as one process.

The global batch is split across ranks and DDP averages the gradients, so with equal shards the
data-parallel run computes the same update as a single process; only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.distill import KDConfig, distill
from tests.tiny import CORPUS, make_tiny_llm

CFG = {"student_layers": 2, "steps": 3, "batch_size": 4, "seq_len": 16, "checkpoint_every": 3, "lr": 3e-3,
       "hidden_weight": 1.0, "progress": False}


def test_distill_under_torchrun_with_two_cpu_ranks_matches_a_single_process_run(tmp_path):
    import torch
    from safetensors.torch import load_file

    teacher = make_tiny_llm(tmp_path / "teacher", layers=4)
    texts = tmp_path / "train.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 8))
    single = distill(KDConfig(**CFG), teacher, CORPUS * 8, tmp_path / "one", tmp_path / "r1")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
         "-m", "tasks.distill", "--teacher", str(teacher), "--texts", str(texts), "--out", str(tmp_path / "two"),
         "--resume-dir", str(tmp_path / "r2"), "--config", json.dumps(CFG)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, "only rank 0 reports"
    ddp = json.loads((tmp_path / "two" / "trimflow_distill.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["tokens_seen"] == single["tokens_seen"] == 3 * 4 * 16
    assert json.loads((tmp_path / "two" / "config.json").read_text()) == \
        json.loads((tmp_path / "one" / "config.json").read_text())
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-3, msg=k)
    assert [x[1] for x in ddp["loss_curve"]] == pytest.approx([x[1] for x in single["loss_curve"]], rel=1e-4)
    assert (tmp_path / "r2" / "checkpoint.pt").is_file()
