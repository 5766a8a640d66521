"""Throw-away PostgreSQL databases on the machine's server (127.0.0.1:5432, trust auth).

    url = create_database("trimflow_it_1234")   # postgresql+psycopg2://postgres@127.0.0.1:5432/trimflow_it_1234
    drop_database("trimflow_it_1234")
"""

from __future__ import annotations

import os

HOST = os.environ.get("TRIMFLOW_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("TRIMFLOW_PG_PORT", "5432"))
USER = os.environ.get("TRIMFLOW_PG_USER", "postgres")


def _admin():
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=PORT, user=USER, dbname="postgres", connect_timeout=5)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    return conn


def available() -> bool:
    try:
        _admin().close()
        return True
    except Exception:  # any connection failure means "not available"; callers report it
        return False


def create_database(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r} must be alphanumeric with underscores")
    conn = _admin()  # not "with conn": psycopg2 would wrap the block in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return f"postgresql+psycopg2://{USER}@{HOST}:{PORT}/{name}"


def drop_database(name: str) -> None:
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()
