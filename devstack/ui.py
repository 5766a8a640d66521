"""Open the demo's state in the Airflow and MLflow UIs (loopback only).

    python -m devstack.ui mlflow     # ensures the demo's MLflow server runs, prints its URL
    python -m devstack.ui airflow    # api-server + scheduler + dag-processor + triggerer until Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from devstack.airflow_env import airflow_env
from devstack.airflow_stack import AirflowStack
from devstack.demo import MLFLOW_PORT, mlflow_for
from tasks.settings import Settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["airflow", "mlflow"])
    ap.add_argument("--port", type=int, default=8080, help="Airflow api-server port (default 8080)")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    server = mlflow_for(settings).start()
    print(f"MLflow UI: {server.url}")
    if args.which == "mlflow":
        return 0
    env = airflow_env(settings.home / "airflow", extra={"TRIMFLOW_HOME": str(settings.home),
                                                        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{MLFLOW_PORT}"})
    stack = AirflowStack(settings.home / "airflow", env, port=args.port).start()
    print(f"Airflow UI: {stack.url}  user {stack.user}  password {stack.password()}")
    print("Ctrl-C stops Airflow (MLflow and Triton keep running; `make stop` stops them)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRIMFLOW_HOME", str(Settings.from_env().home))
    sys.exit(main())
