"""
### optimize_model — make a language model cheaper to serve

Takes a Hugging Face causal LM (packaged SmolLM2-135M-Instruct by default, or a local folder,
`s3://…`, `models:/name@alias`), then:

1. **ingest_model** → fp32 safetensors folder + content hash
2. **validate_data** → news text split train/eval/calib, Great Expectations suite (bad data stops here)
3. **baseline** → teacher perplexity, size, latency, tokens/s
4-9. the **recipe**, one task per stage (a stage without steps passes through):
   **distill** (KD student, resumable) → **prune** (structured: heads, neurons, layers) →
   **compress** (low-rank, weight sharing) → **early_exit** (calibrated exits) →
   **export** (ONNX with KV cache, parity-checked) → **quantize** (INT8 dynamic/static, INT4, FP16)
7. **evaluate** → the candidate measured exactly like the baseline
8. **quality_gate** → perplexity ratio, speedup, size; a failure stops before the registry
9. **register** → MLflow run + model version, alias `challenger`, lineage tags
10. **deploy** → versioned Triton repository, dynamic batching + response cache, load
11. **smoke_test** → generate through Triton; success moves alias `champion`, failure rolls back
12. **report** → JSON + Markdown, logged to MLflow and written to the state folder

Every task is a thin wrapper over a function in `tasks/pipeline.py`; outputs are published
per run id, so a retried task finds its finished work. Pick `profile=quick` (default, CPU),
`ci` (smallest real run) or `full` (quality, GPU recommended), and either tick `techniques`
or name a `recipe` (a file in `tasks/recipes/` or a YAML path).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

DEFAULT_ARGS = {
    "owner": "trimflow",
    "retries": 1,
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(hours=6),
}

PARAMS = {
    "profile": Param("quick", enum=["quick", "ci", "full"], title="Profile",
                     description="Preset sizes: quick (CPU, minutes), ci (smallest real run), full (quality)."),
    "source": Param("smollm2", type="string", minLength=1, title="Model source",
                    description="smollm2 | local HF folder | s3://bucket/prefix | models:/name@alias | pkg:<package>/<file>"),
    "techniques": Param(["distill", "prune", "quantize"], type="array",
                        items={"type": "string", "enum": ["distill", "prune", "quantize"]},
                        title="Techniques", description="Applied in pipeline order; unchecked ones pass through."),
    "recipe": Param(None, type=["null", "string"], title="Recipe",
                    description="A recipe from tasks/recipes/ (e.g. quick) or a YAML path; replaces Techniques."),
    "registered_model": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9_.-]{1,128}$",
                              title="Registered model name",
                              description="Empty: trimflow-smollm2 for a causal LM, trimflow-minilm for an encoder."),
    "data_source": Param(None, type=["null", "string"], title="Data source",
                         description="Empty for the packaged news corpus, or a folder with train.jsonl/eval.jsonl."),
    "student_layers": Param(None, type=["null", "integer"], minimum=1, title="Student layers"),
    "distill_steps": Param(None, type=["null", "integer"], minimum=0, title="Distillation steps"),
    "prune_ratio": Param(None, type=["null", "number"], minimum=0, exclusiveMaximum=1, title="MLP prune ratio"),
    "max_ppl_ratio": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Gate: max perplexity ratio"),
    "min_speedup": Param(None, type=["null", "number"], minimum=0, title="Gate: min decode speedup"),
    "max_size_mb": Param(None, type=["null", "number"], exclusiveMinimum=0, title="Gate: max size (MB)"),
    "deploy_target": Param("local", enum=["local", "none"], title="Deploy target",
                           description="local: Triton on this machine; none: register only."),
    "model_name": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9_-]{1,64}$", title="Triton model name",
                        description="Empty: trimflow_llm (plus trimflow_llm_stream) or trimflow_encoder."),
}


def _step(name: str, *args, **kwargs):
    """Call ``tasks.pipeline.<name>``; a final verdict (bad data, failed gate) fails without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks import pipeline
    from tasks.errors import TrimflowError

    try:
        return getattr(pipeline, name)(*args, **kwargs)
    except TrimflowError as e:
        if e.retryable:
            raise
        raise AirflowFailException(f"{type(e).__name__}: {e}") from e


@dag(
    dag_id="optimize_model",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["trimflow", "optimize", "llm"],
    doc_md=__doc__,
    render_template_as_native_obj=True,
)
def optimize_model():
    @task
    def resolve_config(params: dict | None = None) -> dict:
        """Validate the Params form into the typed config every task receives."""
        return _step("resolve_config", dict(params or {}))

    @task
    def ingest_model(conf: dict, run_id: str | None = None) -> dict:
        return _step("ingest_model", conf, run_id)

    @task
    def validate_data(conf: dict, run_id: str | None = None) -> dict:
        return _step("validate_data", conf, run_id)

    @task
    def baseline(conf: dict, model: dict, data: dict, run_id: str | None = None) -> dict:
        return _step("baseline", conf, run_id, model, data)

    def stage_task(stage: str):
        @task(task_id=stage, doc_md=f"Apply the recipe's **{stage}** steps (pass-through when it has none).")
        def run(conf: dict, upstream: dict, model: dict, data: dict, run_id: str | None = None) -> dict:
            return _step("run_stage", conf, run_id, stage, upstream, model, data)

        return run

    @task
    def start_point(model: dict) -> dict:
        return _step("start_point", model)

    @task
    def evaluate(conf: dict, candidate: dict, data: dict, run_id: str | None = None) -> dict:
        return _step("evaluate_candidate", conf, run_id, candidate, data)

    @task(retries=0)  # a failed gate is a verdict, not a flake
    def quality_gate(conf: dict, teacher: dict, candidate: dict, run_id: str | None = None) -> dict:
        return _step("quality_gate", conf, run_id, teacher, candidate)

    @task
    def register(conf: dict, model: dict, data: dict, candidate: dict, teacher: dict, measured: dict, verdict: dict,
                 run_id: str | None = None) -> dict:
        return _step("register", conf, run_id, model, data, candidate, teacher, measured, verdict)

    @task
    def deploy(conf: dict, registered: dict, candidate: dict, run_id: str | None = None) -> dict:
        return _step("deploy", conf, run_id, registered, candidate)

    @task(retries=0)  # the smoke test rolls back on failure; retrying would test the old version
    def smoke_test(conf: dict, registered: dict, deployed: dict, run_id: str | None = None) -> dict:
        return _step("smoke_test", conf, run_id, registered, deployed)

    @task
    def report(conf: dict, model: dict, data: dict, teacher: dict, measured: dict, verdict: dict,
               registered: dict, deployed: dict, smoke: dict, chain: dict, run_id: str | None = None) -> dict:
        return _step("report", conf, run_id, model=model, data=data, teacher=teacher, candidate=measured,
                     verdict=verdict, registered=registered, deployed=deployed, smoke=smoke, chain=chain)

    conf = resolve_config()
    model = ingest_model(conf)
    data = validate_data(conf)
    teacher = baseline(conf, model, data)
    chain = start_point(model)
    # The teacher is timed alone: a concurrent distillation would slow it and inflate the speedup.
    teacher >> chain
    for stage in ("distill", "prune", "compress", "early_exit", "export", "quantize"):
        chain = stage_task(stage)(conf, chain, model, data)
    measured = evaluate(conf, chain, data)
    verdict = quality_gate(conf, teacher, measured)
    registered = register(conf, model, data, chain, teacher, measured, verdict)
    deployed = deploy(conf, registered, chain)
    smoke = smoke_test(conf, registered, deployed)
    report(conf, model, data, teacher, measured, verdict, registered, deployed, smoke, chain)


optimize_model()
