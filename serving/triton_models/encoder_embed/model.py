"""Triton python-backend model: sentence embeddings from an exported encoder, batched in ``execute``.

Runs inside the Triton python stub with the serving environment (numpy<2, onnxruntime,
tokenizers): it must not import ``serving`` or ``tasks``. The version folder holds the encoder
export (``model.onnx`` with inputs input_ids/attention_mask/token_type_ids int64 [B,S] and output
``sentence_embedding`` [B,H], mean-pooled and L2-normalised; ``tokenizer.json``;
``trimflow_encoder.json``).

    inputs : text TYPE_STRING [1]          (max_batch_size 0: no batch dimension, one text)
    output : embedding TYPE_FP32 [H]
    params : intra_op_threads, max_length, execution_providers (config.pbtxt)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import triton_python_backend_utils as pb_utils

META = "trimflow_encoder.json"
FORMAT = "trimflow-encoder/1"  # tasks/encoder_common.py ENCODER_FORMAT (the stub cannot import tasks)
OUTPUT = "sentence_embedding"
# A bucket holds texts up to 1.25x (+2 tokens) the length of its shortest: at most ~20% padding,
# and a batch of 8- to 32-word texts runs in about six session calls instead of one.
BUCKET_SPAN = 1.25


class RequestError(ValueError):
    """A problem with one request: it gets an error response, the rest of the batch carries on."""


class OnnxEncoder:
    """Tokenizer + ONNX session; ``embed(texts)`` pads each length bucket only to its longest text.

    Args:
        model_dir: the version folder (export files).
        threads: onnxruntime intra-op threads (default 1).
        max_length: tokens per text after truncation (default None: the export's metadata, else 256).
        providers: execution providers (default CPU).
    """

    def __init__(self, model_dir: Path, threads: int = 1, max_length: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META).read_text()) if (model_dir / META).is_file() else {}
        if meta.get("format", FORMAT) != FORMAT:
            raise RuntimeError(f"{model_dir / META}: format {meta.get('format')!r} is not served by encoder_embed "
                               f"(it runs single-graph {FORMAT} exports)")
        self.max_length = int(max_length or meta.get("max_seq_length") or 256)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # WAR: exported HF tokenizers often carry fixed padding (all-MiniLM-L6-v2: every text padded to
        # 128 tokens), which would make a 10-token text cost as much as a 128-token one.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_dir / meta.get("onnx_file", "model.onnx")), opts,
                                            providers=list(providers))
        self.input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if OUTPUT not in outputs:
            raise RuntimeError(f"{model_dir}: the ONNX graph has outputs {outputs}, not {OUTPUT!r}")
        self.pad_id = int(meta.get("pad_token_id", self.tokenizer.token_to_id("[PAD]") or 0))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), H]`` float32 embeddings, in the order of ``texts``.

        Texts are sorted by token count and run in length buckets: a batch of 12- and 44-token
        texts padded to 44 would spend most of its compute on padding, which on CPU costs as
        much as real tokens.
        """
        encs = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        out = np.empty((len(encs), 0), np.float32)
        start = 0
        while start < len(order):
            stop = start + 1
            shortest = len(encs[order[start]].ids)
            while stop < len(order) and len(encs[order[stop]].ids) <= shortest * BUCKET_SPAN + 2:
                stop += 1
            rows = order[start:stop]
            vectors = self._run([encs[i] for i in rows])
            if out.shape[1] == 0:
                out = np.empty((len(encs), vectors.shape[1]), np.float32)
            out[rows] = vectors
            start = stop
        return out

    def _run(self, encs: list) -> np.ndarray:
        """One session run over ``encs`` right-padded to the longest of them."""
        longest = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), longest), self.pad_id, np.int64)
        mask = np.zeros((len(encs), longest), np.int64)
        types = np.zeros((len(encs), longest), np.int64)
        for row, e in enumerate(encs):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        (out,) = self.session.run([OUTPUT], {k: v for k, v in feed.items() if k in self.input_names})
        return np.asarray(out, dtype=np.float32)


def _param(cfg: dict, key: str, default: str) -> str:
    return cfg.get("parameters", {}).get(key, {}).get("string_value", default) or default


class TritonPythonModel:
    """Every text of every request in one ``execute`` is embedded together (length-bucketed runs)."""

    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        providers = [p.strip() for p in _param(cfg, "execution_providers", "CPUExecutionProvider").split(",")
                     if p.strip()]
        max_length = _param(cfg, "max_length", "")
        encoder = OnnxEncoder(version_dir, threads=int(_param(cfg, "intra_op_threads", "1")),
                              max_length=int(max_length) if max_length else None, providers=providers)
        self.setup(encoder, batched=int(cfg.get("max_batch_size", 0)) > 0)
        # One real run at load time: a graph that parses but cannot run fails the load, not a request.
        dim = self.encoder.embed(["warm up"]).shape[1]
        pb_utils.Logger.log_info(f"encoder_embed {args['model_name']} v{args['model_version']}: dim {dim}, "
                                 f"max_length {encoder.max_length}, batched {self.batched}, providers {providers}")

    def setup(self, encoder, batched: bool = True) -> None:
        """Everything ``initialize`` decides, callable with any encoder (unit tests use a fake one)."""
        self.encoder = encoder
        self.batched = batched

    def parse(self, request) -> list[str]:
        """The texts of one request (a batched request may carry several rows).

        Raises:
            RequestError: a text that is not UTF-8.
        """
        raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        texts = []
        for value in raw:
            try:
                texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
            except UnicodeDecodeError as e:
                raise RequestError(f"text is not UTF-8: {e}") from e
        return texts

    def execute(self, requests):
        spans: list[tuple[int, int] | Exception] = []
        texts: list[str] = []
        for request in requests:
            try:
                mine = self.parse(request)
            except RequestError as e:
                spans.append(e)
                continue
            spans.append((len(texts), len(texts) + len(mine)))
            texts += mine
        vectors: np.ndarray | Exception | None = None
        if texts:
            try:
                vectors = self.encoder.embed(texts)
            except Exception as e:  # an onnxruntime failure fails this batch's requests, not the server
                pb_utils.Logger.log_error(f"encoder_embed: batch of {len(texts)} texts failed: {e!r}")
                vectors = e
        responses = []
        for span in spans:
            failure = span if isinstance(span, Exception) else vectors if isinstance(vectors, Exception) else None
            if failure is not None:
                code = pb_utils.TritonError.INVALID_ARG if isinstance(failure, RequestError) else \
                    pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(failure).__name__}: {failure}", code)))
                continue
            start, stop = span  # type: ignore[misc]
            rows = vectors[start:stop]  # type: ignore[index]
            # Without a batch dimension (max_batch_size 0) the output is one [H] vector.
            out = rows if self.batched else rows.reshape(-1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embedding", out)]))
        return responses

    def finalize(self) -> None:
        self.encoder = None
