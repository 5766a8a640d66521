"""Structured MLP pruning on the tiny random Llama: real shape changes, ranking, errors."""

from __future__ import annotations

import json

import pytest

from tasks.config import PruneConfig
from tasks.errors import ConfigError, UnsupportedModelError
from tasks.prune import kept_neurons, prune_mlp
from tests.tiny import CORPUS, make_tiny_encoder, make_tiny_llm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("prune") / "tiny", layers=2, intermediate=64)


def test_prune_mlp_shrinks_every_layer_and_the_saved_model_runs(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned"
    result = prune_mlp(PruneConfig(mlp_ratio=0.25), tiny, out)  # no texts: the built-in calibration set

    assert result["intermediate_before"] == 64 and result["intermediate_after"] == 48
    assert result["params_after"] < result["params_before"]
    assert result["size_bytes_after"] < result["size_bytes_before"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    assert result["calibration_source"] == "builtin" and result["calibration_tokens"] == 1024
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        assert tuple(layer.mlp.gate_proj.weight.shape) == (48, 32)
        assert tuple(layer.mlp.up_proj.weight.shape) == (48, 32)
        assert tuple(layer.mlp.down_proj.weight.shape) == (32, 48)
    # Parameters removed: 2 layers × 16 neurons × (gate row + up row + down column) × hidden 32.
    assert result["params_before"] - result["params_after"] == 2 * 16 * 3 * 32
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The city council voted")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def _model_with_decoys(path):
    """A one-layer tiny Llama whose MLP neurons 3, 17, 40, 63 have huge weights but never fire.

    The MLP's input norm zeroes channel 0, and the decoys read only channel 0: large weight norms,
    zero activation. Weight-norm ranking keeps them; activation ranking must drop them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = make_tiny_llm(path, layers=1, intermediate=64)
    model = AutoModelForCausalLM.from_pretrained(src)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.post_attention_layernorm.weight[0] = 0.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[DECOYS] = 0.0
            proj.weight[DECOYS, 0] = 100.0
    model.save_pretrained(src)
    return src


DECOYS = [3, 17, 40, 63]


def test_prune_mlp_by_weight_norms_keeps_the_largest_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = _model_with_decoys(tmp_path / "src")
    down_before = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()

    result = prune_mlp(PruneConfig(mlp_ratio=60 / 64, importance="weight"), src, tmp_path / "out")

    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert torch.equal(kept, down_before[:, DECOYS])
    assert result["calibration_source"] is None and result["calibration_tokens"] == 0


def test_prune_mlp_by_activation_drops_neurons_that_never_fire(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = _model_with_decoys(tmp_path / "src")
    down_before = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()

    result = prune_mlp(PruneConfig(mlp_ratio=0.5, calib_tokens=200), src, tmp_path / "out", calib_texts=CORPUS)

    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].mlp.down_proj.weight
    assert kept.shape[1] == 32
    for j in DECOYS:
        assert not any(torch.equal(kept[:, k], down_before[:, j]) for k in range(kept.shape[1]))
    assert result["calibration_source"] == "caller" and result["calibration_tokens"] == 200


def test_prune_mlp_raises_config_error_before_work_when_ratio_leaves_no_neuron(tiny, tmp_path):
    with pytest.raises(ConfigError, match="prune.mlp_ratio"):
        prune_mlp(PruneConfig(mlp_ratio=0.995), tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kept_neurons_rounds_to_nearest_and_never_returns_zero():
    assert kept_neurons(1536, 0.25) == 1152
    assert kept_neurons(10, 0.94) == 1
    with pytest.raises(ConfigError):
        kept_neurons(10, 0.96)


def test_prune_mlp_raises_unsupported_model_error_for_an_encoder(tmp_path):
    enc = make_tiny_encoder(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        prune_mlp(PruneConfig(), enc, tmp_path / "out")
