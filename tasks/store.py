"""Artifact store: publish step outputs atomically to a local folder or to S3.

A step works in a private local folder, then publishes it under a key. A key is
published exactly once: a local publish is a rename of a finished temp folder;
an S3 publish uploads every file, then writes ``_MANIFEST.json`` last, so a reader
that sees the manifest sees the whole folder. Readers fetch a key to a local folder.

    store = ArtifactStore.from_root("s3://bucket/runs", scratch=Path("/tmp/x"))
    uri = store.publish(local_dir, "run-1/distill")
    local = store.fetch("run-1/distill")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from tasks.errors import SourceError, TrimflowError

MANIFEST = "_MANIFEST.json"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise SourceError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"s3 URI has no bucket: {uri!r}")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client; the endpoint defaults to ``AWS_ENDPOINT_URL`` (a local S3 server in tests)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
        # Path-style addressing: local S3 servers (rclone, MinIO) do not serve virtual-host buckets.
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )


def iter_files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p


def tree_digest(root: Path) -> str:
    """sha256 over relative paths and contents of every file under ``root``, order-independent."""
    h = hashlib.sha256()
    for p in iter_files(root):
        if p.name == MANIFEST:
            continue
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class ArtifactStore:
    """Publishes folders under keys below a root (local path or ``s3://`` URI)."""

    def __init__(self, root: str, scratch: Path, endpoint_url: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.scratch = Path(scratch)
        self.is_s3 = self.root.startswith("s3://")
        self._endpoint = endpoint_url
        self._client = None
        if self.is_s3:
            self.bucket, self.prefix = parse_s3_uri(self.root)

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self._endpoint)
        return self._client

    def uri(self, key: str) -> str:
        return f"{self.root}/{key.strip('/')}"

    def _s3_key(self, key: str, name: str = "") -> str:
        parts = [p for p in (self.prefix, key.strip("/"), name) if p]
        return "/".join(parts)

    def exists(self, key: str) -> bool:
        """True once ``key`` is completely published."""
        if not self.is_s3:
            return (Path(self.root) / key / MANIFEST).is_file()
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._s3_key(key, MANIFEST))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def manifest(self, key: str) -> dict:
        if not self.is_s3:
            return json.loads((Path(self.root) / key / MANIFEST).read_text())
        body = self.client.get_object(Bucket=self.bucket, Key=self._s3_key(key, MANIFEST))["Body"].read()
        return json.loads(body)

    def publish(self, local_dir: Path, key: str) -> str:
        """Publish the finished folder ``local_dir`` under ``key``; returns its URI.

        Publishing a key that already exists is refused: published artifacts are never
        overwritten (a retried step should find its finished work with ``exists`` first).
        The local folder is consumed (moved) for a local store.
        """
        local_dir = Path(local_dir)
        files = [p for p in iter_files(local_dir) if p.name != MANIFEST]
        manifest = {
            "key": key,
            "digest": tree_digest(local_dir),
            "files": {p.relative_to(local_dir).as_posix(): p.stat().st_size for p in files},
        }
        if self.exists(key):
            raise TrimflowError(f"refusing to overwrite published artifact {self.uri(key)}")
        if not self.is_s3:
            (local_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            dest = Path(self.root) / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(local_dir, dest)  # atomic on one filesystem; fails if dest exists
            except OSError:
                # Different filesystem: copy beside the target, then rename into place.
                tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
                shutil.copytree(local_dir, tmp)
                os.rename(tmp, dest)
                shutil.rmtree(local_dir, ignore_errors=True)
            return self.uri(key)
        for p in files:
            # upload_file uses multipart for large files; the object appears only when complete.
            self.client.upload_file(str(p), self.bucket, self._s3_key(key, p.relative_to(local_dir).as_posix()))
        self.client.put_object(Bucket=self.bucket, Key=self._s3_key(key, MANIFEST),
                               Body=json.dumps(manifest, indent=2, sort_keys=True).encode())
        return self.uri(key)

    def fetch(self, key: str) -> Path:
        """A local folder holding the published ``key`` (the folder itself for a local store)."""
        if not self.exists(key):
            raise SourceError(f"artifact {self.uri(key)} is not published")
        if not self.is_s3:
            return Path(self.root) / key
        manifest = self.manifest(key)
        dest = self.scratch / "s3-cache" / self.bucket / self._s3_key(key)
        done = dest / MANIFEST
        if done.is_file() and json.loads(done.read_text()).get("digest") == manifest["digest"]:
            return dest
        tmp = Path(tempfile.mkdtemp(dir=self._ensure(dest.parent), prefix=f".{dest.name}."))
        for rel in manifest["files"]:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, self._s3_key(key, rel), str(target))
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        return dest

    @staticmethod
    def _ensure(p: Path) -> Path:
        p.mkdir(parents=True, exist_ok=True)
        return p


def download_s3_prefix(uri: str, dest: Path, endpoint_url: str | None = None) -> Path:
    """Download every object under an ``s3://bucket/prefix`` to ``dest`` (used for model sources)."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client(endpoint_url)
    paginator = client.get_paginator("list_objects_v2")
    n = 0
    tmp = Path(tempfile.mkdtemp(dir=ArtifactStore._ensure(dest.parent), prefix=f".{dest.name}."))
    for page in paginator.paginate(Bucket=bucket, Prefix=(prefix + "/") if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):].lstrip("/") if prefix else obj["Key"]
            if not rel or rel.endswith("/"):
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
            n += 1
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"no objects under {uri}")
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest
