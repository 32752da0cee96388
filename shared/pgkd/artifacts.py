"""The artifact store: datasets, checkpoints and reports addressed by URI, through fsspec.

A local folder by default (`PGKD_ARTIFACTS=file:///var/lib/pgkd`), object storage in a cluster
(`s3://bucket/prefix`, with the `s3` extra). Messages carry `ArtifactRef`s (where + sha256), never
the bytes; a reference names its artifact relative to the store (its key), so a store copied, moved
or mounted at another path still resolves every reference it holds. Writes are atomic: on a file
system the bytes go to a temporary name first and are renamed into place, so a crash never leaves a
half-written artifact under its real name; an object store's PUT is atomic already.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TypeVar

import fsspec
from pydantic import BaseModel, Field, ValidationError

from pgkd.errors import EnvironmentFailure, Option, UserError, dotted, invalid
from pgkd.files import is_temporary_of, temporary_name, write_bytes_atomic
from pgkd.names import check_relative, inside, is_relative
from pgkd.ownership import write_owner
from pgkd import settings
from pgkd.settings import ArtifactSettings, check_artifacts_url, read

DEFAULT_ARTIFACTS = settings.DEFAULT_ARTIFACTS
OWNER = ".pgkd-store.json"   # at a local store's root: the folder is pgkd's, and pgkd writes there
# What pgkd writes at a store's root: a store written before OWNER existed holds only these.
STORE_FOLDERS = frozenset({"runs", "datasets", "blobs", "streams", "promotions", "teacher-cache"})
ModelT = TypeVar("ModelT", bound=BaseModel)


class ArtifactRef(BaseModel, frozen=True):
    """An artifact: where it is in the artifact store, and its sha256 (checked on every read).

    `uri` is a URI reference relative to the store that holds the artifact: its key, such as
    `runs/RUN/report.json`, resolved against the store's URL (`ArtifactStore.uri` gives the absolute
    URI). A store copied, moved, restored from a backup or mounted at another path therefore resolves
    every reference in its records and in the messages about it. References written before they were
    relative hold the absolute URI of the store where they were written (`file:///old/place/runs/...`);
    they still resolve (`ArtifactStore.key_of`). The field keeps its name for the messages and records
    already written."""
    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")   # also a file name in caches: hex only
    size: int


class ArtifactError(EnvironmentFailure):
    """An artifact is missing or is not what its reference says: the store's fault (one line, exit 1)."""


class DamagedRecord(ArtifactError, UserError):
    """A stored JSON record that is not JSON, or not of the shape pgkd wrote: one line naming it."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri}: damaged ({problem})")
        self.uri, self.problem = uri, problem


class NotInStore(ArtifactError, UserError):
    """A reference that names another store's artifact (another scheme, another bucket): one line."""


class StoreUnwritable(ArtifactError):
    """The store cannot be written (permissions, a full disk, a file where a folder should be): the
    environment's fault, not the request's."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    def __init__(self, url: str | None = None, named: Option | None = None):
        # PGKD_ARTIFACTS (pgkd.settings.ArtifactSettings) when no URL is given; `named`: the option that
        # gave the URL instead (--teacher-cache), for the messages
        self.url = url or read(ArtifactSettings).artifacts
        self.named = named
        try:
            check_artifacts_url(self.url)
            self.url = self.url.rstrip("/")
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:     # a library this machine lacks (s3fs, gcsfs): the environment, not the URL
            raise EnvironmentFailure(f"{named or f'PGKD_ARTIFACTS={self.url}'}: {e}") from None
        except ValueError as e:
            raise UserError(named or f"PGKD_ARTIFACTS={self.url}", f": {e}") from None
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.root = os.path.abspath(self.root)
            self.url = f"file://{self.root}"
        self._claimed = not self.local

    def check_owned(self) -> None:
        """What `claim` refuses, refused without writing anything (a command that must first reach a
        broker, and store nothing if it cannot)."""
        if not self._claimed:
            self._owned_or_refused(write=False)

    def claim(self) -> None:
        """Before the first write into a local store: its folder is new, empty, or pgkd's (OWNER, or only
        what pgkd writes there); a folder of someone else's is refused (UserError), nothing written."""
        if not self._claimed:
            self._owned_or_refused(write=True)
            self._claimed = True

    def _owned_or_refused(self, write: bool) -> None:
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise UserError(f"artifact store {self.url}: not a folder")
        above = next((p for p in root.parents if p.exists()), None)
        if not root.exists() and above is not None and not above.is_dir():
            raise StoreUnwritable(f"artifact store {self.url}: cannot write there ({above} is a file, not a folder)")
        entries = {p.name for p in root.iterdir()} if root.exists() else set()
        if OWNER not in entries:
            # another process claiming the store at once is half way through writing OWNER
            foreign = sorted(e for e in entries - STORE_FOLDERS if not is_temporary_of(e, OWNER))
            if foreign:
                raise UserError(f"artifact store {self.url}: {foreign[0]} was not written by pgkd (no {OWNER}); "
                                "a store is a folder of pgkd's own: choose another (",
                                self.named or "PGKD_ARTIFACTS", ")")
            if write:
                root.mkdir(parents=True, exist_ok=True)
                write_owner(root / OWNER, note="pgkd's artifact store: runs, datasets, checkpoints, streams")

    def uri(self, key: str) -> str:
        """The absolute URI of a key, for people (a reference names the key alone: `ArtifactRef`)."""
        return f"{self.url}/{key}"

    def location(self, ref: ArtifactRef) -> str:
        """The absolute URI of a reference's artifact in this store (what `pgkd export` takes)."""
        return self.uri(self.key_of(ref.uri))

    def _path(self, key: str) -> str:
        """Where a key is: every key is a relative path of names (pgkd.names), and on a file system
        it must resolve inside the store's root, links included."""
        if self.local:
            return str(inside(self.root, key, what="artifact key"))
        return f"{self.root}/{check_relative(key, 'artifact key')}"

    def key_of(self, uri: str) -> str:
        """The key a reference's `uri` names in this store, a relative path (pgkd.names: UnsafeName if not):
        - a key (no `://` in it: a key never holds one), as references are written now;
        - this store's URL, then a key;
        - in a local store, an older reference's absolute `file://` URI from wherever the store was when it
          was written (a store copied, moved, restored or mounted elsewhere): the key is the rest of its
          path from a component that is one of STORE_FOLDERS (from the first such one whose key is in this
          store; from the first one when none is). The path is this store's root joined with that key,
          through `inside`: never anything outside the root; the reference's sha256 is checked on read.
        Any other URI (another scheme, another bucket, a path with no store folder) is of another store:
        NotInStore (an ArtifactError and a UserError: one line)."""
        if "://" not in uri:
            return check_relative(uri, "artifact key")
        if uri.startswith(self.url + "/"):
            return check_relative(uri[len(self.url) + 1:], "artifact key")
        if self.local and uri.startswith("file://"):
            parts = uri[len("file://"):].split("/")
            keys = [key for i, part in enumerate(parts) if part in STORE_FOLDERS
                    and is_relative(key := "/".join(parts[i:]))]
            if keys:
                return next((key for key in keys if self._holds(key)), keys[0])
        raise NotInStore(f"{uri}: not in this artifact store ({self.url})")

    def _holds(self, key: str) -> bool:
        """Whether the store holds `key`; False, not an error, for a key that leads outside the root."""
        try:
            return self.exists(key)
        except UserError:
            return False

    def _path_of_uri(self, uri: str) -> str:
        return self._path(self.key_of(uri))

    # -- bytes ---------------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, digest: str | None = None) -> ArtifactRef:
        path = self._path(key)
        try:
            if self.local:
                self.claim()
                self.fs.makedirs(os.path.dirname(path), exist_ok=True)
                write_bytes_atomic(path, data)
            else:
                self.fs.pipe_file(path, data)
        except OSError as e:
            raise StoreUnwritable(f"artifact store {self.url}: cannot write {key} ({e.strerror or e})") from None
        return ArtifactRef(uri=key, sha256=digest or sha256_of(data), size=len(data))

    def put_new(self, key: str, data: bytes) -> ArtifactRef | None:
        """Store `data` under `key` only if the store holds nothing there yet, as one step: of writers
        racing for one key (two `pgkd submit --run-id R` at once), exactly one stores its bytes and
        the others get None; a reader never sees half of them."""
        path = self._path(key)
        put = getattr(self.fs, "_pipe_file", None)   # an object store client's own put (s3fs, gcsfs)
        try:
            if self.local:
                self.claim()
                self.fs.makedirs(os.path.dirname(path), exist_ok=True)
                _link_new(path, data)
            elif put is not None and "mode" in inspect.signature(put).parameters:
                # s3fs and gcsfs since 2024.12: a conditional put (If-None-Match: *; ifGenerationMatch=0),
                # FileExistsError when the key exists. An S3-compatible server that ignores the header
                # (some do) puts anyway: there the race below remains.
                self.fs.pipe_file(path, data, mode="create")
            else:
                # An older client has no conditional put: a writer racing this one between the look and
                # the put can still be overwritten by it (the last one's bytes stay).
                if self.fs.exists(path):
                    return None
                self.fs.pipe_file(path, data)
        except FileExistsError:
            return None
        except OSError as e:
            raise StoreUnwritable(f"artifact store {self.url}: cannot write {key} ({e.strerror or e})") from None
        return ArtifactRef(uri=key, sha256=sha256_of(data), size=len(data))

    def get_bytes(self, ref: ArtifactRef | str) -> bytes:
        """By reference (checked against its sha256) or by key."""
        path = self._path_of_uri(ref.uri) if isinstance(ref, ArtifactRef) else self._path(ref)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ArtifactError(f"{self._uri_of(ref)}: missing") from None
        except IsADirectoryError:
            raise ArtifactError(f"{self._uri_of(ref)}: a folder of the store, not an artifact") from None
        except OSError as e:
            raise ArtifactError(f"{self._uri_of(ref)}: cannot read it ({e.strerror or e})") from None
        if isinstance(ref, ArtifactRef) and sha256_of(data) != ref.sha256:
            raise ArtifactError(f"{self._uri_of(ref)}: sha256 {sha256_of(data)[:12]} is not the referenced "
                                f"{ref.sha256[:12]}")
        return data

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def size(self, key: str) -> int | None:
        """The stored object's size in bytes; None when there is none."""
        try:
            return self.fs.size(self._path(key))
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        """Keys under a folder-like prefix, sorted; temporary files are not listed."""
        path = self._path(prefix)
        if not self.fs.exists(path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        return sorted(f"{prefix}/{n}" for n in names if not n.startswith("."))

    # -- JSON and pydantic models -------------------------------------------------------------------------
    def put_json(self, key: str, data) -> ArtifactRef:
        return self.put_bytes(key, json_bytes(data))

    def get_json(self, ref: ArtifactRef | str):
        try:
            return json.loads(self.get_bytes(ref))
        except ValueError as e:   # not JSON, or not UTF-8
            raise DamagedRecord(self._uri_of(ref), f"not JSON: {e}") from None

    def get_model(self, ref: ArtifactRef | str, model: type[ModelT]) -> ModelT:
        """A stored record read as `model`. One that is not of its shape is a DamagedRecord naming the
        file: pydantic's own error would reach the command line as missing options."""
        try:
            return model.model_validate(self.get_json(ref))
        except ValidationError as e:
            raise DamagedRecord(self._uri_of(ref), f"not a {model.__name__}: {invalid(e, dotted('the record'))}") from None

    def _uri_of(self, ref: ArtifactRef | str) -> str:
        """Where a reference or a key is, for messages: its absolute URI in this store."""
        if not isinstance(ref, ArtifactRef):
            return self.uri(ref)
        try:
            return self.location(ref)
        except (ArtifactError, UserError):
            return ref.uri

    # -- folders (model checkpoints) as a manifest of content-addressed files -----------------------------
    # A folder is stored as a JSON manifest (file name -> sha256 and size) and one blob per file under
    # blobs/sha256/<digest>, written only when the store lacks it: a file with the same bytes in another
    # checkpoint (a tokenizer, the frozen word embeddings of every cycle) is stored once. The
    # manifest's sha256 covers every file's, so a reference to it names the whole folder, immutably.
    def put_files(self, key: str, files: dict[str, bytes], cache: str | Path | None = None) -> ArtifactRef:
        """Store a folder given as {relative path: bytes}; with `cache`, also leave it unpacked there,
        so that this machine never reads back what it wrote."""
        entries = {}
        for name, data in sorted(files.items()):
            digest = sha256_of(data)
            blob = blob_key(digest)
            if not self.exists(blob):
                self.put_bytes(blob, data, digest=digest)
            entries[name] = {"sha256": digest, "size": len(data)}
        ref = self.put_json(key, {"format": MANIFEST_FORMAT, "files": entries})
        if cache is not None:
            _unpack(Path(cache), ref.sha256, entries, lambda name, entry: files[name])
        return ref

    def put_folder(self, key: str, folder: str | Path) -> ArtifactRef:
        folder = Path(folder)
        return self.put_files(key, {str(p.relative_to(folder)): p.read_bytes()
                                    for p in sorted(folder.rglob("*")) if p.is_file()})

    def get_folder(self, ref: ArtifactRef, cache: str | Path) -> Path:
        """The folder unpacked into `cache/<sha256>/` once; later calls reuse it. Each file is checked
        against its sha256 and kept in `cache/blobs/`, so a file shared by several checkpoints is read
        from the store once."""
        cache = Path(cache)
        target = cache / ref.sha256
        if (target / ".complete").is_file():
            return target
        data = self.get_bytes(ref)
        try:
            manifest = json.loads(data)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = repr(manifest.get("format")) if isinstance(manifest, dict) else "not JSON"
            raise ArtifactError(f"{self._uri_of(ref)}: not a folder manifest ({found})")
        return _unpack(cache, ref.sha256, manifest["files"], lambda name, entry: self._blob(entry, cache))

    def _blob(self, entry: dict, cache: Path) -> Path:
        """A blob in the local cache, fetched and checked first if it is not there."""
        path = cache / "blobs" / entry["sha256"]
        if not path.is_file():
            data = self.get_bytes(ArtifactRef(uri=blob_key(entry["sha256"]), **entry))
            _write_new(path, data)
        return path


MANIFEST_FORMAT = "pgkd-folder/1"


def json_bytes(data) -> bytes:
    """How the store writes a JSON record."""
    return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode()


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest}"


def _link_new(path: str, data: bytes) -> None:
    """`data` at `path` unless a file is there (FileExistsError): written whole under a temporary name,
    then hard-linked to `path`, which fails when `path` exists; O_EXCL on `path` itself would let a
    reader see the file half written."""
    tmp = temporary_name(path)
    write_bytes_atomic(tmp, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _write_new(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def _unpack(cache: Path, digest: str, entries: dict, source) -> Path:
    """`cache/<digest>/`, each file hard-linked to its blob in `cache/blobs/` (copied where links do not
    work). `source(name, entry)` gives the file's bytes, or the path of its blob in the cache already.
    Folders in the cache are shared: read them, copy them, never write into them."""
    target = cache / digest
    if (target / ".complete").is_file():
        return target
    for name, entry in entries.items():
        if not is_relative(name) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
            raise ArtifactError(f"{name!r}: a file name outside its folder, or not a sha256")
    staging = cache / f".{digest}.{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        for name, entry in entries.items():
            blob = cache / "blobs" / entry["sha256"]
            got = source(name, entry)
            if not isinstance(got, Path) and not blob.is_file():
                _write_new(blob, got)
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, path)
            except OSError:
                shutil.copyfile(blob, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _commit(staging, target)


def _commit(staging: Path, target: Path) -> Path:
    (staging / ".complete").touch()
    try:
        os.replace(staging, target)
    except OSError:  # another worker unpacked it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
