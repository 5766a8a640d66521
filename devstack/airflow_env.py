"""Environment for running the real Airflow CLI against a private home (SQLite by default).

    env = airflow_env(home / "airflow")
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True)
    subprocess.run([airflow_bin(), "dags", "test", "optimize_model", "-c", json.dumps(conf)], env=env)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.settings import REPO_ROOT


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def airflow_env(airflow_home: Path, sql_alchemy_conn: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``os.environ`` pointing Airflow at ``airflow_home`` and the repository's dags/."""
    airflow_home = Path(airflow_home)
    airflow_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn or f"sqlite:///{airflow_home / 'airflow.db'}",
        # Each worker process costs ~140 MB; a 2-core machine runs one heavy task at a time anyway.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                                                           "http://127.0.0.1:8080/execution/"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
        # Hugging Face must never reach for a hub: every model comes from a package or a path.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    })
    env.update(extra or {})
    return env
