"""trimflow serving: Triton model repositories, the python-backend models, the local
server, clients and rollout.

    from serving.runtime.generator import OnnxCausalLM
    lm = OnnxCausalLM("/path/to/exported")          # model.onnx + tokenizer.json + trimflow_model.json
    lm.generate_text(["The council voted to"], max_new_tokens=16)
"""
