"""A run's output folder: pgkd replaces only what it wrote there, and a failed run leaves no result.

pgkd owns the entries it writes in OUT (`report.json`, `best/`, `history.png`, `reliability.png`) and records every file
it wrote in a manifest, `OUT/.pgkd-run.json`. A later run into the same OUT replaces the files that
manifest lists and nothing else: a user's notes beside the result stay, and a folder pgkd did not
write (no manifest) is refused before any work. The run writes into a hidden staging folder inside
OUT (same file system, so every move is a rename); only a finished run moves its files into place.

One run at a time writes OUT: a run holds an flock on `OUT/.pgkd-run.lock` from `open()` to its end, and
a second run into OUT is refused while it is held. The kernel releases an flock when its process dies,
even by SIGKILL, so a killed run never blocks the next, which finds its staging folder unlocked and
removes it. The lock file is pgkd's bookkeeping like the manifest (not part of the result, not listed
in it); a run removes it when it ends.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from pgkd import __version__
from pgkd.errors import Option, UserError
from pgkd.files import file_sha256, output_path_problem, write_json_atomic
from pgkd.names import UnsafeName, inside
from pgkd.ownership import WRITTEN_BY, read_owner

MANIFEST = ".pgkd-run.json"
STAGING = ".pgkd-staging"
LOCK = ".pgkd-run.lock"
BOOKKEEPING = frozenset({STAGING, LOCK})     # what a run keeps in OUT while it works; no result


def _files_under(folder: Path) -> list[str]:
    """Every file below `folder`, as POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def read_manifest(folder: Path) -> dict | None:
    """The manifest pgkd wrote in `folder`; None where there is none (or it is not pgkd's: no
    `written_by: pgkd`). A manifest of pgkd's whose entries are not files inside `folder` (`../x`, an
    absolute path, a path through a link) is not to be trusted: UserError, before anything is touched."""
    manifest = read_owner(folder / MANIFEST)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return None
    for rel in manifest["files"]:
        try:
            inside(folder, rel, what="entry", links=False)
        except UnsafeName as e:
            raise UserError(f"{folder / MANIFEST}: {e}; pgkd refuses this folder (move it aside, or remove "
                            "the manifest if the folder is yours)") from None
    return manifest


class RunOutput:
    """`open()` checks OUT and makes the staging folder (before any work), `commit()` puts the finished
    run in place, `abort()` removes what the run staged."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.staging = self.out / STAGING
        self._created_out = False
        self._made_folders: list[Path] = []   # the folders making OUT created, OUT first: abort removes them
        self._made_staging = False     # only what this run made is removed by abort()
        self._lock_file = None         # open while this run holds OUT's lock
        self.option = Option("out", self.out)     # named in every refusal: `out=` in Python, `--out` on a command

    # -- before any work --------------------------------------------------------------------------------
    def check(self) -> None:
        """What `open` checks, writing nothing (a dry run's --out)."""
        self._check_path()
        self._check_owned()

    def open(self) -> Path:
        self._check_path()
        self._pgkds_manifest()     # a folder that is not pgkd's is refused before the lock file is made in it
        try:
            self._lock()
            self._check_owned()    # under the lock: no other run changes OUT from here on
            if self.staging.exists():
                self._remove_stale_staging()     # no run holds the lock, so no run is writing it
            self.staging.mkdir()
            self._made_staging = True
            # The staging folder carries a manifest too, so a later run knows it may remove it.
            write_json_atomic(self.staging / MANIFEST, {"written_by": WRITTEN_BY, "state": "staging", "files": {}})
        except OSError as e:
            self.abort()
            raise UserError(self.option, f": cannot write there ({e.strerror or e})") from None
        except BaseException:    # a refusal, or a stop signal while the staging folder is made: nothing is left
            self.abort()
            raise
        return self.staging

    def _lock(self) -> None:
        """Make OUT if need be and take its lock, or refuse: another run is writing OUT."""
        path = self.out / LOCK
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        # Up to three tries: only a run that ends at this moment (removing OUT's lock file, or OUT it
        # made) makes a try fail, and then the next finds no one holding OUT.
        for _ in range(3):
            missing = [f for f in [self.out, *self.out.parents] if not f.exists()]   # OUT first, then its parents
            try:
                self.out.mkdir(parents=True)
                self._created_out, self._made_folders = True, missing
            except FileExistsError:
                pass          # there already, or made a moment ago by another run: the lock decides
            try:
                fd, made = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, made = os.open(path, flags), False
                except FileNotFoundError:
                    continue
            except FileNotFoundError:
                continue
            self._lock_file = os.fdopen(fd, "r+b", buffering=0)   # closed (lock released) if this object is lost
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._unlock(remove=False)
                raise UserError(self.option, ": another pgkd run is writing there; wait for it to end, or "
                                "choose another ", Option("out")) from None
            # A run that ended just now removed the file this one locked: that lock guards nothing.
            try:
                locked_the_file = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                locked_the_file = False
            if locked_the_file:
                if made:      # marked as pgkd's, so that a run may remove it (never a user's file of that name)
                    self._lock_file.write(json.dumps({"written_by": WRITTEN_BY, "note": "held by the pgkd run "
                                                      "writing this folder"}).encode())
                return
            self._unlock(remove=False)
        raise UserError(self.option, ": another pgkd run is writing there; wait for it to end, or choose another ",
                        Option("out"))

    def _unlock(self, remove: bool = True) -> None:
        """Release OUT's lock if this run holds it; with `remove`, its file goes too if it is pgkd's.
        The file is removed while still locked: a run that opened it meanwhile sees, once it locks, that
        the file it holds is no longer OUT's lock, and tries again."""
        if self._lock_file is None:
            return
        if remove and read_owner(self.out / LOCK) is not None:
            (self.out / LOCK).unlink(missing_ok=True)
        self._lock_file.close()
        self._lock_file = None

    def _check_path(self) -> None:
        """OUT can be a folder: nothing on its way is a file, and no name in it is too long; OUT itself is
        no link and holds no control character (pgkd.files.output_path_problem)."""
        if (problem := output_path_problem(self.out)) is not None:
            raise UserError(self.option, f": {problem}")
        try:
            for folder in [self.out, *self.out.parents]:
                if folder.exists():        # OSError for a path longer than the system allows
                    if not folder.is_dir():
                        raise UserError(self.option, ": exists and is not a folder" if folder == self.out
                                        else f": {folder} is a file, not a folder")
                    break
            # A name too long for the file system fails only at mkdir, when its parents are made already.
            longest = os.pathconf(folder, "PC_NAME_MAX")
            if any(len(os.fsencode(name)) > longest for name in self.out.relative_to(folder).parts):
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        except OSError as e:
            raise UserError(self.option, f": cannot write there ({e.strerror or e})") from None

    def _pgkds_manifest(self) -> dict | None:
        """OUT's manifest; None where OUT holds no result yet (missing, empty, or only what a run keeps
        there while it works). Refuses a folder pgkd did not write. Safe while another run writes OUT:
        a run writes the manifest before it moves anything into OUT."""
        if not self.out.is_dir() or all(p.name in BOOKKEEPING for p in self.out.iterdir()):
            return None
        manifest = read_manifest(self.out)
        if manifest is None:
            raise UserError(self.option, f": folder exists, is not empty and was not written by pgkd (no {MANIFEST}); "
                            "choose another ", Option("out"))
        return manifest

    def _check_owned(self) -> dict[str, dict]:
        """The files of OUT that pgkd wrote (relative path -> what the manifest says of it); refuses an
        OUT where a run would touch anything else, or a file pgkd wrote that was changed since."""
        manifest = self._pgkds_manifest()
        if manifest is None:
            return {}
        owned = manifest["files"]
        for rel, recorded in sorted(owned.items()):
            path = self.out / rel
            if path.is_file() and (not isinstance(recorded, dict) or recorded.get("sha256") != file_sha256(path)):
                raise UserError(self.option, f": {rel} was changed since pgkd wrote it (its sha256 is not the one "
                                f"in {MANIFEST}), and a run replaces it; move it elsewhere or choose another ",
                                Option("out"))
        for entry in sorted(RESULT_ENTRIES | {rel.split("/", 1)[0] for rel in owned}):
            try:
                path = inside(self.out, entry, what="entry", links=False)
            except UnsafeName as e:
                raise UserError(self.option, f": {e}") from None
            if not path.exists():
                continue
            files = [entry] if not path.is_dir() else [f"{entry}/{rel}" for rel in _files_under(path)]
            foreign = [rel for rel in files if rel not in owned]
            if foreign:
                raise UserError(self.option, f": {foreign[0]} was not written by pgkd, and a run replaces "
                                f"{entry}; move it elsewhere or choose another ", Option("out"))
        return owned

    def _remove_stale_staging(self) -> None:
        """A staging folder left by a killed run is removed only if it is pgkd's (and not a link)."""
        try:
            inside(self.out, STAGING, what="entry", links=False)
        except UnsafeName as e:
            raise UserError(self.option, f": {e}") from None
        if read_owner(self.staging / MANIFEST) is None:
            raise UserError(self.option, f": {self.staging} exists and was not written by pgkd; move it elsewhere")
        shutil.rmtree(self.staging)

    # -- after the work ---------------------------------------------------------------------------------
    def commit(self) -> Path:
        owned = self._check_owned()        # again: files may have been added while the run worked
        new = [rel for rel in _files_under(self.staging) if rel != MANIFEST]
        files = {rel: {"bytes": (self.staging / rel).stat().st_size, "sha256": file_sha256(self.staging / rel)}
                 for rel in new}
        # While entries are swapped OUT's manifest lists the old files and the new ones, so a crash
        # part-way leaves nothing of pgkd's unaccounted for; report.json goes last, so until then the
        # folder holds no result.
        journal = dict(owned) | files
        write_json_atomic(self.out / MANIFEST, self._manifest(journal, "replacing"))
        for rel in sorted(owned, key=lambda r: r != "report.json"):
            path = inside(self.out, rel, what="entry", links=False)
            if path.is_file() or path.is_symlink():
                path.unlink()
            self._remove_empty_parents(path)
        entries = sorted((p.name for p in self.staging.iterdir() if p.name != MANIFEST),
                         key=lambda name: name == "report.json")
        for name in entries:
            os.replace(self.staging / name, self.out / name)
        write_json_atomic(self.out / MANIFEST, self._manifest(files, "complete"))
        shutil.rmtree(self.staging)
        self._unlock()
        return self.out

    def _remove_empty_parents(self, path: Path) -> None:
        for folder in path.parents:
            if folder == self.out or not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()

    @staticmethod
    def _manifest(files: dict, state: str) -> dict:
        return {"written_by": WRITTEN_BY, "pgkd_version": __version__, "state": state,
                "note": "pgkd replaces the files listed here when a run writes to this folder again; "
                        "it leaves everything else alone",
                "files": files}

    def abort(self) -> None:
        if self._made_staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self._unlock()
        finally:    # OUT is removed after its lock: a run that takes OUT's lock meanwhile makes OUT again
            if self._created_out:
                for folder in self._made_folders:   # OUT, then the parents it made, each while it is empty
                    try:
                        folder.rmdir()
                    except OSError:
                        break


# The entries of OUT a run writes; each must be wholly pgkd's before a run may replace it.
RESULT_ENTRIES = frozenset({"report.json", "best", "history.png", "reliability.png"})
