"""The encoder path: export, evaluate, distill, quantize and early-exit sentence encoders (BERT).

Every encoder technique lives in a ``tasks/encoder_*.py`` module; this module gathers their
``TECHNIQUES`` for ``tasks.recipe`` and re-exports the public entry points.

    result = export_encoder(hf_dir, out_dir, EncoderExportConfig())    # the serving contract
    enc = load_encoder(out_dir, threads=2); enc.embed(["some text"])    # [1, H], L2-normalised
"""

from __future__ import annotations

from tasks import encoder_export
from tasks.encoder_common import ENCODER_FORMAT, ENCODER_META, INPUT_NAMES, OUTPUT_NAME, require_encoder
from tasks.encoder_export import EncoderExportConfig, export_encoder
from tasks.encoder_runtime import OnnxEarlyExitEncoder, OnnxEncoder, load_encoder

TECHNIQUES = [*encoder_export.TECHNIQUES]

__all__ = ["ENCODER_FORMAT", "ENCODER_META", "INPUT_NAMES", "OUTPUT_NAME", "EncoderExportConfig", "OnnxEarlyExitEncoder",
           "OnnxEncoder", "TECHNIQUES", "export_encoder", "load_encoder", "require_encoder"]
