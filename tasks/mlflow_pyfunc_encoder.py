"""The MLflow pyfunc flavour of a trimflow encoder (logged as model-from-code).

    m = mlflow.pyfunc.load_model("models:/trimflow-minilm@champion")
    m.predict(pd.DataFrame({"text": ["The council voted."]}))   # list of L2-normalised vectors
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class TrimflowEncoder(mlflow.pyfunc.PythonModel):
    """Sentence embeddings with the exported ONNX encoder in artifact ``onnx``."""

    def load_context(self, context):
        from tasks.encoder_runtime import load_encoder

        self.enc = load_encoder(context.artifacts["onnx"])

    def predict(self, context, model_input, params=None):
        texts = list(model_input["text"]) if hasattr(model_input, "columns") else list(model_input)
        return self.enc.embed(texts).tolist()


set_model(TrimflowEncoder())
