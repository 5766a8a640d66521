"""The optimize DAG triggered through Airflow's REST API and run by a real scheduler
(LocalExecutor, metadata on PostgreSQL), as an operator's trigger from the UI would run it.
"""

from __future__ import annotations

import uuid

import pytest

from tests.integration.dagstack import TINY, env_vars, registry_versions, start_stack, stop_stack

pytestmark = pytest.mark.integration


def test_scheduler_runs_optimize_dag_when_triggered_over_rest(tmp_path_factory, tiny_source):
    from devstack import postgres
    from devstack.airflow_env import airflow_env
    from devstack.airflow_stack import AirflowStack
    from serving.client import generate

    tmp = tmp_path_factory.mktemp("sched")
    stack, mlflow_server, db = start_stack(tmp)
    af_db = f"trimflow_af_{uuid.uuid4().hex[:10]}"
    af_url = postgres.create_database(af_db)
    try:
        env = airflow_env(tmp / "airflow", sql_alchemy_conn=af_url, extra=stack.env)
        with env_vars(stack.env), AirflowStack(tmp / "airflow", env).started() as af:
            run_id = af.trigger("optimize_model", {**TINY, "source": str(tiny_source),
                                                   "registered_model": "trimflow-sched"})
            state = af.wait("optimize_model", run_id, timeout=900)
            tasks = af.task_states("optimize_model", run_id)
            assert state == "success", tasks
            assert set(tasks.values()) == {"success"}, tasks
            versions = registry_versions(stack, "trimflow-sched")
            assert [v["version"] for v in versions] == [1] and "champion" in versions[0]["aliases"]
            assert generate(stack.triton_grpc, "tiny_llm", "The council", max_tokens=4).strip()
    finally:
        stop_stack(stack, mlflow_server, db)
        postgres.drop_database(af_db)
