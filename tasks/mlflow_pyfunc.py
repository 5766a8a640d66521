"""The MLflow pyfunc flavour of a trimflow LLM (logged as model-from-code).

A registered version can be loaded anywhere MLflow runs, without Triton:

    m = mlflow.pyfunc.load_model("models:/trimflow-smollm2@champion")
    m.predict(pd.DataFrame({"prompt": ["The council voted to"]}), params={"max_tokens": 16})
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class TrimflowLLM(mlflow.pyfunc.PythonModel):
    """Greedy generation with the exported ONNX decoder in artifact ``onnx`` (exits honoured when
    the artifact is an ``early_exit`` export)."""

    def load_context(self, context):
        from pathlib import Path

        folder = Path(context.artifacts["onnx"])
        if (folder / "trimflow_early_exit.json").is_file():
            from serving.runtime.early_exit import EarlyExitLM

            self.lm = EarlyExitLM(folder)
        else:
            from serving.runtime.generator import OnnxCausalLM

            self.lm = OnnxCausalLM(folder)

    def predict(self, context, model_input, params=None):
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        max_tokens = int((params or {}).get("max_tokens", 32))
        return self.lm.generate_text(prompts, max_new_tokens=max_tokens)


set_model(TrimflowLLM())
