"""The artifact store: datasets, checkpoints and reports addressed by URI, through fsspec.

A local folder by default (`PGKD_ARTIFACTS=file:///var/lib/pgkd`), object storage in a cluster
(`s3://bucket/prefix`, with the `s3` extra). Messages carry `ArtifactRef`s (URI + sha256), never
the bytes. Writes are atomic: on a file system the bytes go to a temporary name first and are
renamed into place, so a crash never leaves a half-written artifact under its real name; an object
store's PUT is atomic already.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import fsspec
from pydantic import BaseModel

from pgkd.errors import UserError

DEFAULT_ARTIFACTS = "file://./artifacts"


class ArtifactRef(BaseModel, frozen=True):
    uri: str
    sha256: str
    size: int


class ArtifactError(Exception):
    """An artifact is missing or is not what its reference says."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    def __init__(self, url: str | None = None):
        self.url = (url or os.environ.get("PGKD_ARTIFACTS") or DEFAULT_ARTIFACTS).rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise UserError(f"PGKD_ARTIFACTS={self.url}: {e}") from None
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.root = os.path.abspath(self.root)
            self.url = f"file://{self.root}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _path_of_uri(self, uri: str) -> str:
        if not uri.startswith(self.url + "/"):
            raise ArtifactError(f"{uri}: not in this artifact store ({self.url})")
        return self._path(uri[len(self.url) + 1:])

    # -- bytes ---------------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> ArtifactRef:
        path = self._path(key)
        if self.local:
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return ArtifactRef(uri=self.uri(key), sha256=sha256_of(data), size=len(data))

    def get_bytes(self, ref: ArtifactRef | str) -> bytes:
        """By reference (checked against its sha256) or by key."""
        path = self._path_of_uri(ref.uri) if isinstance(ref, ArtifactRef) else self._path(ref)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactError(f"{ref.uri if isinstance(ref, ArtifactRef) else self.uri(ref)}: missing") from None
        if isinstance(ref, ArtifactRef) and sha256_of(data) != ref.sha256:
            raise ArtifactError(f"{ref.uri}: sha256 {sha256_of(data)[:12]} is not the referenced {ref.sha256[:12]}")
        return data

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def list(self, prefix: str) -> list[str]:
        """Keys under a folder-like prefix, sorted; temporary files are not listed."""
        path = self._path(prefix)
        if not self.fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        return sorted(f"{prefix}/{n}" for n in names if not n.startswith("."))

    # -- JSON and pydantic models -------------------------------------------------------------------------
    def put_json(self, key: str, data) -> ArtifactRef:
        return self.put_bytes(key, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode())

    def get_json(self, ref: ArtifactRef | str):
        return json.loads(self.get_bytes(ref))

    # -- folders (model checkpoints) as one tar artifact --------------------------------------------------
    def put_folder(self, key: str, folder: str | Path) -> ArtifactRef:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    info = tar.gettarinfo(str(path), arcname=str(path.relative_to(folder)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""  # same bytes, same sha
                    with path.open("rb") as f:
                        tar.addfile(info, f)
        return self.put_bytes(key, buffer.getvalue())

    def get_folder(self, ref: ArtifactRef, cache: str | Path) -> Path:
        """Unpack into `cache/<sha256>/` once; later calls reuse it."""
        target = Path(cache) / ref.sha256
        if (target / ".complete").is_file():
            return target
        staging = Path(cache) / f".{ref.sha256}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(self.get_bytes(ref)), mode="r") as tar:
            tar.extractall(staging, filter="data")
        (staging / ".complete").touch()
        try:
            os.replace(staging, target)
        except OSError:  # another worker unpacked it first
            import shutil
            shutil.rmtree(staging, ignore_errors=True)
        return target
