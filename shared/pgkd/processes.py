"""The one supervisor of the child processes pgkd starts (tritonserver, the services, Tansu, Prometheus).

- `spawn` starts a child in a session of its own: a Ctrl-C or a closed terminal reaches the parent
  only, which then stops its children in the order it chooses; a signal to the child's process group
  reaches what the child started in turn (tritonserver's Python-backend stubs, `pgkd teacher serve`'s
  tritonserver). The child gets SIGTERM when its parent dies, even by SIGKILL (Linux's parent-death
  signal), so no child outlives a parent that could not stop it.
- `stop` ends a child and its process group: SIGTERM, then SIGKILL after a timeout.
- `stop_signals` makes SIGTERM and SIGHUP unwind the main thread as Ctrl-C does (an exception), so
  that `with` and `finally` blocks stop the children and remove the temporary folders. Their default
  action would end the process at once and leave both behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Iterable, Iterator, Mapping, Sequence

from pgkd.files import WRITTEN_BY, write_json_atomic

STOP_TIMEOUT = 15.0     # seconds a child gets after SIGTERM before its process group is killed
_PR_SET_PDEATHSIG = 1   # from <linux/prctl.h>


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread (within `stop_signals`) as KeyboardInterrupt is for
    SIGINT: a BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_signalled = threading.Event()   # SIGINT, SIGTERM or SIGHUP came within stop_signals (interrupted())


def _raise_stopped(signum, _frame) -> None:
    _signalled.set()
    raise Stopped(signum)


_handler_pid = 0   # the process that installed _raise_interrupt (stop_signals)


def _raise_interrupt(_signum, _frame) -> None:
    if os.getpid() != _handler_pid:   # a child forked meanwhile (PyTriton's): its parent stops it, quietly
        return
    _signalled.set()
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a stop signal (Ctrl-C, SIGTERM, SIGHUP) came since the current stop_signals began: a
    library that turns the interruption into an error of its own (PyTriton: a model that failed to
    load, its tritonserver gone with the terminal's Ctrl-C) is then told apart from a failure."""
    return _signalled.is_set()


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise Stopped in the main thread (SIGINT raises KeyboardInterrupt,
    Python's default). The previous handlers are back at exit. Elsewhere than in the main thread, where
    Python takes no handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signalled.clear()
    saved = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # Python's; an ignored SIGINT stays so
        global _handler_pid
        _handler_pid = os.getpid()
        saved[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_held_off() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored (in the main thread): a second Ctrl-C while the children are
    being stopped cannot interrupt the stop and leave them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _die_with_parent():
    """A preexec_fn: SIGTERM to this child when the thread that forked it ends. prctl is looked up here,
    in the parent, so that the child between fork and exec only calls it."""
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:   # the parent died before the prctl: nobody would send the signal
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


@contextlib.contextmanager
def child_log(name: str, path: str | None = None) -> Iterator[Path]:
    """Where a child that a library starts writes its log (PyTriton's tritonserver, whose start would
    otherwise fill the terminal: some 60 lines, a CUDA error among them on a machine without a GPU).
    `path` given (PGKD_TRITON_LOG, checked by pgkd.settings): that file, left as it is. Else a file `name` in a folder of its own in
    the system's temporary folder, removed when the block ends or is stopped (Ctrl-C, SIGTERM) and kept
    when an Exception leaves it: the error names the file. Enter it before `adopted_children`, whose
    folder goes at its end."""
    if path is not None:
        yield Path(path)
        return
    folder = server_folder("pgkd-log-")    # marked: what a SIGKILLed server leaves, the next one removes
    try:
        yield folder / name
    except Exception:      # kept, with its log, which the error names: no later start removes it
        (folder / SERVER_OWNER).unlink(missing_ok=True)
        raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def quiet_triton(triton_class):
    """PyTriton's Triton whose tritonserver's stdout is not printed. With its log in a file
    (child_log), what tritonserver still writes there is noise at a stop: "Signal (2) received.", a
    Python-backend stub's traceback when it is killed. PyTriton has no option for it: its TritonServer's
    `_verbose` is set off (on a PyTriton without it, nothing changes)."""
    class QuietTriton(triton_class):
        def _initialize_server(self):
            super()._initialize_server()
            self._triton_server._verbose = False
    return QuietTriton


_PR_SET_CHILD_SUBREAPER = 36
MODEL_FOLDER_POLL = 1.0      # seconds between two looks at the descendants' command lines
_MODEL_FOLDER = re.compile(r"/tmp/folder[A-Za-z0-9]{6}(?=/|$)")   # Triton's mkdtemp("/tmp/folderXXXXXX")


SERVER_OWNER = ".pgkd-server.json"   # in a server_folder: the pgkd process that made it (pid, start, namespace)


def _started(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat), None when there is none: with
    the pid, it names one process, whatever pid a later one reuses."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace (`pid:[INODE]`): a pid means a process only within its namespace (two
    containers sharing a temporary folder each have their own)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _remove_stale_servers(parent: Path, prefix: str) -> None:
    """What an adopted_children block of a pgkd process killed by SIGKILL left (its `finally` never ran):
    each folder `prefix*` in `parent` that is ours (a real folder of this user, with SERVER_OWNER that pgkd
    wrote) and whose process is gone is removed, with PyTriton's workspace in it and, when no process has
    that pid any more, the Python backend's shared memory named after it (by PyTriton, `pytrtion<PID>-*`;
    by pgkd.serving.tritonserver, `pgkd<PID>-*`). Anything else is left as it is."""
    import json
    for folder in parent.glob(f"{prefix}*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            owner = json.loads((folder / SERVER_OWNER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or owner.get("written_by") != WRITTEN_BY:
            continue
        pid, started = owner.get("pid"), owner.get("started")
        if owner.get("pid_namespace") != _pid_namespace():
            continue                             # another namespace's pid (another container): not ours to judge
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or _started(pid) == started:
            continue                             # not a pid, or its process still runs
        shutil.rmtree(folder, ignore_errors=True)
        if _started(pid) is None:
            for segment in (*Path("/dev/shm").glob(f"pytrtion{pid}-*"), *Path("/dev/shm").glob(f"pgkd{pid}-*")):
                with contextlib.suppress(OSError):
                    if segment.stat().st_uid == os.getuid():
                        segment.unlink()


def server_folder(prefix: str) -> Path:
    """A new folder `prefix*` in the temporary folder for a server's files, marked as this process's (its
    SERVER_OWNER). What servers killed by SIGKILL left under the same prefix goes first
    (`_remove_stale_servers`). The caller removes the folder; to keep it for good (a failed start's log),
    it unlinks the mark."""
    import tempfile
    _remove_stale_servers(Path(tempfile.gettempdir()), prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    write_json_atomic(folder / SERVER_OWNER, {"written_by": WRITTEN_BY, "pid": os.getpid(),
                                              "started": _started(os.getpid()), "pid_namespace": _pid_namespace()})
    return folder


@contextlib.contextmanager
def adopted_children(prefix: str = "pgkd-server-") -> Iterator[Path]:
    """For a library that starts processes of its own (PyTriton: tritonserver and its Python-backend
    stubs, which it does not always stop): within the block this process is their subreaper (Linux), so a
    child orphaned by its parent is re-parented here, and their temporary files go to a folder of ours
    (TMPDIR; give PyTriton `folder / "pytriton"` as its workspace, else it is made in ~/.cache). On leaving,
    whatever child is left is killed and reaped, the folder removed, the shared memory segments PyTriton
    named after this process unlinked, and the model folders tritonserver made in /tmp for itself removed
    (`_model_folders`: they are noted while the block runs, from the command lines of this process's
    descendants, since the stubs that name them are gone by the time it ends). A SIGKILL skips all that: the
    next block to start removes what such a process left (`_remove_stale_servers`)."""
    import tempfile
    folder = server_folder(prefix)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    noted: set[Path] = set()
    done, others = threading.Event(), set(_children())   # children from before: not the block's

    def note() -> None:
        while not done.wait(MODEL_FOLDER_POLL):
            with contextlib.suppress(OSError):   # a process that went while /proc was read
                noted.update(_model_folders(others))
    watcher = threading.Thread(target=note, name="pgkd-model-folders", daemon=True)
    watcher.start()
    try:
        yield folder
    finally:
        done.set()
        watcher.join()
        noted.update(_model_folders(others))
        for pid in _children():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        for model_folder in noted:
            _remove_model_folder(model_folder)
        for segment in Path("/dev/shm").glob(f"pytrtion{os.getpid()}-*"):
            segment.unlink(missing_ok=True)
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(folder, ignore_errors=True)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    parents = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(path.parent.name)] = int(path.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def _children() -> list[int]:
    """This process's child processes."""
    me = os.getpid()
    return [pid for pid, parent in _parents().items() if parent == me]


def _descendants(besides: set[int] = frozenset()) -> set[int]:
    """The processes this one started, and theirs; but for the children `besides` and what they started."""
    parents = _parents()
    family, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family - besides
        family |= more
        grew = bool(more)
    return family - {os.getpid()}


def _model_folders(besides: set[int] = frozenset()) -> set[Path]:
    """The folders /tmp/folderXXXXXX named by an argument of a descendant's command line (but for the
    children `besides` and what they started). Triton makes one
    (in /tmp, whatever TMPDIR says) for each model loaded with files of the load request, as PyTriton loads
    its models, and names it to the model's Python-backend stubs (`triton_python_backend_stub
    /tmp/folderXXXXXX/1/model.py ...`); it removes it when it unloads the model, which a tritonserver that
    stops on a timeout does not always do."""
    found = set()
    for pid in _descendants(besides):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        found.update(Path(match.group(0)) for match in map(_MODEL_FOLDER.match, args) if match)
    return found


def _remove_model_folder(folder: Path) -> None:
    """A folder noted by `_model_folders`, when it still is a folder of this user's (not a link)."""
    try:
        info = folder.lstat()
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
        shutil.rmtree(folder, ignore_errors=True)


def spawn(argv: Sequence[str], *, log: IO | None = None, env: Mapping[str, str] | None = None,
          cwd: str | Path | None = None) -> subprocess.Popen:
    """Start `argv` in a session of its own, its stdout and stderr to `log` (an open file; None: this
    process's own), with SIGTERM as its parent-death signal.

    The parent-death signal fires when the *thread* that spawned the child ends, not only the process:
    call it from the main thread (pgkd does), or from a thread that lives as long as the child should."""
    return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
                            preexec_fn=_die_with_parent())


def stop(processes: subprocess.Popen | Iterable[subprocess.Popen], timeout: float = STOP_TIMEOUT) -> None:
    """Each child started by `spawn` and what it started: SIGTERM to its process group, SIGKILL to what
    is left after `timeout` seconds (one deadline for all). What a child started and left behind when it
    exited (a stub after its tritonserver) is killed too."""
    processes = [processes] if isinstance(processes, subprocess.Popen) else list(processes)
    with _signals_held_off():
        # A child reaped already is left alone: its group's id may since belong to a process not ours.
        running = [p for p in processes if p.poll() is None]
        for process in running:
            _signal_group(process.pid, signal.SIGTERM)   # its session: pgid == pid
        deadline = time.monotonic() + timeout
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
                _wait_without_reaping(process, max(0.0, deadline - time.monotonic()))
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()


def kill(process: subprocess.Popen) -> int:
    """A crash, on purpose: SIGKILL to a child started by `spawn` and what it started (no handler runs),
    reaped. Returns its exit code."""
    with _signals_held_off():
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGKILL)
        return process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_without_reaping(process: subprocess.Popen, timeout: float) -> None:
    """Until the child has exited, left as a zombie: its pid, and so its process group's id, stays ours
    until `process.wait()`. TimeoutExpired after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout)
        time.sleep(0.05)
