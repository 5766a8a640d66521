"""Write and manage a versioned Triton model repository, in a local folder or under ``s3://``.

A version folder holds the python-backend code (``model.py`` + ``generator.py``) and the
exported model (ONNX file, ``tokenizer.json``, ``trimflow_model.json``). It is published
atomically and never overwritten; ``trimflow_version.json`` inside it is written last:

    repo = ModelRepository(settings.triton_repository)
    repo.write_version("tinyllm", 3, exported_dir)          # <repo>/tinyllm/3/...
    repo.write_config("tinyllm", spec.to_pbtxt())            # <repo>/tinyllm/config.pbtxt
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from serving.runtime import early_exit as early_exit_runtime
from tasks.errors import DeployError
from tasks.store import iter_files, parse_s3_uri, s3_client, tree_digest

MARKER = "trimflow_version.json"
CONFIG = "config.pbtxt"
FAILED = "_failed"
SERVING_DIR = Path(__file__).resolve().parent
MODEL_CODE = SERVING_DIR / "triton_models" / "llm_generate"
GENERATOR = SERVING_DIR / "runtime" / "generator.py"
EARLY_EXIT_META = early_exit_runtime.META  # an early-exit export is served by the llm_early_exit model
REQUIRED_FILES = ("tokenizer.json", "trimflow_model.json")
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json",
                  "chat_template.jinja")


@dataclass(frozen=True)
class WrittenVersion:
    """What ``write_version`` published.

    Attributes:
        uri: the version folder (path or ``s3://`` URI).
        digest: sha256 over the folder's files (the marker excluded).
        reused: True when an identical version was already there (a retried task).
        files: relative file names in the version folder.
    """

    uri: str
    digest: str
    reused: bool
    files: tuple[str, ...]


def stage_version(source_dir: Path, dest: Path, onnx_file: str | None = None, model_code: Path = MODEL_CODE) -> str:
    """Fill ``dest`` with a complete version folder built from an exported model; returns its digest.

    Args:
        source_dir: exported model (``tasks.export`` output: ONNX file, tokenizer, ``trimflow_model.json``).
        dest: empty or missing folder to fill.
        onnx_file: the ONNX file to serve (default None: the one ``trimflow_model.json`` names);
            the copied ``trimflow_model.json`` names it, so the version folder is self-describing.
        model_code: folder with the python-backend ``model.py`` (default the ``llm_generate`` model).

    Raises:
        DeployError: listing every file the source lacks.
    """
    source_dir, dest = Path(source_dir), Path(dest)
    if (source_dir / EARLY_EXIT_META).is_file():
        return _stage_early_exit(source_dir, dest)
    missing = [n for n in REQUIRED_FILES if not (source_dir / n).is_file()]
    meta = {}
    if "trimflow_model.json" not in missing:
        meta = json.loads((source_dir / "trimflow_model.json").read_text())
    onnx_name = onnx_file or meta.get("onnx_file", "model.onnx")
    if not (source_dir / onnx_name).is_file():
        missing.append(onnx_name)
    if not (model_code / "model.py").is_file():
        missing.append(str(model_code / "model.py"))
    if missing:
        raise DeployError(f"cannot build a model version from {source_dir}: missing {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    for py in sorted(model_code.glob("*.py")):
        shutil.copy2(py, dest / py.name)
    # The python backend imports modules beside model.py, and the stub has no `serving` package.
    shutil.copy2(GENERATOR, dest / "generator.py")
    names = [onnx_name] + [n for n in (f"{onnx_name}.data",) + OPTIONAL_FILES if (source_dir / n).is_file()]
    names += [n for n in REQUIRED_FILES if n != "trimflow_model.json"]
    for name in names:
        shutil.copy2(source_dir / name, dest / name)
    meta["onnx_file"] = onnx_name
    (dest / "trimflow_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return tree_digest(dest)


def _stage_early_exit(source_dir: Path, dest: Path) -> str:
    """A version folder for a ``tasks.early_exit`` export: the ``llm_early_exit`` model, its runtime
    modules and every file the export's metadata names (segments, head, tokenizer)."""
    try:
        names = early_exit_runtime.export_files(source_dir)
    except Exception as e:
        raise DeployError(f"cannot build a model version from early-exit export {source_dir}: {e}") from e
    missing = [n for n in names if not (source_dir / n).is_file()]
    if missing:
        raise DeployError(f"cannot build a model version from {source_dir}: missing {', '.join(missing)}")
    early_exit_runtime.stage_model_code(dest)
    shutil.copy2(GENERATOR, dest / "generator.py")
    for name in names + [n for n in OPTIONAL_FILES if (source_dir / n).is_file()]:
        shutil.copy2(source_dir / name, dest / name)
    return tree_digest(dest)


class ModelRepository:
    """A Triton model repository at ``root`` (local folder or ``s3://bucket/prefix``).

    Args:
        root: the repository location.
        endpoint_url: S3 endpoint (default None: ``AWS_ENDPOINT_URL`` or AWS).
        scratch: local folder for staging S3 uploads (default None: the system temp folder).
    """

    def __init__(self, root: str | Path, endpoint_url: str | None = None, scratch: Path | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.is_s3 = self.root.startswith("s3://")
        self._endpoint = endpoint_url
        self._client = None
        self.scratch = Path(scratch) if scratch else None
        if self.is_s3:
            self.bucket, self.prefix = parse_s3_uri(self.root)
        else:
            self.root = str(Path(self.root).resolve())

    def __repr__(self) -> str:
        return f"ModelRepository({self.root!r})"

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self._endpoint)
        return self._client

    # -- addressing ------------------------------------------------------------------------
    def uri(self, *parts: object) -> str:
        return "/".join([self.root] + [str(p) for p in parts])

    def _key(self, *parts: object) -> str:
        return "/".join([p for p in [self.prefix] if p] + [str(p) for p in parts])

    def _local(self, *parts: object) -> Path:
        return Path(self.root).joinpath(*[str(p) for p in parts])

    def _s3_keys(self, prefix: str) -> list[str]:
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    # -- versions --------------------------------------------------------------------------
    def marker(self, model: str, version: int) -> dict | None:
        """The marker of a complete version, None when the version is absent or incomplete."""
        if not self.is_s3:
            p = self._local(model, version, MARKER)
            return json.loads(p.read_text()) if p.is_file() else None
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(model, version, MARKER))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return json.loads(body)

    def _version_present(self, model: str, version: int) -> bool:
        """Anything at all under the version folder, complete or not."""
        if not self.is_s3:
            return self._local(model, version).exists()
        return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(model, version) + "/",
                                                MaxKeys=1).get("KeyCount", 0))

    def versions(self, model: str) -> list[int]:
        """Complete versions of ``model`` (folders with a marker), ascending."""
        if not self.is_s3:
            d = self._local(model)
            found = [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()] if d.is_dir() else []
            return sorted(v for v in found if (d / str(v) / MARKER).is_file())
        base = self._key(model) + "/"
        return sorted(int(k[len(base):].split("/")[0]) for k in self._s3_keys(base)
                      if k.endswith("/" + MARKER) and k[len(base):].split("/")[0].isdigit())

    def write_version(self, model: str, version: int, source_dir: Path, *, onnx_file: str | None = None,
                      model_code: Path = MODEL_CODE) -> WrittenVersion:
        """Publish ``source_dir`` as ``<model>/<version>``; never overwrites.

        If the version already exists with the very same content (a retried task), it is reused.

        Raises:
            DeployError: the version exists with other content, or the source is incomplete.
        """
        if int(version) < 1:
            raise DeployError(f"Triton versions start at 1, got {version} for {model}")
        version = int(version)
        if not self.is_s3:
            self._local(model).mkdir(parents=True, exist_ok=True)
        # WAR: Triton reads every sub-folder of a model whose name parses as an integer prefix (stoll:
        # "3.tmp" is version 3), so a staging folder must begin with a non-digit.
        parent = self._local(model) if not self.is_s3 else self.scratch
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=parent))
        try:
            digest = stage_version(source_dir, staging, onnx_file=onnx_file, model_code=model_code)
            files = tuple(p.relative_to(staging).as_posix() for p in iter_files(staging))
            existing = self.marker(model, version)
            if existing is not None and existing.get("digest") == digest:
                return WrittenVersion(self.uri(model, version), digest, True, files)
            if existing is not None or self._version_present(model, version):
                raise DeployError(f"refusing to overwrite {self.uri(model, version)}: it exists with other content "
                                  f"(Triton versions are immutable; use a new version number)")
            marker = {"model": model, "version": version, "digest": digest, "files": list(files),
                      "source": str(source_dir), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
            if not self.is_s3:
                # rename(2) fails on a non-empty target, so a racing writer cannot be overwritten either.
                os.rename(staging, self._local(model, version))
            else:
                for rel in files:
                    self.client.upload_file(str(staging / rel), self.bucket, self._key(model, version, rel))
                self.client.upload_file(str(staging / MARKER), self.bucket, self._key(model, version, MARKER))
            return WrittenVersion(self.uri(model, version), digest, False, files)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def move_aside(self, model: str, version: int) -> str:
        """Move ``<model>/<version>`` to ``<model>/_failed/<version>`` (suffixed if taken); returns where.

        Triton ignores ``_failed`` (not a number), and the files stay for a post-mortem.
        """
        name = str(version)
        if not self.is_s3:
            src = self._local(model, version)
            if not src.exists():
                raise DeployError(f"no version folder {src} to move aside")
            dest = self._local(model, FAILED, name)
            if dest.exists():
                dest = dest.with_name(f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest)
            return str(dest)
        src = self._key(model, version) + "/"
        keys = self._s3_keys(src)
        if not keys:
            raise DeployError(f"no version folder {self.uri(model, version)} to move aside")
        if self._s3_keys(self._key(model, FAILED, name) + "/"):
            name = f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        # The marker goes first, so a reader never sees a "complete" half-moved version.
        keys.sort(key=lambda k: not k.endswith("/" + MARKER))
        for k in keys:
            self.client.copy_object(Bucket=self.bucket, Key=self._key(model, FAILED, name, k[len(src):]),
                                    CopySource={"Bucket": self.bucket, "Key": k})
            self.client.delete_object(Bucket=self.bucket, Key=k)
        return self.uri(model, FAILED, name)

    def remove_version(self, model: str, version: int) -> None:
        """Delete ``<model>/<version>``; a version that is loaded must be unloaded (policy) first."""
        if not self.is_s3:
            shutil.rmtree(self._local(model, version))
            return
        keys = self._s3_keys(self._key(model, version) + "/")
        keys.sort(key=lambda k: not k.endswith("/" + MARKER))
        for k in keys:
            self.client.delete_object(Bucket=self.bucket, Key=k)

    def copy_version(self, model: str, version: int, dest_model: str) -> WrittenVersion:
        """Publish ``<model>/<version>`` again as ``<dest_model>/<version>`` (a canary or search copy).

        Local files are hard-linked (version folders are immutable, so sharing inodes is safe and
        a 500 MB model costs nothing); S3 objects are copied server-side. The copy gets a marker of
        its own naming where it came from, written last as in ``write_version``. An identical copy
        already there is reused.

        Raises:
            DeployError: the source version is absent/incomplete, or the destination exists with other content.
        """
        version = int(version)
        src = self.marker(model, version)
        if src is None:
            raise DeployError(f"cannot copy {self.uri(model, version)}: no complete version there")
        existing = self.marker(dest_model, version)
        if existing is not None and existing.get("digest") == src["digest"]:
            return WrittenVersion(self.uri(dest_model, version), src["digest"], True, tuple(src["files"]))
        if existing is not None or self._version_present(dest_model, version):
            raise DeployError(f"refusing to overwrite {self.uri(dest_model, version)}: it exists with other content")
        marker = {**src, "model": dest_model, "copied_from": self.uri(model, version),
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        files = tuple(src["files"])
        if not self.is_s3:
            self._local(dest_model).mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self._local(dest_model)))
            try:
                for rel in files:
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(self._local(model, version, rel), target)
                    except OSError:  # another file system, or links not allowed: a plain copy
                        shutil.copy2(self._local(model, version, rel), target)
                (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
                os.rename(staging, self._local(dest_model, version))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            for rel in files:
                self.client.copy_object(Bucket=self.bucket, Key=self._key(dest_model, version, rel),
                                        CopySource={"Bucket": self.bucket, "Key": self._key(model, version, rel)})
            self.client.put_object(Bucket=self.bucket, Key=self._key(dest_model, version, MARKER),
                                   Body=json.dumps(marker, indent=2, sort_keys=True).encode())
        return WrittenVersion(self.uri(dest_model, version), src["digest"], False, files)

    def remove_model(self, model: str) -> None:
        """Delete everything under ``<model>/`` (a canary or search copy); Triton must have unloaded it."""
        if not self.is_s3:
            shutil.rmtree(self._local(model), ignore_errors=True)
            return
        keys = self._s3_keys(self._key(model) + "/")
        # Markers first: a half-deleted version never looks complete.
        keys.sort(key=lambda k: not k.endswith("/" + MARKER))
        for k in keys:
            self.client.delete_object(Bucket=self.bucket, Key=k)

    def has_model(self, model: str) -> bool:
        """Anything at all under ``<model>/``."""
        if not self.is_s3:
            return self._local(model).exists()
        return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(model) + "/",
                                                MaxKeys=1).get("KeyCount", 0))

    # -- files beside the config -------------------------------------------------------------
    def write_text(self, model: str, name: str, text: str) -> str:
        """Write ``<model>/<name>`` atomically (e.g. ``search.json`` beside ``config.pbtxt``); returns where.

        Triton ignores files in a model folder whose names are not version numbers.
        """
        if "/" in name or name.split(".")[0].isdigit() or name == CONFIG:
            raise DeployError(f"{name!r} is not a plain file name beside {CONFIG} (use write_config for the config)")
        return self._put_text(model, name, text)

    def _put_text(self, model: str, name: str, text: str) -> str:
        """``<model>/<name>`` replaced atomically (a local rename; one S3 PUT); returns where."""
        if not self.is_s3:
            path = self._local(model, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            return str(path)
        self.client.put_object(Bucket=self.bucket, Key=self._key(model, name), Body=text.encode())
        return self.uri(model, name)

    def read_text(self, model: str, name: str) -> str | None:
        """``<model>/<name>``, or None when absent."""
        if not self.is_s3:
            p = self._local(model, name)
            return p.read_text() if p.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(model, name))["Body"].read().decode()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    # -- config ----------------------------------------------------------------------------
    def write_config(self, model: str, text: str) -> str:
        """Replace ``<model>/config.pbtxt`` atomically; returns its location."""
        return self._put_text(model, CONFIG, text)

    def read_config(self, model: str) -> str | None:
        return self.read_text(model, CONFIG)

    def remove_config(self, model: str) -> None:
        if not self.is_s3:
            self._local(model, CONFIG).unlink(missing_ok=True)
        else:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(model, CONFIG))
