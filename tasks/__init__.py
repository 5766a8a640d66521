"""trimflow optimization library: one module per pipeline step.

This package never imports Airflow, so every step runs from a CLI, a test or any
orchestrator:

    from tasks import ingest, config
    result = ingest.run(config.IngestConfig(source="smollm2"), out_dir)
"""
