"""tasks/ is the optimization library: it must never import Airflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted((ROOT / "tasks").rglob("*.py"))


def test_tasks_sources_never_import_airflow():
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "airflow"]
    assert not offenders, offenders


def test_every_tasks_module_imports_with_airflow_blocked():
    mods = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in MODULES
            if p.name not in ("__init__.py", "mlflow_pyfunc.py")]
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'airflow' or name.startswith('airflow.'): raise ImportError('airflow is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
        "assert not any(k.startswith('airflow') for k in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
