"""The encoder path: export, evaluate, distil, quantize and early-exit sentence encoders (BERT).

Each technique lives in its own ``tasks/encoder_*.py`` module; this module gathers their
``TECHNIQUES`` for ``tasks.recipe`` and re-exports the public entry points.

    result = export_encoder(hf_dir, out_dir, EncoderExportConfig())     # the serving contract
    enc = load_encoder(out_dir, threads=2); enc.embed(["some text"])     # [1, H], L2-normalised
    measure_encoder(OrtEncoderRunner(out_dir))["quality"]                # Spearman on the Lee corpus

Techniques (all ``kinds=("encoder",)``): ``encoder_distill`` (distill), ``encoder_early_exit``
(early_exit, hf -> onnx), ``export_encoder_onnx`` (export), ``encoder_quantize_int8`` (quantize).
"""

from __future__ import annotations

from tasks import encoder_distill, encoder_exit, encoder_export, encoder_quantize
from tasks.encoder_common import ENCODER_FORMAT, ENCODER_META, INPUT_NAMES, OUTPUT_NAME, require_encoder
from tasks.encoder_distill import EncoderDistillConfig, distill_encoder
from tasks.encoder_eval import (EncoderEvalConfig, OrtEncoderRunner, TorchEncoderRunner, lee_corpus, lee_spearman,
                                measure_encoder, read_lee, spearman)
from tasks.encoder_exit import EncoderEarlyExitConfig, early_exit_encoder
from tasks.encoder_export import EncoderExportConfig, export_encoder
from tasks.encoder_quantize import EncoderQuantizeConfig, quantize_encoder
from tasks.encoder_runtime import OnnxEarlyExitEncoder, OnnxEncoder, load_encoder

TECHNIQUES = [*encoder_distill.TECHNIQUES, *encoder_exit.TECHNIQUES, *encoder_export.TECHNIQUES,
              *encoder_quantize.TECHNIQUES]

__all__ = [
    "ENCODER_FORMAT", "ENCODER_META", "INPUT_NAMES", "OUTPUT_NAME", "TECHNIQUES",
    "EncoderDistillConfig", "EncoderEarlyExitConfig", "EncoderEvalConfig", "EncoderExportConfig",
    "EncoderQuantizeConfig", "OnnxEarlyExitEncoder", "OnnxEncoder", "OrtEncoderRunner", "TorchEncoderRunner",
    "distill_encoder", "early_exit_encoder", "export_encoder", "lee_corpus", "lee_spearman", "load_encoder",
    "measure_encoder", "quantize_encoder", "read_lee", "require_encoder", "spearman",
]
