"""LLM early exit, CALM-style: exits at intermediate layers through the shared LM head.

Each candidate exit gets a light adapter (a residual linear map fitted by least squares to the
final layer's hidden state, optionally refined by a few KD steps against the final logits) and,
for the ``classifier`` measure, a logistic "will this exit agree with the full model" probe. A
cost model picks the exits and one confidence threshold on held-out calibration text: the
cheapest setting whose next-token agreement with the full model meets the target. The model is
then exported as segments of layers with their own KV caches, plus one embedding/head graph, which
``serving.runtime.early_exit.EarlyExitLM`` runs with the exits honoured.

    result = early_exit(EarlyExitConfig(target_agreement=0.9), hf_dir, out_dir, train, calib, eval_texts)
    result["threshold"], result["exits"], result["eval"]["mean_layers_used"], result["speed"]["speedup"]
    runner = EarlyExitRunner(out_dir)          # for tasks.evaluate.measure
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator

from tasks.config import _Frozen
from tasks.errors import ConfigError, ExportMismatch, SourceError
from tasks.modelio import available_cores, load_causal_lm, require_causal_lm, torch_threads
from tasks.technique import Technique

log = logging.getLogger(__name__)

RESULT_FILE = "trimflow_early_exit_result.json"
HEADS_FILE = "exit_heads.safetensors"
KV_STATE = "skipped layers computed for pending positions when a later token reaches them"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json", "config.json")


class EarlyExitConfig(_Frozen):
    """Exits, their heads, the confidence measure, calibration and the export.

    Args:
        exit_layers: exits to use, each after that many decoder layers (1 ≤ e < layers); empty picks
            them from the candidates below with the cost model (default empty).
        min_depth: auto candidates start at this fraction of the depth (default 0.5: on SmolLM2-135M
            with adapters, an exit's next token equals the full model's on 0.27 of tokens after layer
            12, 0.29 after 15, 0.40 after 21, 0.53 after 25, 0.70 after 29).
        candidate_every: spacing of auto candidates in layers (default 2).
        max_exits: most exits the cost model may pick (default 3).
        measure: confidence of an exit: ``softmax`` (max probability), ``margin`` (top-1 minus top-2
            probability) or ``classifier`` (the exit's probe) (default classifier). A softmax or
            margin check runs the vocabulary head, worth 8 decoder layers of weights on SmolLM2-135M,
            at every exit a token passes, so in the cost model they never beat the full model there
            (x0.93 at target 0.9); the probe costs a dot product and only the exit taken runs the head.
        adapters: fit a residual linear adapter per exit; without, exits read the raw hidden state
            through the final norm and head (the "logit lens") (default True).
        adapter_steps: KD steps refining the chosen exits' adapters against the final logits after the
            least-squares fit; each step runs the vocabulary head forward and backward (default 0).
        adapter_lr: Adam learning rate of those steps (default 1e-4).
        kd_temperature: temperature of the KD loss (default 1.0).
        target_agreement: share of calibration next tokens on which the early-exit prediction must
            equal the full model's (default 0.9).
        fit_tokens: training-split tokens for the adapters and probes (default 4096; on SmolLM2-135M,
            8192 raised the layer-15 exit's agreement from 0.27 to 0.29 over 2048).
        calib_tokens: calibration-split tokens for choosing exits and the threshold (default 2048).
        seq_len: window length for those passes (default 256).
        head_cost: cost of one vocabulary head evaluation in decoder layers, for the cost model
            (default None: from parameter counts, i.e. memory traffic at decode).
        eval_windows / eval_len: held-out windows on which the exported model's agreement, perplexity
            and layers used are measured (defaults 4 / 256; 0 windows skips).
        speed_prompts / speed_tokens: batch-1 generations timed with and without exits on the
            exported runtime (defaults 2 / 24; 0 prompts skips).
        min_speedup: measured (else cost-model) speedup below which the result says the exits do not
            pay; smaller gains are within the noise of a shared machine (default 1.05).
        opset: ONNX opset (default 17).
        atol: largest allowed |logit difference| between the segmented export and PyTorch (default 1e-2).
    """

    exit_layers: tuple[int, ...] = ()
    min_depth: float = Field(0.5, gt=0, lt=1)
    candidate_every: int = Field(2, ge=1)
    max_exits: int = Field(3, ge=1)
    measure: Literal["softmax", "margin", "classifier"] = "classifier"
    adapters: bool = True
    adapter_steps: int = Field(0, ge=0)
    adapter_lr: float = Field(1e-4, gt=0)
    kd_temperature: float = Field(1.0, gt=0)
    target_agreement: float = Field(0.9, gt=0, le=1)
    fit_tokens: int = Field(4096, ge=32)
    calib_tokens: int = Field(2048, ge=32)
    seq_len: int = Field(256, ge=8)
    head_cost: float | None = Field(None, ge=0)
    eval_windows: int = Field(4, ge=0)
    eval_len: int = Field(256, ge=16)
    speed_prompts: int = Field(2, ge=0)
    speed_tokens: int = Field(24, ge=2)
    min_speedup: float = Field(1.05, gt=0)
    opset: int = Field(17, ge=14)
    atol: float = Field(1e-2, gt=0)

    @field_validator("exit_layers")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(e < 1 for e in v):
            raise ValueError(f"exit layers count layers before the exit and start at 1, got {list(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"exit layer listed twice: {list(v)}")
        return tuple(sorted(v))


# -- exit heads ---------------------------------------------------------------------------------
def _exit_head_class():
    import torch

    class ExitHead(torch.nn.Module):
        """``h + A·h`` (A starts at zero), and a logistic probe on the final norm of that."""

        def __init__(self, hidden: int, adapter: bool) -> None:
            super().__init__()
            self.adapter = torch.nn.Linear(hidden, hidden, bias=True) if adapter else None
            if self.adapter is not None:
                torch.nn.init.zeros_(self.adapter.weight)
                torch.nn.init.zeros_(self.adapter.bias)
            self.probe = torch.nn.Linear(hidden, 1, bias=True)
            torch.nn.init.zeros_(self.probe.weight)
            torch.nn.init.zeros_(self.probe.bias)

        def forward(self, h):
            return h if self.adapter is None else h + self.adapter(h)

        def score(self, normed):
            return torch.sigmoid(self.probe(normed))[..., 0]

    return ExitHead


def candidate_exits(num_layers: int, cfg: EarlyExitConfig) -> list[int]:
    """Exit layers the cost model may choose from (``cfg.exit_layers`` when given).

    Raises:
        ConfigError: an exit at or beyond the last layer, or no candidate at all.
    """
    if cfg.exit_layers:
        bad = [e for e in cfg.exit_layers if e >= num_layers]
        if bad:
            raise ConfigError("early_exit.exit_layers", list(cfg.exit_layers),
                              f"exits must sit before the last of the model's {num_layers} layers")
        return list(cfg.exit_layers)
    first = max(1, int(np.ceil(cfg.min_depth * num_layers)))
    found = list(range(first, num_layers, cfg.candidate_every))
    if not found:
        raise ConfigError("early_exit.min_depth", cfg.min_depth, f"leaves no exit before layer {num_layers}")
    return found


def _windows(model_dir: Path, texts: Sequence[str], tokens: int, seq_len: int, where: str) -> np.ndarray:
    from tasks.compress import token_stream

    stream = token_stream(model_dir, texts, tokens)
    n = len(stream) // seq_len
    if n == 0:
        raise ConfigError(where, len(texts), f"the texts hold {len(stream)} tokens, fewer than one window of {seq_len}")
    return np.asarray(stream[: n * seq_len], np.int64).reshape(n, seq_len)


def collect_states(model, windows: np.ndarray, layers: Sequence[int]) -> tuple[dict[int, Any], Any, Any]:
    """Hidden states after each of ``layers`` and the final layer, and the final logits' argmax.

    Returns:
        ``{layer: [N, H] float32}`` (the last layer included, pre-norm), final argmax [N] int64, and
        the final logits' softmax max-probability [N] (both from the unmodified model).
    """
    import torch

    n_layers = len(model.model.layers)
    wanted = sorted(set(layers) | {n_layers})
    got: dict[int, list] = {e: [] for e in wanted}
    caught: dict[int, Any] = {}

    def hook(e):
        def f(_m, _i, out):
            caught[e] = out[0] if isinstance(out, tuple) else out
        return f

    handles = [model.model.layers[e - 1].register_forward_hook(hook(e)) for e in wanted]
    top, prob = [], []
    try:
        with torch.inference_mode():
            for row in windows:
                logits = model(input_ids=torch.from_numpy(row[None]), use_cache=False).logits[0]
                for e in wanted:
                    got[e].append(caught[e][0].float().clone())
                top.append(logits.argmax(-1))
                prob.append(logits.float().softmax(-1).max(-1).values)
    finally:
        for h in handles:
            h.remove()
    return {e: torch.cat(v) for e, v in got.items()}, torch.cat(top), torch.cat(prob)


def fit_adapter(h, target, ridge: float = 1e-3):
    """Least-squares ``[h, 1]·W ≈ target − h`` (ridge-damped); returns (weight [H,H], bias [H]) for a Linear."""
    import torch

    x = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    gram = x.T @ x
    gram += ridge * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=torch.float64)
    w = torch.linalg.solve(gram, x.T @ (target.double() - h.double()))
    return w[:-1].T.float().contiguous(), w[-1].float().contiguous()


def exit_statistics(model, head, h, final_top, chunk: int = 512) -> dict[str, Any]:
    """For one exit on N tokens: agreement with the final argmax, softmax max-prob, top-1/2 margin, normed state."""
    import torch

    agree, smax, margin, normed = [], [], [], []
    with torch.inference_mode():
        for i in range(0, len(h), chunk):
            z = model.model.norm(head(h[i:i + chunk]))
            p = model.lm_head(z).float().softmax(-1)
            top2 = p.topk(2, dim=-1)
            agree.append(top2.indices[:, 0] == final_top[i:i + chunk])
            smax.append(top2.values[:, 0])
            margin.append(top2.values[:, 0] - top2.values[:, 1])
            normed.append(z)
    return {"agree": torch.cat(agree).numpy(), "softmax": torch.cat(smax).double().numpy(),
            "margin": torch.cat(margin).double().numpy(), "normed": torch.cat(normed)}


def fit_probe(head, normed, agree: np.ndarray, l2: float = 1e-3, iters: int = 100) -> None:
    """Logistic regression of ``agree`` on the exit's normed state, written into ``head.probe``.

    Features are standardised for the optimiser and the scaling folded back into the weights, so
    the exported probe reads the raw normed state.
    """
    import torch

    x = normed.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    xs = (x - mu) / sd
    y = torch.from_numpy(agree.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        head.probe.weight.copy_((w / sd).float()[None])
        head.probe.bias.copy_((b - (w * mu / sd).sum()).float())


def probe_scores(head, normed) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return head.score(normed).double().numpy()


# -- choosing exits and the threshold -------------------------------------------------------------
def cost_model(num_layers: int, layer_params: float, head_params: float, hidden: int, measure: str,
               head_cost: float | None = None) -> dict[str, float]:
    """Costs in decoder layers: one vocabulary head, one exit check, and the full model.

    At batch-1 decode on a CPU every step streams the weights it uses, so parameter counts stand
    in for time. A ``softmax``/``margin`` check runs the adapter and the whole head; a
    ``classifier`` check runs the adapter and a dot product, and only the exit taken runs the head.
    """
    head = head_params / layer_params if head_cost is None else float(head_cost)
    adapter = (hidden * hidden + hidden) / layer_params
    check = adapter + (head if measure != "classifier" else 2 * hidden / layer_params)
    return {"head": head, "check": check, "full": num_layers + head}


def evaluate_setting(conf: np.ndarray, agree: np.ndarray, depths: Sequence[int], threshold: float,
                     costs: dict[str, float], measure: str, num_layers: int) -> dict[str, float]:
    """Agreement, mean depth and expected cost of one exit set at one threshold, over N tokens.

    Args:
        conf / agree: [k, N] confidence and agreement-with-full of the k exits (in depth order).
        depths: the k exit layers.
    """
    from serving.runtime.early_exit import exits

    k, n = conf.shape
    passed = np.vstack([exits(conf, threshold), np.ones((1, n), bool)])
    first = passed.argmax(0)  # k = no exit taken
    took = first < k
    ok = np.where(took, agree[np.minimum(first, k - 1), np.arange(n)], True)
    depth = np.asarray(list(depths) + [num_layers])[first]
    checks = np.minimum(first + 1, k)
    if measure == "classifier":
        cost = depth + checks * costs["check"] + costs["head"]
    else:  # the taken exit's head is the output head; only full depth needs one more
        cost = depth + checks * costs["check"] + np.where(took, 0.0, costs["head"])
    return {"agreement": float(ok.mean()), "mean_layers": float(depth.mean()), "cost": float(cost.mean()),
            "exit_rate": float(took.mean())}


def calibrate(conf: np.ndarray, agree: np.ndarray, depths: Sequence[int], costs: dict[str, float], measure: str,
              num_layers: int, target: float) -> dict[str, Any]:
    """The cheapest threshold whose agreement meets ``target`` (ties: higher agreement).

    Thresholds are the quantiles of the observed confidences plus 1.0 (never exit), which always
    meets any target, so a result always exists.
    """
    grid = np.unique(np.concatenate([np.quantile(conf.ravel(), np.linspace(0, 1, 201)), [1.0]]))
    best = None
    for th in grid:
        r = evaluate_setting(conf, agree, depths, float(th), costs, measure, num_layers)
        if r["agreement"] + 1e-12 < target:
            continue
        key = (round(r["cost"], 9), -r["agreement"])
        if best is None or key < best[0]:
            best = (key, {"threshold": float(th), **r})
    return best[1]


def select_exits(stats: dict[int, dict[str, Any]], candidates: Sequence[int], costs: dict[str, float], measure: str,
                 num_layers: int, target: float, max_exits: int, fixed: bool) -> dict[str, Any]:
    """Greedy forward selection of exits by calibrated expected cost (all candidates when ``fixed``)."""
    def run(chosen: Sequence[int]) -> dict[str, Any]:
        chosen = sorted(chosen)
        conf = np.stack([stats[e]["conf"] for e in chosen])
        agree = np.stack([stats[e]["agree"] for e in chosen])
        return {"exits": chosen, **calibrate(conf, agree, chosen, costs, measure, num_layers, target)}

    if fixed:
        return run(candidates)
    best = None
    chosen: list[int] = []
    while len(chosen) < max_exits:
        trials = [run(chosen + [c]) for c in candidates if c not in chosen]
        if not trials:
            break
        trial = min(trials, key=lambda r: (r["cost"], -r["agreement"]))
        if best is not None and trial["cost"] >= best["cost"] - 1e-6:
            break
        best, chosen = trial, trial["exits"]
    return best


# -- export ------------------------------------------------------------------------------------
def _segment_module(model, start: int, end: int, head):
    """A torch module running layers [start, end) on hidden states with their own KV cache (ONNX-traceable)."""
    import copy

    import torch
    from transformers import AutoModel, DynamicCache

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = end - start
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[start:end]
    cfg.vocab_size, cfg.pad_token_id = 1, None  # the segment never embeds: keep its table tiny
    sub = AutoModel.from_config(cfg, dtype=torch.float32)
    layers = [copy.deepcopy(model.model.layers[i]) for i in range(start, end)]
    for j, layer in enumerate(layers):
        layer.self_attn.layer_idx = j
    sub.layers = torch.nn.ModuleList(layers)
    sub.norm = torch.nn.Identity()
    n = end - start

    class Segment(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sub, self.head, self.final_norm = sub, head, copy.deepcopy(model.model.norm)

        def forward(self, hidden, attention_mask, position_ids, *past):
            cache = DynamicCache(config=cfg)
            for i in range(n):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.sub(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True)
            h = out.last_hidden_state
            flat = []
            for layer in out.cache.layers[:n]:
                flat += [layer.keys, layer.values]
            if self.head is None:
                return (h, *flat)
            eh = self.head(h)
            return (h, eh, self.head.score(self.final_norm(eh)), *flat)

    return Segment().eval()


def _head_module(model):
    import torch

    class EmbedHead(torch.nn.Module):
        """The tied embedding and LM head in one graph, so the shared table is stored once."""

        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head

        def forward(self, hidden, input_ids):
            return self.lm_head(self.norm(hidden)), self.embed(input_ids)

    return EmbedHead().eval()


def export_segments(model, exits_at: Sequence[int], heads: dict[int, Any], out_dir: Path, opset: int,
                    export_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Write ``segment_{i}.onnx`` (layers between exits, exit head at the end) and ``head.onnx``."""
    import torch

    c = model.config
    n_layers = c.num_hidden_layers
    kv = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    hd = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    bounds = [0] + list(exits_at) + [n_layers]
    g = torch.Generator().manual_seed(0)
    segments = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        is_exit = b < n_layers
        mod = _segment_module(model, a, b, heads[b] if is_exit else None)
        n = b - a
        ins = ["hidden", "attention_mask", "position_ids"] + [f"past_key_values.{j}.{k}" for j in range(n)
                                                              for k in ("key", "value")]
        outs = ["hidden_out"] + (["exit_hidden", "exit_score"] if is_exit else []) + \
               [f"present.{j}.{k}" for j in range(n) for k in ("key", "value")]
        # Batch 2, 3 past and 4 new positions, so no dimension is specialised to 1.
        args = (torch.randn(2, 4, c.hidden_size, generator=g), torch.ones(2, 7, dtype=torch.long),
                torch.arange(3, 7).expand(2, 4), *[torch.randn(2, kv, 3, hd, generator=g) for _ in range(2 * n)])
        dyn: dict[str, dict[int, str]] = {"hidden": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                                          "position_ids": {0: "batch", 1: "seq"}, "hidden_out": {0: "batch", 1: "seq"}}
        if is_exit:
            dyn |= {"exit_hidden": {0: "batch", 1: "seq"}, "exit_score": {0: "batch", 1: "seq"}}
        dyn |= {nm: {0: "batch", 2: "past"} for nm in ins[3:]}
        dyn |= {nm: {0: "batch", 2: "total"} for nm in outs if nm.startswith("present.")}
        name = f"segment_{i}.onnx"
        with torch.no_grad():
            torch.onnx.export(mod, args, str(out_dir / name), input_names=ins, output_names=outs, dynamic_axes=dyn,
                              opset_version=opset, dynamo=False, **export_kwargs)
        segments.append({"file": name, "start": a, "end": b, "exit": is_exit})
    with torch.no_grad():
        # No constant folding: it would store the LM head as a second, transposed copy of the tied
        # table (113 MB on SmolLM2); onnxruntime folds the Transpose itself when the session loads.
        torch.onnx.export(_head_module(model), (torch.randn(2, 3, c.hidden_size, generator=g),
                                                torch.zeros(2, 5, dtype=torch.long)),
                          str(out_dir / "head.onnx"), input_names=["hidden", "input_ids"],
                          output_names=["logits", "embeds"],
                          dynamic_axes={"hidden": {0: "batch", 1: "seq"}, "input_ids": {0: "batch", 1: "ids"},
                                        "logits": {0: "batch", 1: "seq"}, "embeds": {0: "batch", 1: "ids"}},
                          opset_version=opset, dynamo=False, **(export_kwargs | {"do_constant_folding": False}))
    return segments


def check_parity(model, heads: dict[int, Any], out_dir: Path, atol: float) -> dict[str, float]:
    """Full-depth logits (left-padded prefill, then a decode step) and first-exit logits vs PyTorch.

    Raises:
        ExportMismatch: any largest absolute difference above ``atol``.
    """
    import torch

    from serving.runtime.early_exit import EarlyExitLM

    lm = EarlyExitLM(out_dir, threads=available_cores())
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True)
    got, present = lm.forward(ids.numpy(), am.numpy(), pos.numpy(), lm.empty_past(2))
    keep = am.numpy().astype(bool)
    prefill = float(np.abs(got - ref.logits.numpy())[keep].max())
    nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
    am2 = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
    pos2 = pos[:, -1:] + 1
    with torch.no_grad():
        ref2 = model(input_ids=nxt, attention_mask=am2, position_ids=pos2, cache=ref.cache)
    got2, _ = lm.forward(nxt.numpy(), am2.numpy(), pos2.numpy(), present)
    decode = float(np.abs(got2 - ref2.logits.numpy()).max())
    # The first exit's logits: threshold 0 takes it for every position.
    first = lm.meta.exit_layers[0]
    exit_got = lm.logits(ids[:1].numpy(), threshold=0.0)
    hidden: dict[str, Any] = {}
    hook = model.model.layers[first - 1].register_forward_hook(
        lambda _m, _i, out: hidden.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=ids[:1], use_cache=False)
            exit_ref = model.lm_head(model.model.norm(heads[first](hidden["h"]))).numpy()
    finally:
        hook.remove()
    exit_diff = float(np.abs(exit_got - exit_ref).max())
    result = {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "exit_max_abs_diff": exit_diff,
              "atol": atol}
    if max(prefill, decode, exit_diff) > atol:
        raise ExportMismatch(f"segmented early-exit export in {out_dir} differs from PyTorch: prefill {prefill:.3g}, "
                             f"decode {decode:.3g}, first exit {exit_diff:.3g} > atol {atol}")
    return result


# -- measuring the exported model ---------------------------------------------------------------
def eval_exported(out_dir: Path, windows: np.ndarray, threads: int) -> dict[str, Any]:
    """Teacher-forced next-token agreement with full depth, perplexities and mean layers used, on ``windows``."""
    from serving.runtime.early_exit import EarlyExitLM
    from tasks.evaluate import token_nll

    lm = EarlyExitLM(out_dir, threads=threads)
    agree, nll_full, nll_exit, layers = [], [], [], []
    for row in windows:
        full = lm.logits(row[None], threshold=1.0)[0]
        early = lm.logits(row[None])[0]
        layers.append(np.asarray(lm.last_stats["layers_used"][0]))
        agree.append(full.argmax(-1) == early.argmax(-1))
        nll_full.append(token_nll(full, row))
        nll_exit.append(token_nll(early, row))
    layers_all = np.concatenate(layers)
    return {"tokens": int(layers_all.size), "agreement": round(float(np.concatenate(agree).mean()), 4),
            "perplexity_full": round(float(np.exp(np.concatenate(nll_full).mean())), 4),
            "perplexity_early_exit": round(float(np.exp(np.concatenate(nll_exit).mean())), 4),
            "mean_layers_used": round(float(layers_all.mean()), 3),
            "exit_rate": round(float((layers_all < lm.meta.num_layers).mean()), 4)}


def speed_exported(out_dir: Path, prompts: Sequence[Sequence[int]], new_tokens: int, threads: int,
                   repeats: int = 2) -> dict[str, Any]:
    """Batch-1 greedy decode with exits vs the same segments with exits off, interleaved; same session.

    ``identical_prefix_tokens`` is how many leading tokens the two greedy continuations share: once
    an exit picks another token the texts part, so a per-position agreement would say little.
    """
    from serving.runtime.early_exit import EarlyExitLM

    lm = EarlyExitLM(out_dir, threads=threads)
    calibrated = lm.threshold
    secs = {"full": 0.0, "exit": 0.0}
    toks = {"full": 0, "exit": 0}
    prefix, layers = [], []
    for p in prompts:
        lm.threshold = 1.0
        lm.generate_ids([p], 2, stop_at_eos=False)  # warm-up
        for _ in range(repeats):
            outs = {}
            for mode, th in (("full", 1.0), ("exit", calibrated)):
                lm.threshold = th
                st = lm.begin([p], new_tokens)
                lm.step(st)
                t0 = time.perf_counter()
                for _ in range(new_tokens - 1):
                    lm.step(st)
                secs[mode] += time.perf_counter() - t0
                toks[mode] += new_tokens - 1
                outs[mode] = st.ids[0, -new_tokens:]
                if mode == "exit":
                    layers += st.layers_used
            diff = np.nonzero(outs["full"] != outs["exit"])[0]
            prefix.append(int(diff[0]) if diff.size else new_tokens)
    lm.threshold = calibrated
    tps = {m: toks[m] / secs[m] for m in secs}
    return {"tokens_per_s_full": round(tps["full"], 2), "tokens_per_s_early_exit": round(tps["exit"], 2),
            "speedup": round(tps["exit"] / tps["full"], 3), "mean_layers_used": round(float(np.mean(layers)), 3),
            "identical_prefix_tokens": round(float(np.mean(prefix)), 2), "new_tokens": new_tokens,
            "prompts": len(prompts), "repeats": repeats, "threads": threads}


def fit_exits(cfg: EarlyExitConfig, model, candidates: Sequence[int], fit_w: np.ndarray,
              cal_w: np.ndarray) -> dict[str, Any]:
    """Fit every candidate's head, choose exits and the threshold; optionally refine the chosen adapters.

    Returns:
        ``heads`` (exit layer -> ``ExitHead``), ``choice`` (``select_exits``), ``costs``, ``per_exit``
        (each candidate's agreement and mean confidence on calibration text), ``kd`` (None or the
        ``train_adapters`` summary).
    """
    import torch

    from tasks.modelio import count_parameters

    n_layers = len(model.model.layers)
    hidden = model.config.hidden_size
    exit_head = _exit_head_class()
    heads = {e: exit_head(hidden, cfg.adapters).eval() for e in candidates}
    fit_h, fit_top, _ = collect_states(model, fit_w, candidates)
    cal_h, cal_top, _ = collect_states(model, cal_w, candidates)

    def refit(exits_: Sequence[int]) -> dict[int, dict[str, Any]]:
        out = {}
        for e in exits_:
            if cfg.measure == "classifier":
                fs = exit_statistics(model, heads[e], fit_h[e], fit_top)
                fit_probe(heads[e], fs["normed"], fs["agree"])
            cs = exit_statistics(model, heads[e], cal_h[e], cal_top)
            conf = probe_scores(heads[e], cs["normed"]) if cfg.measure == "classifier" else cs[cfg.measure]
            out[e] = {"agree": cs["agree"], "conf": conf}
        return out

    if cfg.adapters:
        for e in candidates:
            w, b = fit_adapter(fit_h[e], fit_h[n_layers])
            with torch.no_grad():
                heads[e].adapter.weight.copy_(w)
                heads[e].adapter.bias.copy_(b)
    stats = refit(candidates)
    layer_params = float(np.mean([count_parameters(layer) for layer in model.model.layers]))
    costs = cost_model(n_layers, layer_params, float(model.lm_head.in_features * model.lm_head.out_features),
                       hidden, cfg.measure, cfg.head_cost)
    choice = select_exits(stats, candidates, costs, cfg.measure, n_layers, cfg.target_agreement, cfg.max_exits,
                          fixed=bool(cfg.exit_layers))
    kd = None
    if cfg.adapters and cfg.adapter_steps:
        kd = train_adapters(model, {e: heads[e] for e in choice["exits"]}, fit_w, cfg)
        stats.update(refit(choice["exits"]))
        choice = select_exits(stats, choice["exits"], costs, cfg.measure, n_layers, cfg.target_agreement,
                              cfg.max_exits, fixed=True)
    per_exit = {str(e): {"agreement": round(float(stats[e]["agree"].mean()), 4),
                         "mean_confidence": round(float(np.mean(stats[e]["conf"])), 4)} for e in candidates}
    return {"heads": heads, "choice": choice, "costs": costs, "per_exit": per_exit, "kd": kd}


def _fit_and_export(cfg: EarlyExitConfig, model_dir: Path, out_dir: Path, candidates: Sequence[int],
                    fit_w: np.ndarray, cal_w: np.ndarray) -> dict[str, Any]:
    """The PyTorch part of ``early_exit``: fit, choose, export, check parity (the model is freed on return)."""
    from safetensors.torch import save_file

    from tasks.export import model_meta
    from tasks.modelio import onnx_export_options

    model = load_causal_lm(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    fitted = fit_exits(cfg, model, candidates, fit_w, cal_w)
    heads, choice = fitted["heads"], fitted["choice"]
    chosen = choice["exits"]
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    segments = export_segments(model, chosen, heads, out_dir, cfg.opset, onnx_export_options(model_dir))
    export_seconds = time.time() - t0
    meta = model_meta(model.config, getattr(model, "generation_config", None))
    meta = {k: v for k, v in meta.items() if k not in ("format", "onnx_file")}
    meta |= {"format": "trimflow-early-exit/1", "hidden_size": model.config.hidden_size, "head_file": "head.onnx",
             "segments": segments, "measure": cfg.measure, "threshold": choice["threshold"], "kv_state": KV_STATE}
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    save_file({f"exit_{e}.{k}": v.contiguous() for e in chosen for k, v in heads[e].state_dict().items()},
              str(out_dir / HEADS_FILE))
    (out_dir / "trimflow_early_exit.json").write_text(json.dumps(meta, indent=2))
    parity = check_parity(model, heads, out_dir, cfg.atol)
    return fitted | {"parity": parity, "export_seconds": export_seconds}


# -- the step ------------------------------------------------------------------------------------
def early_exit(cfg: EarlyExitConfig, model_dir: Path, out_dir: Path, train_texts: Sequence[str],
               calib_texts: Sequence[str], eval_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit exit heads, choose exits and a threshold on calibration text, export segmented ONNX to ``out_dir``.

    Args:
        cfg: exits, heads, measure, target, export tolerance and measurement sizes.
        model_dir: HF folder of a Llama-style causal LM (structural patches are re-applied).
        out_dir: receives ``segment_*.onnx``, ``head.onnx``, ``trimflow_early_exit.json`` (the runtime's
            metadata), ``exit_heads.safetensors``, tokenizer files and ``trimflow_early_exit_result.json``.
        train_texts: texts the adapters and probes are fitted on.
        calib_texts: held-out texts the exits and the threshold are chosen on.
        eval_texts: held-out texts for the exported model's agreement, perplexity and speed (default None).

    Returns:
        ``exits``, ``candidates``, ``threshold``, ``measure``, ``calibration`` (agreement, mean layers,
        exit rate and expected cost on the calibration tokens, and ``expected_speedup`` by the cost
        model), ``costs``, ``per_exit`` (each candidate's agreement and exit statistics), ``parity``,
        ``eval`` (exported model, teacher-forced: agreement, perplexity full/early-exit, mean layers
        used, exit rate), ``speed`` (exported runtime, batch 1: tokens/s with and without exits,
        speedup, mean layers used, identical greedy prefix), ``size_bytes``, ``kv_state``,
        ``pays`` and ``verdict``, ``seconds``.

    Raises:
        UnsupportedModelError: not a Llama-style causal LM.
        ConfigError: bad exits, or texts too short for one window.
        ExportMismatch: the segmented export disagrees with PyTorch beyond ``cfg.atol``.
    """
    started = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    conf_json = require_causal_lm(model_dir, "early exit")
    n_layers = int(conf_json["num_hidden_layers"])
    candidates = candidate_exits(n_layers, cfg)
    fit_w = _windows(model_dir, train_texts, cfg.fit_tokens, cfg.seq_len, "train_texts")
    cal_w = _windows(model_dir, calib_texts, cfg.calib_tokens, cfg.seq_len, "calib_texts")
    threads = available_cores()
    with torch_threads(threads):
        built = _fit_and_export(cfg, model_dir, out_dir, candidates, fit_w, cal_w)  # frees the torch model
    choice, costs = built["choice"], built["costs"]
    chosen = choice["exits"]

    evaluation = speed = None
    if cfg.eval_windows and eval_texts:
        ev_w = _windows(model_dir, eval_texts, cfg.eval_windows * cfg.eval_len, cfg.eval_len, "eval_texts")
        evaluation = eval_exported(out_dir, ev_w, threads)
    if cfg.speed_prompts and eval_texts:
        from tasks.compress import token_stream

        prompts = [token_stream(model_dir, [t], 48) for t in list(eval_texts)[: cfg.speed_prompts]]
        speed = speed_exported(out_dir, [p for p in prompts if p], cfg.speed_tokens, threads)
    expected = costs["full"] / choice["cost"]
    pays = (speed["speedup"] if speed else expected) >= cfg.min_speedup
    verdict = (f"exits after layers {chosen} of {n_layers} ({cfg.measure}, threshold {choice['threshold']:.4g}): "
               f"calibration agreement {choice['agreement']:.3f} at {choice['mean_layers']:.1f} mean layers, cost model "
               f"x{expected:.2f}" + (f"; measured batch-1 decode x{speed['speedup']:.2f}" if speed else "")
               + (f"; held-out perplexity {evaluation['perplexity_full']:.4g} -> "
                  f"{evaluation['perplexity_early_exit']:.4g}" if evaluation else "")
               + ("" if pays else f" - below x{cfg.min_speedup}: does not pay on this machine"))
    size = sum(p.stat().st_size for p in out_dir.glob("*.onnx"))
    result = {
        "exits": chosen,
        "candidates": candidates,
        "threshold": choice["threshold"],
        "measure": cfg.measure,
        "calibration": {"tokens": int(cal_w.size), "agreement": round(choice["agreement"], 4),
                        "mean_layers_used": round(choice["mean_layers"], 3), "exit_rate": round(choice["exit_rate"], 4),
                        "expected_cost_layers": round(choice["cost"], 3), "expected_speedup": round(expected, 3),
                        "target_agreement": cfg.target_agreement},
        "costs": {k: round(v, 4) for k, v in costs.items()},
        "per_exit": built["per_exit"],
        "kd": built["kd"],
        "parity": built["parity"],
        "eval": evaluation,
        "speed": speed,
        "size_bytes": size,
        "export_seconds": round(built["export_seconds"], 2),
        "kv_state": KV_STATE,
        "pays": bool(pays),
        "verdict": verdict,
        "seconds": round(time.time() - started, 2),
    }
    (out_dir / RESULT_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **result}, indent=2))
    log.info("early_exit: %s", verdict)
    return result


def train_adapters(model, heads: dict[int, Any], windows: np.ndarray, cfg: EarlyExitConfig) -> dict[str, Any]:
    """A few KD steps on the chosen exits' adapters: T²·KL(final ‖ exit), the model frozen.

    Returns ``steps``, ``first_loss``, ``final_loss``, ``seconds``.
    """
    import torch
    import torch.nn.functional as F

    params = [p for h in heads.values() for p in h.adapter.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.adapter_lr)
    caught: dict[int, Any] = {}
    hooks = [model.model.layers[e - 1].register_forward_hook(
        lambda _m, _i, out, e=e: caught.__setitem__(e, out[0] if isinstance(out, tuple) else out)) for e in heads]
    losses, t0, temp = [], time.time(), cfg.kd_temperature
    try:
        for step in range(cfg.adapter_steps):
            row = torch.from_numpy(windows[step % len(windows)][None])
            with torch.no_grad():
                target = F.log_softmax(model(input_ids=row, use_cache=False).logits.float() / temp, -1)
            loss = 0.0
            with torch.enable_grad():
                for e, head in heads.items():
                    head.train()
                    z = model.lm_head(model.model.norm(head(caught[e].detach()))).float()
                    loss = loss + F.kl_div(F.log_softmax(z / temp, -1).flatten(0, 1), target.flatten(0, 1),
                                           reduction="batchmean", log_target=True) * temp ** 2
                loss = loss / len(heads)
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(float(loss))
    finally:
        for h in hooks:
            h.remove()
        for head in heads.values():
            head.eval()
    return {"steps": len(losses), "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 2)}


class EarlyExitRunner:
    """``tasks.evaluate.Runner`` over an early-exit export: perplexity and generation with the exits honoured.

    Args:
        onnx_dir: an ``early_exit`` output folder.
        threads: onnxruntime intra-op threads (default 2; ``measure`` sets ``EvalConfig.threads``).
        threshold: overrides the calibrated threshold (default None).
    """

    def __init__(self, onnx_dir: Path, threads: int = 2, threshold: float | None = None) -> None:
        from serving.runtime.early_exit import META

        self.onnx_dir = Path(onnx_dir)
        if not (self.onnx_dir / META).is_file():
            raise SourceError(f"{onnx_dir} is not a trimflow early-exit export (no {META})")
        self.threads, self._threshold = threads, threshold
        self.lm = self._load(threads)
        eos = self.lm.meta.eos_token_ids
        self.eos_token_id = eos[0] if eos else None
        self.name = f"onnxruntime-early-exit:{self.lm.meta.measure}@{self.lm.threshold:.4g}"

    def _load(self, threads: int):
        from serving.runtime.early_exit import EarlyExitLM

        return EarlyExitLM(self.onnx_dir, threads=threads, threshold=self._threshold)

    def use_threads(self, threads: int) -> None:
        if threads != self.threads:
            self.lm = self._load(threads)
            self.threads = threads

    def encode(self, text: str) -> list[int]:
        return self.lm.encode(text)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.lm.logits(np.asarray(ids, np.int64))

    def generate(self, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        st = self.lm.begin([list(prompt)], new_tokens)
        out = [int(self.lm.step(st)[0])]
        ttft = time.perf_counter() - t0
        for _ in range(new_tokens - 1):
            out.append(int(self.lm.step(st)[0]))
        return out, ttft, time.perf_counter() - t0

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.onnx_dir.iterdir() if p.name.endswith((".onnx", ".onnx.data")))

    def num_parameters(self) -> int | None:
        return None

    def stats(self) -> dict[str, Any]:
        """Layers used per generated token since this runner was made (see ``EarlyExitLM.stats``)."""
        return self.lm.stats()


def runner_for(onnx_dir: Path, threads: int = 2) -> EarlyExitRunner:
    """The evaluation runner of an ``early_exit`` output folder (what ``OrtRunner`` is to a plain export)."""
    return EarlyExitRunner(onnx_dir, threads=threads)


def _run(cfg: EarlyExitConfig, src: Path, out: Path, ctx) -> dict[str, Any]:
    return early_exit(cfg, src, out, ctx.texts("train"), ctx.texts("calib"), ctx.texts("eval"))


TECHNIQUES = [Technique("early_exit", stage="early_exit", config=EarlyExitConfig, run=_run, kinds=("causal_lm",),
                        consumes="hf", produces="onnx",
                        description="CALM-style exits with a calibrated confidence threshold, segmented ONNX export")]
