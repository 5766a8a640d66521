"""Triton python-backend model: batched text generation with CALM-style early exits (onnxruntime).

The same request contract as ``llm_generate``, served from a ``tasks.early_exit`` export (segment
graphs, ``head.onnx``, ``trimflow_early_exit.json``). Runs inside the Triton python stub with the
serving environment: it must not import ``serving`` or ``tasks``; ``early_exit.py``, ``generator.py``
and ``llm_generate``'s model.py (as ``generate_model.py``, whose request handling this model reuses)
are copied beside this file in each version folder.

    inputs : text_input TYPE_STRING [1]; optional max_tokens TYPE_INT32 [1], temperature TYPE_FP32 [1]
    output : text_output TYPE_STRING [1]
    params : intra_op_threads, default_max_tokens, max_tokens_limit, execution_providers,
             exit_threshold (config.pbtxt; default: the calibrated threshold of the export)

A batch exits at an exit only when every unfinished row in it is confident there, so each row's
token still meets the calibrated confidence; bigger batches exit less often.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))


def _generate_model():
    """``llm_generate``'s model.py: copied beside this file as ``generate_model.py`` in a version
    folder; read from the source tree otherwise (unit tests)."""
    path = _HERE / "generate_model.py"
    if not path.is_file():
        path = _HERE.parent / "llm_generate" / "model.py"
    spec = importlib.util.spec_from_file_location(f"{__name__}_generate", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


try:
    from early_exit import EarlyExitLM  # the copy in this version folder
except ImportError:  # the source tree (unit tests)
    from serving.runtime.early_exit import EarlyExitLM

_generate = _generate_model()
pb_utils = _generate.pb_utils
RequestError, Row, _param = _generate.RequestError, _generate.Row, _generate._param


class TritonPythonModel(_generate.TritonPythonModel):
    """``llm_generate``'s request handling and batching over an ``EarlyExitLM``."""

    NAME = "llm_early_exit"

    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        providers = [p.strip() for p in _param(cfg, "execution_providers", "CPUExecutionProvider").split(",")
                     if p.strip()]
        threshold = _param(cfg, "exit_threshold", "")
        lm = EarlyExitLM(version_dir, threads=int(_param(cfg, "intra_op_threads", "1")), providers=providers,
                         threshold=float(threshold) if threshold else None)
        self.setup(lm, default_max_tokens=int(_param(cfg, "default_max_tokens", "16")),
                   max_tokens_limit=int(_param(cfg, "max_tokens_limit", "256")))
        # One real step at load time: graphs that parse but cannot run fail the load, not a user request.
        self.lm.generate_ids([[self.lm.meta.pad_token_id]], max_new_tokens=1)
        self.lm.reset_stats()
        pb_utils.Logger.log_info(f"llm_early_exit {args['model_name']} v{args['model_version']}: "
                                 f"{self.lm.meta.num_layers} layers, exits after {list(self.lm.meta.exit_layers)}, "
                                 f"{self.lm.meta.measure} threshold {self.lm.threshold:.4g}, providers {providers}")

    def finalize(self) -> None:
        if self.lm is not None and hasattr(self.lm, "stats"):
            s = self.lm.stats()
            pb_utils.Logger.log_info(f"llm_early_exit: {s['tokens']} tokens, {s['mean_layers_used']} mean layers "
                                     f"of {s['num_layers']}, exits {s['exit_counts']}")
        self.lm = None
