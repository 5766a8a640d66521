"""Structured pruning of Llama-style decoders: tensors and config really shrink.

Four techniques, each ranking units on calibration text (or by weight magnitude) and writing a
plain HF folder that loads, exports and serves like the original:

- ``prune_mlp``: MLP neurons, the same count in every layer (``intermediate_size`` stays one int).
- ``prune_heads``: attention heads, GQA-aware (whole KV groups, or the same number of query heads
  in every group), the same count in every layer (HF configs hold one head count).
- ``prune_layers``: whole decoder layers (block influence, angular distance or Taylor).
- ``sparsity_2_4``: 2 of every 4 weights of the decoder's linear maps zeroed (dense storage; a
  speedup needs GPU semi-structured sparse kernels, never on CPU).

Importance is ``magnitude`` (weights only), ``activation`` (output energy on calibration text) or
``taylor`` (first-order estimate |Σ a·∂L/∂a| of the loss change when the unit is removed). Weight
norms alone are a poor guide in LLMs whose few "massive activation" neurons have unremarkable
weights (SmolLM2-135M, 10% of MLP neurons: perplexity 39 -> 48 activation-aware, -> 16,000 by
weight norms). ``recovery_steps`` runs a short distillation of the pruned model against the teacher.

    result = prune_heads(PruneHeadsConfig(head_ratio=1/3, recovery_steps=50), model_dir, out_dir,
                         calib_texts=calib, teacher_dir=teacher, train_texts=train)
    result["heads_after"], result["calib_ppl_after"], result["recovery"]["final_loss"]
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from tasks.builtin_texts import BUILTIN_TEXTS
from tasks.config import PruneConfig, _Frozen
from tasks.distill import KDConfig, build_student, distill, read_layer_map, write_layer_map
from tasks.errors import ConfigError, UnsupportedModelError
from tasks.modelio import (available_cores, copy_tokenizer, count_parameters, require_causal_lm, torch_threads,
                           weights_size_bytes)
from tasks.technique import Technique

log = logging.getLogger(__name__)

RESULT_FILE = "trimflow_prune.json"
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMPORTANCE_RULES = {
    "activation": "l2(neuron activation over calibration tokens) * l2(down_proj column)",
    "weight": "l2(gate_proj row) * l2(up_proj row) * l2(down_proj column)",
    "taylor": "sum over calibration chunks of |sum over tokens of activation * dLoss/dactivation|",
}
HEAD_RULES = {
    "activation": "l2 of the head's output through o_proj over calibration tokens",
    "magnitude": "l2(q_proj rows of the head) * l2(o_proj columns of the head)",
    "taylor": "sum over calibration chunks of |sum over tokens of head output * dLoss/dhead output|",
}
LAYER_RULES = {
    "block_influence": "1 - mean cosine(layer input, layer output) over calibration tokens (ShortGPT)",
    "angular": "contiguous block with the smallest mean arccos(cos(h_l, h_l+n))/pi (Gromov et al.)",
    "taylor": "sum over calibration chunks of |sum over tokens of (input - output) * dLoss/doutput|",
}
SPARSITY_RULES = {
    "magnitude": "|w|, 2 largest of every 4 consecutive input weights kept",
    "wanda": "|w| * l2(input feature over calibration tokens) (Wanda), 2 of every 4 kept",
}


# -- configs -----------------------------------------------------------------------------------
class _Recovery(_Frozen):
    """Fields every pruning technique shares: an optional recovery distillation after pruning.

    Args:
        recovery_steps: optimizer steps of KD of the pruned model against the teacher (the recipe's
            teacher, else the model before pruning) on the training split (default 0: none).
        recovery: further ``tasks.distill.KDConfig`` settings of that run; structure fields
            (layers, width) are not allowed (default None: KDConfig defaults with ``lr`` 1e-4).
    """

    recovery_steps: int = Field(0, ge=0)
    recovery: KDConfig | None = None

    @field_validator("recovery")
    @classmethod
    def _recovery_keeps_structure(cls, v: KDConfig | None) -> KDConfig | None:
        if v is not None and v.changes_structure:
            raise ValueError("a recovery distillation keeps the pruned structure: no student_layers, "
                             "layer_ratio or width ratios")
        return v

    def recovery_config(self) -> KDConfig:
        base = self.recovery.model_dump() if self.recovery is not None else {"lr": 1e-4}
        return KDConfig.model_validate({**base, "steps": self.recovery_steps})


class PruneMlpConfig(PruneConfig, _Recovery):
    """``prune_mlp``: ``tasks.config.PruneConfig`` (``mlp_ratio`` removed per layer, default 0.1;
    ``calib_tokens`` default 1024) plus Taylor importance and recovery.

    Args:
        importance: ``activation`` (default), ``weight`` (alias ``magnitude``) or ``taylor``.
    """

    importance: Literal["activation", "weight", "taylor"] = "activation"

    @field_validator("importance", mode="before")
    @classmethod
    def _magnitude_is_weight(cls, v: Any) -> Any:
        return "weight" if v == "magnitude" else v


class PruneHeadsConfig(_Recovery):
    """``prune_heads``: attention heads removed in every layer.

    Args:
        head_ratio: fraction of query heads removed in every layer (default 0.25, rounded to what
            the granularity allows).
        granularity: ``kv_group`` removes whole KV groups with their query heads (k/v projections
            and the KV cache shrink too); ``query_per_group`` removes the same number of query heads
            from every KV group (KV heads and cache stay) (default kv_group: on SmolLM2-135M, 9 query /
            3 KV heads, removing 1/3 of the query heads cost 2.0x held-out perplexity as whole groups
            and 4.0x as one head per group, and whole groups remove more parameters and cache).
        importance: ``activation`` (default), ``magnitude`` or ``taylor``.
        calib_tokens: calibration tokens (default 1024).
    """

    head_ratio: float = Field(0.25, ge=0, lt=1)
    granularity: Literal["kv_group", "query_per_group"] = "kv_group"
    importance: Literal["activation", "magnitude", "taylor"] = "activation"
    calib_tokens: int = Field(1024, ge=16)


class PruneLayersConfig(_Recovery):
    """``prune_layers``: whole decoder layers removed.

    Args:
        layer_ratio: fraction of decoder layers removed (default 0.1, rounded).
        importance: ``block_influence`` (default), ``angular`` (one contiguous block) or ``taylor``.
        calib_tokens: calibration tokens (default 1024).
    """

    layer_ratio: float = Field(0.1, ge=0, lt=1)
    importance: Literal["block_influence", "angular", "taylor"] = "block_influence"
    calib_tokens: int = Field(1024, ge=16)


class Sparsity24Config(_Recovery):
    """``sparsity_2_4``: 2:4 semi-structured sparsity of the decoder's linear maps.

    Args:
        importance: ``magnitude`` (default) or ``wanda`` (|w| times the input feature's norm on
            calibration text).
        targets: linear maps sparsified in every layer (default all of q/k/v/o and gate/up/down).
        calib_tokens: calibration tokens for ``wanda`` and the quality probe (default 1024).
    """

    importance: Literal["magnitude", "wanda"] = "magnitude"
    targets: tuple[str, ...] = LINEAR_TARGETS
    calib_tokens: int = Field(1024, ge=16)

    @model_validator(mode="after")
    def _known_targets(self) -> "Sparsity24Config":
        unknown = [t for t in self.targets if t not in LINEAR_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets {list(self.targets)}: each must be one of {list(LINEAR_TARGETS)}")
        return self


# -- counting what is kept (checked on config.json, before any weight is loaded) ---------------
def kept_neurons(intermediate: int, ratio: float) -> int:
    """Neurons each layer keeps when ``ratio`` of ``intermediate`` are removed (rounded to nearest).

    Raises:
        ConfigError: no neuron would be left.
    """
    keep = int(round(intermediate * (1.0 - ratio)))
    if keep < 1:
        raise ConfigError("prune.mlp_ratio", ratio, f"leaves no neuron of {intermediate} in each MLP")
    return keep


def head_layout(conf: dict[str, Any]) -> tuple[int, int, int]:
    """``(query heads, KV heads, head_dim)`` of a config dict."""
    n_q = int(conf["num_attention_heads"])
    n_kv = int(conf.get("num_key_value_heads") or n_q)
    hd = int(conf.get("head_dim") or int(conf["hidden_size"]) // n_q)
    return n_q, n_kv, hd


def kept_heads(conf: dict[str, Any], ratio: float, granularity: str) -> tuple[int, int]:
    """``(query heads, KV heads)`` left in every layer after removing ``ratio`` of the query heads.

    Raises:
        ConfigError: every head (or every head of a group) would be removed.
    """
    n_q, n_kv, _ = head_layout(conf)
    per_group = n_q // n_kv
    if granularity == "kv_group":
        groups = int(round(n_kv * (1.0 - ratio)))
        if groups < 1:
            raise ConfigError("prune_heads.head_ratio", ratio, f"removes all {n_kv} KV groups of every layer")
        return groups * per_group, groups
    keep = int(round(per_group * (1.0 - ratio)))
    if keep < 1:
        hint = " (one query head per KV head: use granularity kv_group)" if per_group == 1 else ""
        raise ConfigError("prune_heads.head_ratio", ratio,
                          f"removes all {per_group} query heads of every KV group{hint}")
    return keep * n_kv, n_kv


def kept_layers(n_layers: int, ratio: float) -> int:
    """Decoder layers left after removing ``ratio`` of ``n_layers`` (rounded).

    Raises:
        ConfigError: no layer would be left.
    """
    keep = n_layers - int(round(n_layers * ratio))
    if keep < 1:
        raise ConfigError("prune_layers.layer_ratio", ratio, f"removes all {n_layers} decoder layers")
    return keep


def check_width(conf: dict[str, Any], cfg: KDConfig) -> dict[str, int]:
    """Sizes of a student narrowed by ``cfg``'s width ratios; raises before any work if one is empty.

    Raises:
        ConfigError: a ratio keeps no hidden channel, neuron or KV group.
    """
    n_q, n_kv, _ = head_layout(conf)
    sizes = {"hidden_size": int(round(int(conf["hidden_size"]) * cfg.hidden_ratio)),
             "intermediate_size": int(round(int(conf["intermediate_size"]) * cfg.intermediate_ratio)),
             "kv_heads": int(round(n_kv * cfg.head_ratio))}
    for (name, size), field in zip(sizes.items(), ("hidden_ratio", "intermediate_ratio", "head_ratio")):
        if size < 1:
            raise ConfigError(f"distill.{field}", getattr(cfg, field), f"keeps no unit of {name}")
    return sizes


# -- calibration -------------------------------------------------------------------------------
def calibration_stream(tokenizer, texts: Sequence[str], max_tokens: int) -> list[int]:
    """The first ``max_tokens`` token ids of ``texts`` joined by EOS.

    Raises:
        ConfigError: the texts hold fewer than 2 tokens.
    """
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if len(stream) < 2:
        raise ConfigError("calib_texts", len(texts), "calibration texts hold fewer than 2 tokens")
    return stream


def _chunks(stream: Sequence[int], chunk: int):
    import torch

    for start in range(0, len(stream), chunk):
        piece = stream[start:start + chunk]
        if len(piece) >= 2:
            yield torch.tensor([piece])


def _calibrate(model, stream: Sequence[int], grad: bool, chunk: int = 256) -> float:
    """Run ``model`` over ``stream`` in chunks (with a backward pass of the LM loss if ``grad``).

    Hooks registered by the caller see every forward (and, with ``grad``, backward) pass. Only
    activations carry gradients: parameters are frozen for the pass, so no weight gradient is
    accumulated. Returns the perplexity of the stream.
    """
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for ids in _chunks(stream, chunk):
            if grad:
                with torch.enable_grad():
                    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    logits = model(inputs_embeds=emb, use_cache=False).logits
                    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                    loss.backward()
            else:
                with torch.inference_mode():
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            nll += float(loss.detach()) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return math.exp(nll / max(1, count))


class _Hooks:
    """Registered hooks, removed on exit."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def __enter__(self) -> "_Hooks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


# -- importance --------------------------------------------------------------------------------
def _accumulate(acc, i: int, term: Callable[[Any], Any]):
    """A tensor gradient hook adding ``term(grad)`` to ``acc[i]``; it returns None, so the gradient is untouched."""

    def hook(grad) -> None:
        acc[i] += term(grad)
    return hook


def weight_importance(mlp):
    """Data-free importance of each intermediate neuron of a gated MLP: ``‖g_j‖·‖u_j‖·‖d_j‖``.

    Neuron ``j`` adds ``d_j · act(g_j·x) · (u_j·x)`` to the output, where ``g_j`` and ``u_j`` are rows
    of gate_proj and up_proj and ``d_j`` a column of down_proj; for an input of a given norm that
    is bounded by (and, for SiLU in its near-linear range, scales with) the product of the norms.
    """
    g = mlp.gate_proj.weight.detach().float().norm(dim=1)
    u = mlp.up_proj.weight.detach().float().norm(dim=1)
    d = mlp.down_proj.weight.detach().float().norm(dim=0)
    return g * u * d


def mlp_importance(model, method: str, stream: Sequence[int]):
    """One score per MLP neuron per layer (higher = keep).

    ``activation``: ``‖a_j‖₂·‖d_j‖₂`` — exactly the Frobenius norm of what neuron ``j`` adds to the
    residual stream on the calibration text. ``taylor``: Σ over chunks of |Σ_tokens a_j·∂L/∂a_j|,
    the first-order change of the LM loss when the neuron is zeroed. ``weight``: data-free norms.
    """
    import torch

    layers = model.model.layers
    if method == "weight":
        return [weight_importance(layer.mlp) for layer in layers]
    acc = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]

    def pre(i):
        def f(_module, inputs):
            a = inputs[0]
            if method == "activation":
                acc[i] += a.detach().double().pow(2).sum(dim=(0, 1))
            elif a.requires_grad:
                a.register_hook(_accumulate(acc, i, lambda g, a=a.detach(): (a * g).double().sum(dim=(0, 1)).abs()))
        return f

    with _Hooks() as hooks:
        hooks.handles += [layer.mlp.down_proj.register_forward_pre_hook(pre(i)) for i, layer in enumerate(layers)]
        _calibrate(model, stream, grad=method == "taylor")
    if method == "activation":
        return [a.sqrt().float() * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
                for a, layer in zip(acc, layers)]
    return [a.float() for a in acc]


def head_importance(model, method: str, stream: Sequence[int]):
    """One score per query head per layer (higher = keep); see ``HEAD_RULES``."""
    import torch

    layers = model.model.layers
    n_q, _, hd = head_layout(model.config.to_dict())
    if method == "magnitude":
        out = []
        for layer in layers:
            q = layer.self_attn.q_proj.weight.detach().float().view(n_q, hd, -1).flatten(1).norm(dim=1)
            o = layer.self_attn.o_proj.weight.detach().float().view(-1, n_q, hd).transpose(0, 1).flatten(1).norm(dim=1)
            out.append(q * o)
        return out
    acc = [torch.zeros(n_q, dtype=torch.float64) for _ in layers]

    def pre(i, o_proj):
        def f(_module, inputs):
            x = inputs[0]
            heads = x.detach().view(*x.shape[:-1], n_q, hd)
            if method == "activation":
                w = o_proj.weight.detach().view(-1, n_q, hd)
                # the head's share of o_proj's output: heads[..., h, :] @ w[:, h, :].T
                y = torch.einsum("bshd,ohd->bsho", heads, w)
                acc[i] += y.double().pow(2).sum(dim=(0, 1, 3))
            elif x.requires_grad:
                x.register_hook(_accumulate(acc, i, lambda g, h=heads: (h * g.view_as(h)).double().sum(dim=(0, 1, 3)).abs()))
        return f

    with _Hooks() as hooks:
        hooks.handles += [layer.self_attn.o_proj.register_forward_pre_hook(pre(i, layer.self_attn.o_proj))
                          for i, layer in enumerate(layers)]
        _calibrate(model, stream, grad=method == "taylor")
    return [a.sqrt().float() if method == "activation" else a.float() for a in acc]


def layer_importance(model, method: str, stream: Sequence[int], n_remove: int) -> tuple[list[int], list[float]]:
    """Which ``n_remove`` decoder layers to drop, and every layer's (or block start's) score.

    ``block_influence`` and ``taylor`` score each layer (lowest removed); ``angular`` scores each
    contiguous block of ``n_remove`` layers by its start and removes the closest-to-identity block.
    """
    import torch
    import torch.nn.functional as F

    layers = model.model.layers
    n = len(layers)
    acc = torch.zeros(n, dtype=torch.float64)
    tokens = [0]
    states: list[list[Any]] = [[] for _ in range(n + 1)]  # angular: hidden state at every layer boundary

    def hook(i):
        def f(_module, args, kwargs, output):
            h_in = _layer_input(args, kwargs).detach()
            h_out = output[0] if isinstance(output, tuple) else output
            if method == "block_influence":
                acc[i] += (1 - F.cosine_similarity(h_in.double(), h_out.detach().double(), dim=-1)).sum()
                if i == 0:
                    tokens[0] += h_in.shape[0] * h_in.shape[1]
            elif method == "angular":
                states[i].append(h_in.double().flatten(0, 1))
                if i == n - 1:
                    states[n].append(h_out.detach().double().flatten(0, 1))
            elif h_out.requires_grad:
                h_out.register_hook(_accumulate(acc, i, lambda g, d=h_in - h_out.detach(): (d * g).double().sum().abs()))
        return f

    with _Hooks() as hooks:
        hooks.handles += [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        _calibrate(model, stream, grad=method == "taylor")
    if method == "angular":
        bounds = [torch.cat(s) for s in states]
        scores = []
        for start in range(n - n_remove + 1):
            cos = F.cosine_similarity(bounds[start], bounds[start + n_remove], dim=-1).clamp(-1, 1)
            scores.append(float(torch.arccos(cos).mean() / math.pi))
        best = min(range(len(scores)), key=scores.__getitem__)
        return list(range(best, best + n_remove)), scores
    scores = (acc / max(1, tokens[0])).tolist() if method == "block_influence" else acc.tolist()
    removed = sorted(sorted(range(n), key=scores.__getitem__)[:n_remove])
    return removed, scores


def hidden_importance(model, stream: Sequence[int]):
    """One score per hidden channel: its energy in the outputs of every RMSNorm (Minitron's rule)."""
    import torch

    acc = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def f(_module, _inputs, output):
        acc.add_(output.detach().double().pow(2).sum(dim=(0, 1)))

    norms = [model.model.norm]
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    with _Hooks() as hooks:
        hooks.handles += [m.register_forward_hook(f) for m in norms]
        _calibrate(model, stream, grad=False)
    return acc.sqrt().float()


def input_norms(model, stream: Sequence[int], targets: Sequence[str]) -> dict[str, Any]:
    """``module name -> l2 norm of each input feature`` over the calibration tokens (for Wanda)."""
    import torch

    acc: dict[str, Any] = {}

    def pre(name):
        def f(_module, inputs):
            x = inputs[0].detach().double()
            acc[name] = acc.get(name, 0) + x.pow(2).sum(dim=(0, 1))
        return f

    with _Hooks() as hooks:
        for name, module in _target_linears(model, targets):
            hooks.handles.append(module.register_forward_pre_hook(pre(name)))
        _calibrate(model, stream, grad=False)
    return {k: torch.as_tensor(v).sqrt().float() for k, v in acc.items()}


def _target_linears(model, targets: Sequence[str]):
    for i, layer in enumerate(model.model.layers):
        for part in ("self_attn", "mlp"):
            block = getattr(layer, part)
            for t in targets:
                if hasattr(block, t):
                    yield f"model.layers.{i}.{part}.{t}", getattr(block, t)


# -- shrinking ---------------------------------------------------------------------------------
def check_structure(model, where: str) -> None:
    """Raise ``UnsupportedModelError`` unless every layer has q/k/v/o attention and a gated MLP."""
    for i, layer in enumerate(model.model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedModelError(f"{where}: layer {i} has no q/k/v/o attention projections")
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedModelError(f"{where}: layer {i} has no gated MLP (gate_proj/up_proj/down_proj)")


def _head_rows(heads, head_dim: int):
    import torch

    return (torch.as_tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None]).flatten()


def shrink(model, *, mlp: Sequence[Any] | None = None, heads: Sequence[tuple[Any, Any]] | None = None,
           hidden: Any | None = None):
    """A new model with only the kept units, every tensor sliced consistently and the config updated.

    Args:
        model: a Llama-style ``*ForCausalLM``.
        mlp: per layer, the sorted MLP neuron indices kept (same count in every layer) (default None).
        heads: per layer, ``(query heads kept, KV heads kept)`` sorted index tensors; query head
            ``h`` belongs to KV head ``h // (heads / kv_heads)`` (default None).
        hidden: sorted hidden-channel indices kept: embeddings, every norm, q/k/v inputs, o outputs,
            MLP inputs/outputs and lm_head (default None).

    Raises:
        UnsupportedModelError: a tensor of the model does not take the new shapes (an architecture
            with parts this function does not know).
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    n_q, n_kv, hd = head_layout(cfg.to_dict())
    cfg.head_dim = hd  # derived from hidden_size / heads otherwise, which both may change
    if mlp is not None:
        cfg.intermediate_size = int(len(mlp[0]))
    if heads is not None:
        cfg.num_attention_heads, cfg.num_key_value_heads = int(len(heads[0][0])), int(len(heads[0][1]))
    if hidden is not None:
        hidden = torch.as_tensor(hidden)
        cfg.hidden_size = int(len(hidden))

    def cut(t, dim, idx):
        return t if idx is None else t.index_select(dim, torch.as_tensor(idx, device=t.device))

    state = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        parts = key.split(".")
        if key.startswith("model.layers."):
            i, name = int(parts[2]), ".".join(parts[3:])
            q_rows = kv_rows = None
            if heads is not None:
                q_rows, kv_rows = _head_rows(heads[i][0], hd), _head_rows(heads[i][1], hd)
            neurons = mlp[i] if mlp is not None else None
            if name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                t = cut(t, 0, q_rows)
            elif name.split(".")[1] in ("k_proj", "v_proj") and name.startswith("self_attn."):
                t = cut(t, 0, kv_rows)
            elif name == "self_attn.o_proj.weight":
                t = cut(cut(t, 1, q_rows), 0, hidden)
            elif name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias"):
                t = cut(t, 0, neurons)
            elif name == "mlp.down_proj.weight":
                t = cut(cut(t, 1, neurons), 0, hidden)
            elif name in ("self_attn.o_proj.bias", "mlp.down_proj.bias") or (
                    name.endswith("layernorm.weight") and t.dim() == 1):
                t = cut(t, 0, hidden)
            if name.endswith("_proj.weight") and name.split(".")[1] in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                         "up_proj"):
                t = cut(t, 1, hidden)
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            t = cut(t, 1, hidden)
        elif key == "model.norm.weight":
            t = cut(t, 0, hidden)
        state[key] = t.clone()
    new = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    try:
        new.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UnsupportedModelError(f"cannot shrink a {cfg.model_type} model consistently: {str(e)[:500]}") from None
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()


def narrow(student, tokenizer, texts: Sequence[str], cfg: KDConfig):
    """``student`` with ``cfg``'s width ratios applied, ranked by activation on ``texts``.

    Returns the narrowed model and the kept hidden-channel indices (None when the width is kept).
    """
    import torch

    sizes = check_width(student.config.to_dict(), cfg)
    stream = calibration_stream(tokenizer, texts, cfg.width_calib_tokens)
    hidden = mlp = heads = None
    if cfg.hidden_ratio < 1:
        hidden = torch.topk(hidden_importance(student, stream), sizes["hidden_size"]).indices.sort().values
    if cfg.intermediate_ratio < 1:
        mlp = [torch.topk(s, sizes["intermediate_size"]).indices.sort().values
               for s in mlp_importance(student, "activation", stream)]
    if cfg.head_ratio < 1:
        n_q, n_kv, _ = head_layout(student.config.to_dict())
        heads = _heads_to_keep(student, head_importance(student, "activation", stream),
                               sizes["kv_heads"] * (n_q // n_kv), "kv_group")
    return shrink(student, mlp=mlp, heads=heads, hidden=hidden), (hidden.tolist() if hidden is not None else None)


def _heads_to_keep(model, scores, keep_q: int, granularity: str):
    """Per layer ``(query heads, KV heads)`` kept: top whole groups, or the top heads of every group."""
    import torch

    n_q, n_kv, _ = head_layout(model.config.to_dict())
    g = n_q // n_kv
    out = []
    for s in scores:
        by_group = s.view(n_kv, g)
        if granularity == "kv_group":
            groups = torch.topk(by_group.sum(1), keep_q // g).indices.sort().values
            q = (groups[:, None] * g + torch.arange(g)[None]).flatten()
            out.append((q, groups))
        else:
            k = keep_q // n_kv
            within = torch.topk(by_group, k, dim=1).indices.sort(dim=1).values
            q = (torch.arange(n_kv)[:, None] * g + within).flatten()
            out.append((q, torch.arange(n_kv)))
    return out


def apply_2_4(model, targets: Sequence[str], norms: dict[str, Any] | None = None) -> dict[str, Any]:
    """Zero 2 of every 4 consecutive input weights of each target linear map, in place.

    Scores are ``|w|``, times the input feature's calibration norm when ``norms`` is given (Wanda).
    Maps whose input width is not a multiple of 4 are left dense and listed in ``skipped``.
    """
    import torch

    done, skipped, zeros, total = 0, [], 0, 0
    with torch.no_grad():
        for name, lin in _target_linears(model, targets):
            w = lin.weight
            out_f, in_f = w.shape
            if in_f % 4:
                skipped.append(name)
                continue
            score = w.abs().float()
            if norms is not None:
                score = score * norms[name][None, :]
            groups = score.view(out_f, in_f // 4, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
            w.mul_(keep.view(out_f, in_f).to(w.dtype))
            done += 1
            zeros += int((w == 0).sum())
            total += w.numel()
    return {"sparsified_linears": done, "skipped": skipped, "target_sparsity": zeros / max(1, total),
            "target_parameters": total}


def is_2_4(weight) -> bool:
    """True when every group of 4 consecutive input weights of ``weight`` has at most 2 nonzeros."""
    out_f, in_f = weight.shape
    return in_f % 4 == 0 and bool(((weight.view(out_f, in_f // 4, 4) != 0).sum(-1) <= 2).all())


# -- the techniques ----------------------------------------------------------------------------
class _Job:
    """What every pruning technique does around its own surgery: load, calibrate, save, recover."""

    def __init__(self, cfg, model_dir: Path, out_dir: Path, calib_texts: Sequence[str] | None,
                 teacher_dir: Path | None, train_texts: Sequence[str] | None, resume_dir: Path | None,
                 needs_calibration: bool) -> None:
        self.cfg, self.model_dir, self.out_dir = cfg, Path(model_dir), Path(out_dir)
        self.teacher_dir = Path(teacher_dir) if teacher_dir is not None else self.model_dir
        self.train_texts, self.resume_dir = train_texts, resume_dir
        self.calib_texts, self.needs_calibration = calib_texts, needs_calibration
        self.started = time.time()
        if cfg.recovery_steps and not train_texts:
            raise ConfigError("recovery_steps", cfg.recovery_steps, "a recovery distillation needs training texts")

    def load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        check_structure(self.model, str(self.model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.params_before = count_parameters(self.model)
        self.source = None
        texts = self.calib_texts
        if self.needs_calibration:
            self.source = "caller" if texts else "builtin"
            if not texts:
                log.warning("prune: no calibration texts given; using the built-in text set (%d texts)",
                            len(BUILTIN_TEXTS))
                texts = BUILTIN_TEXTS
        self.stream = calibration_stream(self.tokenizer, texts, self.cfg.calib_tokens) if texts else None
        with torch_threads(available_cores()):
            self.ppl_before = _calibrate(self.model, self.stream, grad=False) if self.stream else None
        return self.model

    def finish(self, model, src_layer_index: Sequence[int], info: dict[str, Any], rules: dict[str, str],
               keep_zeros: bool = False) -> dict[str, Any]:
        """Save (or recover into) ``out_dir``; returns the result with the fields every technique shares."""
        teacher_layers = int(require_causal_lm(self.teacher_dir)["num_hidden_layers"])
        src_map = read_layer_map(self.model_dir, teacher_layers)
        teacher_map = [src_map[i] for i in src_layer_index]
        with torch_threads(available_cores()):
            ppl_after = _calibrate(model, self.stream, grad=False) if self.stream else None
        pruned_params = count_parameters(model)
        recovery = None
        if self.cfg.recovery_steps:
            with tempfile.TemporaryDirectory(prefix="trimflow-pruned-") as tmp:
                self._save(model, Path(tmp), teacher_layers, teacher_map)
                resume = Path(self.resume_dir) if self.resume_dir is not None else Path(tmp) / "resume"
                recovery = distill(self.cfg.recovery_config(), self.teacher_dir, list(self.train_texts),
                                   self.out_dir, resume, src_dir=Path(tmp), keep_zeros=keep_zeros)
        else:
            self._save(model, self.out_dir, teacher_layers, teacher_map)
        result = {
            **info,
            "params_before": self.params_before,
            "params_after": pruned_params,
            "size_bytes_before": weights_size_bytes(self.model_dir),
            "size_bytes_after": weights_size_bytes(self.out_dir),
            "importance": rules[self.cfg.importance],
            "calibration_tokens": len(self.stream) if (self.stream and self.source) else 0,
            "calibration_source": self.source,
            "calib_ppl_before": _round(self.ppl_before),
            "calib_ppl_after": _round(ppl_after),
            "teacher_layer_map": teacher_map,
            "recovery": recovery,
            "seconds": round(time.time() - self.started, 2),
        }
        if recovery is not None:
            from transformers import AutoModelForCausalLM

            import torch

            recovered = AutoModelForCausalLM.from_pretrained(self.out_dir, dtype=torch.float32).eval()
            with torch_threads(available_cores()):
                result["calib_ppl_recovered"] = _round(_calibrate(recovered, self.stream, grad=False)) \
                    if self.stream else None
        (self.out_dir / RESULT_FILE).write_text(json.dumps({"config": self.cfg.model_dump(mode="json"), **result},
                                                           indent=2))
        return result

    def _save(self, model, folder: Path, teacher_layers: int, teacher_map: Sequence[int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        copy_tokenizer(self.model_dir, folder)
        write_layer_map(folder, teacher_layers, teacher_map)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def prune_mlp(cfg: PruneConfig, model_dir: Path, out_dir: Path, calib_texts: Sequence[str] | None = None, *,
              teacher_dir: Path | None = None, train_texts: Sequence[str] | None = None,
              resume_dir: Path | None = None) -> dict[str, Any]:
    """Remove ``cfg.mlp_ratio`` of the MLP neurons of every layer of ``model_dir``; save to ``out_dir``.

    Args:
        cfg: ``PruneMlpConfig`` (a plain ``PruneConfig`` converts): ``mlp_ratio`` (fraction removed
            per layer), ``importance`` (``activation``, ``weight`` or ``taylor``), ``calib_tokens``,
            ``recovery_steps``/``recovery``.
        model_dir: Hugging Face folder of a Llama-style causal LM (gated MLP).
        out_dir: receives the pruned model (safetensors, config with the new
            ``intermediate_size``), the tokenizer files, ``trimflow_layer_map.json`` and
            ``trimflow_prune.json`` (config and this result).
        calib_texts: calibration texts for data-aware importance and the perplexity probe (default
            None: the built-in ``tasks.builtin_texts.BUILTIN_TEXTS``, recorded as ``calibration_source``).
        teacher_dir: teacher of the recovery distillation (default None: ``model_dir``).
        train_texts: training texts of the recovery distillation (default None; required with
            ``recovery_steps``).
        resume_dir: checkpoint folder of the recovery distillation (default None: a temporary one).

    Returns:
        ``params_before``, ``params_after`` (before recovery, which keeps the structure),
        ``intermediate_before``, ``intermediate_after``, ``layers``, ``size_bytes_before``,
        ``size_bytes_after``, ``importance`` (the scoring rule), ``calibration_tokens``,
        ``calibration_source`` (``caller``, ``builtin`` or None), ``calib_ppl_before``,
        ``calib_ppl_after`` (and ``calib_ppl_recovered``), ``teacher_layer_map``, ``recovery`` (the
        ``tasks.distill.distill`` result or None), ``seconds``.

    Raises:
        UnsupportedModelError: not a Llama-style causal LM with gate/up/down projections.
        ConfigError: the ratio leaves no neuron, or recovery has no texts (checked before any weight is loaded).
    """
    cfg = cfg if isinstance(cfg, PruneMlpConfig) else PruneMlpConfig.model_validate(cfg.model_dump())
    conf = require_causal_lm(model_dir, "MLP pruning")
    before = conf.get("intermediate_size")
    if not isinstance(before, int):
        raise UnsupportedModelError(f"{model_dir}: intermediate_size {before!r} is not one int per model")
    keep = kept_neurons(before, cfg.mlp_ratio)
    job = _Job(cfg, model_dir, out_dir, calib_texts, teacher_dir, train_texts, resume_dir,
               needs_calibration=cfg.importance != "weight")

    import torch

    model = job.load()
    with torch_threads(available_cores()):
        scores = mlp_importance(model, cfg.importance, job.stream if cfg.importance != "weight" else [])
    kept = [torch.topk(s, keep).indices.sort().values for s in scores]
    model = shrink(model, mlp=kept)
    n = len(model.model.layers)
    result = job.finish(model, list(range(n)), {"intermediate_before": before, "intermediate_after": keep,
                                                 "layers": n}, IMPORTANCE_RULES)
    log.info("prune_mlp: intermediate %d -> %d, params %d -> %d", before, keep, result["params_before"],
             result["params_after"])
    return result


def prune_heads(cfg: PruneHeadsConfig, model_dir: Path, out_dir: Path, calib_texts: Sequence[str] | None = None, *,
                teacher_dir: Path | None = None, train_texts: Sequence[str] | None = None,
                resume_dir: Path | None = None) -> dict[str, Any]:
    """Remove ``cfg.head_ratio`` of the attention heads of every layer; save to ``out_dir``.

    HF Llama configs hold one head count for all layers and ``num_attention_heads`` must be a
    multiple of ``num_key_value_heads`` with query head ``h`` reading KV head ``h // group``. So
    every layer loses the same number of heads, ranked within the layer, either as whole KV groups
    (``kv_group``: k/v rows and the KV cache shrink too) or as the same number of query heads from
    every group (``query_per_group``). ``head_dim`` is written explicitly to the config.

    Args:
        cfg: ``head_ratio``, ``granularity``, ``importance``, ``calib_tokens``, recovery.
        model_dir / out_dir / calib_texts / teacher_dir / train_texts / resume_dir: as in ``prune_mlp``.

    Returns:
        ``heads_before``, ``heads_after``, ``kv_heads_before``, ``kv_heads_after``, ``head_dim``,
        ``granularity``, ``kept_heads`` (per layer, original query-head indices), ``layers`` and the
        shared fields of ``prune_mlp``.

    Raises:
        UnsupportedModelError: not a Llama-style causal LM with q/k/v/o projections.
        ConfigError: every head (or every head of a group) would go; recovery without texts.
    """
    conf = require_causal_lm(model_dir, "head pruning")
    n_q, n_kv, hd = head_layout(conf)
    keep_q, keep_kv = kept_heads(conf, cfg.head_ratio, cfg.granularity)
    job = _Job(cfg, model_dir, out_dir, calib_texts, teacher_dir, train_texts, resume_dir,
               needs_calibration=cfg.importance != "magnitude")
    model = job.load()
    with torch_threads(available_cores()):
        scores = head_importance(model, cfg.importance, job.stream or [])
    heads = _heads_to_keep(model, scores, keep_q, cfg.granularity)
    model = shrink(model, heads=heads)
    n = len(model.model.layers)
    info = {"heads_before": n_q, "heads_after": keep_q, "kv_heads_before": n_kv, "kv_heads_after": keep_kv,
            "head_dim": hd, "granularity": cfg.granularity, "kept_heads": [q.tolist() for q, _ in heads], "layers": n}
    result = job.finish(model, list(range(n)), info, HEAD_RULES)
    log.info("prune_heads: heads %d/%d -> %d/%d (q/kv)", n_q, n_kv, keep_q, keep_kv)
    return result


def prune_layers(cfg: PruneLayersConfig, model_dir: Path, out_dir: Path, calib_texts: Sequence[str] | None = None,
                 *, teacher_dir: Path | None = None, train_texts: Sequence[str] | None = None,
                 resume_dir: Path | None = None) -> dict[str, Any]:
    """Remove ``cfg.layer_ratio`` of the decoder layers, least important first; save to ``out_dir``.

    Args:
        cfg: ``layer_ratio``, ``importance``, ``calib_tokens``, recovery.
        model_dir / out_dir / calib_texts / teacher_dir / train_texts / resume_dir: as in ``prune_mlp``.

    Returns:
        ``layers_before``, ``layers_after``, ``removed_layers``, ``kept_layers`` (indices in
        ``model_dir``), ``layer_scores`` (per layer, or per block start for ``angular``) and the shared
        fields of ``prune_mlp``.

    Raises:
        UnsupportedModelError: not a Llama-style causal LM.
        ConfigError: every layer would go; recovery without texts.
    """
    conf = require_causal_lm(model_dir, "layer pruning")
    n = int(conf["num_hidden_layers"])
    keep = kept_layers(n, cfg.layer_ratio)
    job = _Job(cfg, model_dir, out_dir, calib_texts, teacher_dir, train_texts, resume_dir, needs_calibration=True)
    model = job.load()
    with torch_threads(available_cores()):
        removed, scores = layer_importance(model, cfg.importance, job.stream, n - keep)
    kept = [i for i in range(n) if i not in set(removed)]
    model = build_student(model, kept).eval()
    info = {"layers_before": n, "layers_after": keep, "removed_layers": removed, "kept_layers": kept,
            "layer_scores": [round(s, 6) for s in scores]}
    result = job.finish(model, kept, info, LAYER_RULES)
    log.info("prune_layers: removed %s of %d layers", removed, n)
    return result


def sparsity_2_4(cfg: Sparsity24Config, model_dir: Path, out_dir: Path, calib_texts: Sequence[str] | None = None, *,
                 teacher_dir: Path | None = None, train_texts: Sequence[str] | None = None,
                 resume_dir: Path | None = None) -> dict[str, Any]:
    """Zero 2 of every 4 consecutive input weights in the decoder's linear maps; save to ``out_dir``.

    The result is stored dense (zeros in fp32), so it is neither smaller nor faster on CPU:
    onnxruntime and PyTorch CPU kernels have no 2:4 path. On NVIDIA Ampere or newer GPUs,
    ``torch.sparse.to_sparse_semi_structured`` (or TensorRT sparse tactics) turn the pattern into
    up to ~1.3-1.6x faster fp16/int8 matmuls. A recovery distillation keeps the zeros in place.

    Args:
        cfg: ``importance`` (``magnitude`` or ``wanda``), ``targets``, ``calib_tokens``, recovery.
        model_dir / out_dir / calib_texts / teacher_dir / train_texts / resume_dir: as in ``prune_mlp``.

    Returns:
        ``sparsified_linears``, ``skipped`` (maps whose width is not a multiple of 4),
        ``target_sparsity`` (zero share of the sparsified maps), ``target_parameters``,
        ``model_sparsity`` (zero share of all parameters), ``pattern`` (``2:4``), ``speedup_note``
        and the shared fields of ``prune_mlp`` (``params_after`` counts stored entries, zeros included).

    Raises:
        UnsupportedModelError: not a Llama-style causal LM.
        ConfigError: recovery without texts.
    """
    import torch

    require_causal_lm(model_dir, "2:4 sparsity")
    job = _Job(cfg, model_dir, out_dir, calib_texts, teacher_dir, train_texts, resume_dir,
               needs_calibration=cfg.importance == "wanda")
    model = job.load()
    norms = None
    if cfg.importance == "wanda":
        with torch_threads(available_cores()):
            norms = input_norms(model, job.stream, cfg.targets)
    info = apply_2_4(model, cfg.targets, norms)
    params = {id(p): p for p in model.parameters()}.values()
    info["model_sparsity"] = sum(int((p == 0).sum()) for p in params) / max(1, sum(p.numel() for p in params))
    info["pattern"] = "2:4"
    info["speedup_note"] = ("stored dense: no speedup or size change on CPU; GPU semi-structured sparse kernels "
                            "(Ampere+) are needed to turn 2:4 into speed")
    n = len(model.model.layers)
    result = job.finish(model, list(range(n)), info, SPARSITY_RULES, keep_zeros=True)
    if result["recovery"] is not None:
        from transformers import AutoModelForCausalLM

        recovered = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        result["pattern_kept_after_recovery"] = all(is_2_4(lin.weight) for name, lin in
                                                    _target_linears(recovered, cfg.targets) if name not in info["skipped"])
        (Path(out_dir) / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result},
                                                            indent=2))
    return result


def _runner(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def run(cfg, src: Path, out: Path, ctx) -> dict[str, Any]:
        # The recipe's teacher, not the step's input, is what a recovery distillation imitates.
        return fn(cfg, src, out, calib_texts=ctx.texts("calib"), teacher_dir=ctx.teacher_dir,
                  train_texts=ctx.texts("train") if cfg.recovery_steps else None, resume_dir=ctx.resume_dir)
    return run


TECHNIQUES = [
    Technique("prune_mlp", stage="prune", config=PruneMlpConfig, run=_runner(prune_mlp), kinds=("causal_lm",),
              description="structured pruning of MLP neurons (activation, weight or Taylor importance)"),
    Technique("prune_heads", stage="prune", config=PruneHeadsConfig, run=_runner(prune_heads), kinds=("causal_lm",),
              description="GQA-aware attention-head pruning, same head count in every layer"),
    Technique("prune_layers", stage="prune", config=PruneLayersConfig, run=_runner(prune_layers),
              kinds=("causal_lm",), description="whole decoder layers removed by block influence, angle or Taylor"),
    Technique("sparsity_2_4", stage="prune", config=Sparsity24Config, run=_runner(sparsity_2_4),
              kinds=("causal_lm",), description="2:4 semi-structured weight sparsity (speedup only on GPUs)"),
]
