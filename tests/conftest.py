"""Test-session environment: nothing a test does touches the developer's .trimflow/ or ~/airflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="trimflow-tests-"))
REPO = Path(__file__).resolve().parents[1]

# Set before anything imports airflow or reads Settings.
os.environ.setdefault("TRIMFLOW_HOME", str(_SESSION_HOME / "home"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_HOME / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION_HOME / 'airflow' / 'airflow.db'}"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
