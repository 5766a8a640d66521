"""Runtime code shared by the Triton python-backend models and the evaluation step.

It imports only numpy, onnxruntime and tokenizers, because it runs inside the serving
environment (numpy<2, no torch) as well as in the pipeline environment.
"""
