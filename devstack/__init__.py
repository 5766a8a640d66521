"""Local stand-ins for the production back ends, for the demo and integration tests.

Each runs the real server on 127.0.0.1 (MLflow tracking server, an S3 API via
``rclone serve s3``, Airflow's CLI with its own home) and stops its whole process group.

    with MlflowServer(home / "mlflow").running() as mlflow_server:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
"""
