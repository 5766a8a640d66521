"""Generation with CALM-style early exits over trimflow's segmented ONNX export.

The export (``tasks.early_exit``; metadata in ``trimflow_early_exit.json``) cuts the decoder into
segments of consecutive layers. Each segment is its own graph with its own KV cache: inputs
``hidden`` [B,S,H], ``attention_mask`` [B,P+S], ``position_ids`` [B,S], ``past_key_values.{j}.key|value``
for its layers; outputs ``hidden_out``, ``present.{j}.key|value`` and, for a segment that ends in an
exit, ``exit_hidden`` (the exit adapter's output, fed to the shared head) and ``exit_score`` (the
exit classifier's probability that the exit agrees with the full model). ``head.onnx`` holds the
tied embedding and LM head: ``input_ids`` → ``embeds`` and ``hidden`` → ``logits`` (final norm + head).

A token stops at the first exit whose confidence reaches the threshold. The layers it skipped are
not copied from the exit state: their KV for that position is computed exactly, later, when a
token next needs those layers: the pending positions then go through them together with it (on a
CPU, decode is memory-bound, so a few extra positions cost little). The KV cache therefore always
equals the full model's, and only tokens that exited can differ from full-depth generation.

    lm = EarlyExitLM(model_dir, threads=2)                 # the calibrated threshold from the metadata
    texts = lm.generate_text(["Hello"], max_new_tokens=8)
    lm.last_stats["layers_used"], lm.stats()["mean_layers_used"]

Only numpy, onnxruntime and tokenizers are imported: this file also runs in the Triton serving env.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:
    from generator import OnnxCausalLM, TextIO  # the copy beside this file in a Triton version folder
except ImportError:  # the source tree
    from serving.runtime.generator import OnnxCausalLM, TextIO

META = "trimflow_early_exit.json"
FORMAT = "trimflow-early-exit/1"
MEASURES = ("softmax", "margin", "classifier")


@dataclass(frozen=True)
class Segment:
    file: str
    start: int  # first layer (0-based)
    end: int  # one past the last layer; an exit sits after layer ``end``
    exit: bool


@dataclass(frozen=True)
class EarlyExitMeta:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_positions: int
    segments: tuple[Segment, ...]
    measure: str
    threshold: float
    head_file: str = "head.onnx"
    past_dtype: str = "float32"

    @classmethod
    def load(cls, model_dir: Path) -> "EarlyExitMeta":
        path = Path(model_dir) / META
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a trimflow early-exit export (no {META})")
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: format {d.get('format')!r}, expected {FORMAT!r}")
        if d["measure"] not in MEASURES:
            raise ValueError(f"{path}: unknown confidence measure {d['measure']!r}; known: {MEASURES}")
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        d["segments"] = tuple(Segment(**s) for s in d["segments"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(s.end for s in self.segments if s.exit)


def confidence(measure: str, logits: np.ndarray | None, score: np.ndarray | None) -> np.ndarray:
    """Per-row confidence in [0, 1]: softmax max-probability, top-1 minus top-2 probability, or the
    exit classifier's score. ``logits`` [..., V] for the first two, ``score`` [...] for the classifier."""
    if measure == "classifier":
        return np.clip(np.asarray(score, np.float64), 0.0, 1.0)
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if measure == "softmax":
        return p.max(-1)
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def exits(conf: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each confidence lets a token exit: ``conf ≥ threshold``; a threshold ≥ 1 never exits."""
    if threshold >= 1.0:
        return np.zeros(np.shape(conf), bool)
    return np.asarray(conf) >= threshold


@dataclass
class _State:
    """One batch being generated: per segment, its KV cache, positions done and pending inputs."""

    ids: np.ndarray  # [B, T] all tokens so far (left-padded prompts + generated)
    mask: np.ndarray  # [B, T]
    pos: np.ndarray  # [B, T]
    past: list[list[np.ndarray]]  # per segment: 2 arrays per layer
    done: list[int]  # per segment: positions [0, done) are in its KV cache
    pending: list[np.ndarray]  # per segment s>0: inputs [B, n, H] of positions [done[s], done[s-1])
    finished: np.ndarray  # [B] rows that produced EOS
    layers_used: list[int] = field(default_factory=list)  # per generated token


class EarlyExitLM(TextIO):
    """A segmented early-exit export plus its tokenizer, runnable with onnxruntime alone.

    Args:
        model_dir: folder with ``trimflow_early_exit.json``, the segment graphs, ``head.onnx`` and
            ``tokenizer.json``.
        threads: onnxruntime intra-op threads per session (default 0 = onnxruntime decides).
        providers: execution providers (default CPU).
        threshold: confidence threshold (default None: the calibrated one in the metadata; 0 always
            exits at the first exit, ≥ 1 never exits).
    """

    def __init__(self, model_dir: str | Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threshold: float | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        self.meta = EarlyExitMeta.load(self.model_dir)
        self.threshold = float(self.meta.threshold if threshold is None else threshold)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def session(name: str):
            return ort.InferenceSession(str(self.model_dir / name), opts, providers=list(providers))

        self.head = session(self.meta.head_file)
        self.segments = [session(s.file) for s in self.meta.segments]
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._dtype = np.dtype(self.meta.past_dtype)
        self.last_stats: dict[str, Any] = {}
        self.reset_stats()

    # -- statistics ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget the cumulative statistics of ``stats()``."""
        self._tokens = 0
        self._layers = 0
        self._exit_counts = {e: 0 for e in self.meta.exit_layers + (self.meta.num_layers,)}
        self._layer_positions = 0

    def stats(self) -> dict[str, Any]:
        """Generation statistics since the last ``reset_stats``.

        Returns:
            ``tokens`` generated, ``mean_layers_used`` per token (the depth at which it was decided),
            ``exit_counts`` (tokens decided after each exit layer; the last key is full depth),
            ``layer_positions_per_token`` (layer × position passes actually run, catch-up of skipped
            layers included, per token), ``threshold``, ``num_layers``.
        """
        n = max(1, self._tokens)
        return {"tokens": self._tokens, "mean_layers_used": round(self._layers / n, 3),
                "exit_counts": {str(k): v for k, v in self._exit_counts.items()},
                "layer_positions_per_token": round(self._layer_positions / n, 3),
                "threshold": self.threshold, "num_layers": self.meta.num_layers}

    # -- graphs ----------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        b = input_ids.shape[0]
        return self.head.run(["embeds"], {"input_ids": input_ids.astype(np.int64),
                                          "hidden": np.zeros((b, 0, self.meta.hidden_size), np.float32)})[0]

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Final norm + LM head of ``hidden`` [B,S,H] -> [B,S,V]."""
        b = hidden.shape[0]
        return self.head.run(["logits"], {"hidden": hidden.astype(np.float32),
                                          "input_ids": np.zeros((b, 0), np.int64)})[0]

    def run_segment(self, s: int, hidden: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                    past: list[np.ndarray]) -> dict[str, Any]:
        """One segment on ``hidden`` [B,S,H]; returns ``hidden_out``, ``present`` (list) and, at an exit,
        ``exit_hidden`` and ``exit_score``."""
        sess = self.segments[s]
        feed = {"hidden": hidden, "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        for j in range(len(past) // 2):
            feed[f"past_key_values.{j}.key"] = past[2 * j]
            feed[f"past_key_values.{j}.value"] = past[2 * j + 1]
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(None, feed)))
        out = {"hidden_out": values["hidden_out"],
               "present": [values[n] for n in names if n.startswith("present.")]}
        if "exit_hidden" in values:
            out["exit_hidden"], out["exit_score"] = values["exit_hidden"], values.get("exit_score")
        return out

    def _empty_segment_past(self, s: int, batch: int) -> list[np.ndarray]:
        seg, m = self.meta.segments[s], self.meta
        return [np.zeros((batch, m.num_kv_heads, 0, m.head_dim), self._dtype) for _ in range(2 * (seg.end - seg.start))]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """An empty KV cache of every layer, in layer order (the ``OnnxCausalLM`` layout)."""
        return [a for s in range(len(self.segments)) for a in self._empty_segment_past(s, batch)]

    def _split(self, past: list[np.ndarray]) -> list[list[np.ndarray]]:
        out, i = [], 0
        for seg in self.meta.segments:
            n = 2 * (seg.end - seg.start)
            out.append(list(past[i:i + n]))
            i += n
        return out

    # -- full depth (parity, perplexity of the full model) ---------------------------------------
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every layer, no exits: ``(logits [B,S,V], present)`` exactly as ``OnnxCausalLM.forward``."""
        x = self.embed(input_ids)
        present: list[np.ndarray] = []
        for s, seg_past in enumerate(self._split(past)):
            out = self.run_segment(s, x, attention_mask, position_ids, seg_past)
            x = out["hidden_out"]
            present += out["present"]
        return self.head_logits(x), present

    def logits(self, input_ids: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Logits [B,S,V] of unpadded ``input_ids`` as the early-exit model predicts each next token.

        Each position takes the logits of its first exit whose confidence reaches the threshold
        (default: this instance's), else the full model's. Because skipped layers are computed later,
        every layer's state of earlier positions equals the full model's, so one full-depth pass
        gives exactly what token-by-token generation would use. ``last_stats["layers_used"]`` holds
        the depth per position.
        """
        th = self.threshold if threshold is None else float(threshold)
        b, s = input_ids.shape
        am = np.ones((b, s), np.int64)
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
        x = self.embed(input_ids)
        out = np.empty((b, s, self.meta.vocab_size), np.float32)
        open_ = np.ones((b, s), bool)
        depth = np.full((b, s), self.meta.num_layers, np.int64)
        for k, seg in enumerate(self.meta.segments):
            res = self.run_segment(k, x, am, pos, self._empty_segment_past(k, b))
            x = res["hidden_out"]
            if not seg.exit or not open_.any():
                continue
            rows, cols = np.nonzero(open_)
            eh = res["exit_hidden"][rows, cols][None]  # only positions still open
            lg = None
            if self.meta.measure == "classifier":
                conf = confidence("classifier", None, res["exit_score"][rows, cols])
            else:
                lg = self.head_logits(eh)[0]
                conf = confidence(self.meta.measure, lg, None)
            take = exits(conf, th)
            if take.any():
                out[rows[take], cols[take]] = lg[take] if lg is not None else self.head_logits(eh[:, take])[0]
                open_[rows[take], cols[take]] = False
                depth[rows[take], cols[take]] = seg.end
        if open_.any():
            rows, cols = np.nonzero(open_)
            out[rows, cols] = self.head_logits(x[rows, cols][None])[0]
        self.last_stats = {"layers_used": depth.tolist(), "mean_layers_used": float(depth.mean()), "threshold": th}
        return out

    # -- generation ------------------------------------------------------------------------------
    def begin(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> _State:
        """The state of a batch about to generate: prompts left-padded, nothing computed yet.

        Raises:
            ValueError: an empty prompt, or prompt + new tokens beyond the model's positions.
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: at least one token is needed")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.meta.max_positions:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's {self.meta.max_positions} positions")
        b, pad = len(prompts), self.meta.pad_token_id
        ids = np.array([[pad] * (longest - len(p)) + list(p) for p in prompts], np.int64)
        mask = np.array([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], np.int64)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        n_seg = len(self.segments)
        return _State(ids=ids, mask=mask, pos=pos, past=[self._empty_segment_past(s, b) for s in range(n_seg)],
                      done=[0] * n_seg, pending=[np.zeros((b, 0, self.meta.hidden_size), np.float32)] * n_seg,
                      finished=np.zeros(b, bool))

    def step(self, st: _State, temperature: float = 0.0, top_p: float = 1.0,
             rng: np.random.Generator | None = None) -> np.ndarray:
        """Decide the next token of every row (an exit when all unfinished rows are confident there),
        append it to the state and return it [B]."""
        rng = rng or np.random.default_rng()
        t = st.ids.shape[1]
        am = st.mask
        x = self.embed(st.ids[:, st.done[0]:t])
        nxt, depth = None, self.meta.num_layers
        for s, seg in enumerate(self.meta.segments):
            inp = x if s == 0 else np.concatenate([st.pending[s], x], axis=1)
            res = self.run_segment(s, inp, am, st.pos[:, st.done[s]:t], st.past[s])
            self._layer_positions += inp.shape[1] * (seg.end - seg.start)
            st.past[s], st.done[s] = res["present"], t
            st.pending[s] = st.pending[s][:, :0]
            x = res["hidden_out"]
            if not seg.exit:
                break  # the last segment
            active = ~st.finished
            eh = res["exit_hidden"][:, -1:]
            lg = None
            if self.meta.measure == "classifier":
                conf = confidence("classifier", None, res["exit_score"][:, -1])
            else:
                lg = self.head_logits(eh)[:, -1]
                conf = confidence(self.meta.measure, lg, None)
            if exits(conf[active], self.threshold).all():
                if lg is None:
                    lg = self.head_logits(eh)[:, -1]
                nxt, depth = OnnxCausalLM._pick(lg, temperature, top_p, rng), seg.end
                st.pending[s + 1] = np.concatenate([st.pending[s + 1], x], axis=1)
                break
        if nxt is None:
            nxt = OnnxCausalLM._pick(self.head_logits(x[:, -1:])[:, -1], temperature, top_p, rng)
        b = len(nxt)
        st.ids = np.concatenate([st.ids, nxt[:, None].astype(np.int64)], axis=1)
        st.mask = np.concatenate([st.mask, np.ones((b, 1), np.int64)], axis=1)
        st.pos = np.concatenate([st.pos, st.pos[:, -1:] + 1], axis=1)
        st.layers_used.append(depth)
        self._tokens += 1
        self._layers += depth
        self._exit_counts[depth] += 1
        return nxt

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> list[list[int]]:
        """Generate up to ``max_new_tokens`` per prompt with exits; greedy when ``temperature`` is 0.

        Returns the new token ids per prompt, stopping at an EOS token (not included) unless
        ``stop_at_eos`` is False. ``last_stats["layers_used"]`` holds the depth of every step.
        """
        if not prompts:
            return []
        st = self.begin(prompts, max_new_tokens)
        rng = np.random.default_rng(seed)
        eos = set(self.meta.eos_token_ids)
        out: list[list[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            nxt = self.step(st, temperature, top_p, rng)
            for i, tok in enumerate(nxt):
                if st.finished[i]:
                    continue
                if stop_at_eos and int(tok) in eos:
                    st.finished[i] = True
                else:
                    out[i].append(int(tok))
            if st.finished.all():
                break
        self.last_stats = {"layers_used": list(st.layers_used),
                           "mean_layers_used": float(np.mean(st.layers_used)) if st.layers_used else 0.0,
                           "threshold": self.threshold}
        return out


def export_files(model_dir: "str | os.PathLike") -> list[str]:
    """Every file an early-exit export needs at serving time: metadata, graphs, tokenizer (names only)."""
    meta = EarlyExitMeta.load(Path(model_dir))
    names = [META, meta.head_file] + [s.file for s in meta.segments] + ["tokenizer.json"]
    names += [n + ".data" for n in names if n.endswith(".onnx") and (Path(model_dir) / (n + ".data")).is_file()]
    return names


def stage_model_code(dest: "str | os.PathLike") -> Path:
    """Fill ``dest`` with the ``llm_early_exit`` python-backend code and this runtime module.

    Pass the folder as ``ModelRepository.write_version(..., model_code=dest)``: the writer copies the
    ``*.py`` of ``model_code`` (plus ``generator.py``) into the version folder, and the stub has no
    ``serving`` package to import this module from.
    """
    here = Path(__file__).resolve().parent
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(here.parent / "triton_models" / "llm_early_exit" / "model.py", dest / "model.py")
    # The early-exit model subclasses llm_generate's, which it imports from beside itself.
    shutil.copy2(here.parent / "triton_models" / "llm_generate" / "model.py", dest / "generate_model.py")
    shutil.copy2(here / "early_exit.py", dest / "early_exit.py")
    return dest
