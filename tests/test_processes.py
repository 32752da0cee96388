"""pgkd.processes, the one supervisor of child processes: a child in a session of its own, stopped with
what it started, and dead with its parent even when the parent is SIGKILLed; SIGTERM and SIGHUP unwind
the main thread as Ctrl-C does."""
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from process_tools import as_in_a_terminal
from pgkd import processes


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            **kwargs)


def test_a_child_has_a_session_of_its_own_and_stops_with_what_it_started():
    # A parent that ignores SIGTERM and a grandchild in its process group: both gone after the timeout.
    child = processes.spawn([sys.executable, "-c", textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen(["sleep", "300"])
        time.sleep(300)
        """)])
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
        time.sleep(0.5)
        grandchildren = _children(child.pid)
        assert grandchildren
        started = time.monotonic()
        processes.stop(child, timeout=1)
        assert 1 <= time.monotonic() - started < 5
        assert child.returncode == -signal.SIGKILL
        assert all(wait_gone(p) for p in grandchildren)
    finally:
        processes.stop(child, timeout=0)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def test_a_child_gets_sigterm_when_its_parent_is_sigkilled():
    parent = python("""
        from pgkd import processes
        child = processes.spawn(["sleep", "300"])
        print(child.pid, flush=True)
        child.wait()
        """)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait(10)
    assert wait_gone(child, 5), "the child outlived its SIGKILLed parent"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_unwind_the_main_thread_through_finally(sig):
    process = python("""
        import os, signal, time
        from pgkd.processes import Stopped, stop_signals
        try:
            with stop_signals():
                try:
                    print("ready", flush=True)
                    time.sleep(120)
                finally:
                    print("finally", flush=True)
        except Stopped as e:
            print("stopped", e.signum, flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print("default handlers back:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
              and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL, flush=True)
        """, preexec_fn=as_in_a_terminal)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(sig)
    out, _ = process.communicate(timeout=60)   # a loaded machine may starve it; the child sleeps longer
    said = "interrupted" if sig == signal.SIGINT else f"stopped {int(sig)}"
    assert out.splitlines() == ["finally", said, "default handlers back: True"] and process.returncode == 0


def model_folder() -> Path:
    """A folder as tritonserver makes for a model it loads with files (/tmp/folderXXXXXX), with its model.py."""
    while True:
        folder = Path("/tmp") / ("folder" + "".join(random.choices(string.ascii_letters + string.digits, k=6)))
        try:
            (folder / "1").mkdir(parents=True)
        except FileExistsError:
            continue
        (folder / "1" / "model.py").write_text("")
        return folder


def test_adopted_children_remove_the_model_folders_their_descendants_named_and_no_other():
    """tritonserver names its model folders in /tmp to its Python-backend stubs and removes one only when it
    unloads the model, which a stop on a timeout skips: the folders named by a descendant started within
    the block are removed at its end, also when that descendant has exited before; one named by a child
    from before the block, or by nobody, stays."""
    exited, running, before, unnamed = folders = [model_folder() for _ in range(4)]
    try:
        sleep = "import sys, time; time.sleep(float(sys.argv[1]))"
        process = python(f"""
            import subprocess, sys
            from pgkd.processes import adopted_children
            subprocess.Popen([sys.executable, "-c", {sleep!r}, "300", "{before}/1/model.py"])
            with adopted_children():
                subprocess.Popen([sys.executable, "-c", {sleep!r}, "300", "{running}/1/model.py"])
                # a grandchild that names its folder (its parent does not), gone before the block ends
                subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, "
                                "'-c', {sleep!r}, '3', '{exited}/1/model.py'])"])
            """)
        process.communicate(timeout=60)
        assert process.returncode == 0
        assert [f.exists() for f in folders] == [False, False, True, True]
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_a_childs_log_folder_goes_at_the_end_and_at_a_stop_and_stays_when_it_failed(tmp_path, monkeypatch):
    """pgkd.processes.child_log: tritonserver's log (cascade serve, teacher serve) off the terminal."""
    import tempfile
    from pgkd.processes import Stopped, child_log
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with child_log("tritonserver.log") as path:
        path.write_text("started")
    assert not path.parent.exists()
    for stop in (KeyboardInterrupt(), Stopped(signal.SIGTERM)):
        with pytest.raises(type(stop)), child_log("tritonserver.log") as path:
            path.write_text("started")
            raise stop
        assert not path.parent.exists()
    with pytest.raises(RuntimeError), child_log("tritonserver.log") as path:
        path.write_text("failed")
        raise RuntimeError("no start")
    assert path.read_text() == "failed"        # kept: the error names it


def test_a_log_file_the_user_names_is_used_as_it_is(tmp_path):
    from pgkd.processes import child_log
    mine = tmp_path / "triton.log"
    with child_log("tritonserver.log", str(mine)) as path:
        assert path == mine
        path.write_text("started")
    assert mine.read_text() == "started"


@pytest.mark.parametrize("value, says", [("nowhere/triton.log", "no such folder 'nowhere'"),
                                         (".", "a folder, not a file")])
def test_a_triton_log_in_no_folder_or_that_is_a_folder_is_one_line_and_exit_2(value, says, tmp_path, monkeypatch,
                                                                               capsys):
    """PGKD_TRITON_LOG (pgkd.settings.TritonSettings): `settings --check` says it, as the commands that read it do,
    before anything loads."""
    from pgkd.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGKD_TRITON_LOG", value)
    assert main(["settings", "--check"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"pgkd: error: PGKD_TRITON_LOG={value!r}: {says}"]
    assert main(["teacher", "serve", "--data", str(tmp_path / "no-data")]) == 2
    assert capsys.readouterr().err.strip() == f"pgkd: error: PGKD_TRITON_LOG={value!r}: {says}"


def test_a_failing_teacher_triton_server_is_one_line_naming_its_log(tmp_path):
    from pgkd.errors import EnvironmentFailure
    from pgkd.teachers.server import _named_log
    log = tmp_path / "tritonserver.log"
    with pytest.raises(EnvironmentFailure) as e:
        with _named_log(log):
            raise RuntimeError("tritonserver exited\nTraceback (most recent call last):\n  ...")
    assert str(e.value) == f"the simulated teacher's Triton server failed: RuntimeError: tritonserver exited; " \
                           f"tritonserver's log: {log}"


def test_a_triton_log_that_would_block_or_be_lost_is_refused_and_the_terminal_is_taken(tmp_path, monkeypatch, capsys):
    """A named pipe nobody reads blocks tritonserver's start (2 minutes, then a misleading timeout); a control
    character or a folder that takes no file (/proc) loses the log. /dev/stdout is the terminal."""
    from pgkd.cli import main
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "linked.log").symlink_to(tmp_path / "elsewhere.log")
    for value, says in ((str(fifo), "not a regular file"), (f"{tmp_path}/a\nb.log", "a control character"),
                        (str(tmp_path / "linked.log"), "a link; name the file itself"),
                        (str(tmp_path / ("x" * 300)), "cannot be a file here (File name too long)"),
                        ("/proc/pgkd-x.log", "its folder /proc: cannot write there")):
        monkeypatch.setenv("PGKD_TRITON_LOG", value)
        assert main(["settings", "--check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    monkeypatch.setenv("PGKD_TRITON_LOG", "/dev/stdout")
    assert main(["settings", "--check"]) == 0


def test_a_child_forked_within_stop_signals_leaves_sigint_to_its_parent():
    """PyTriton forks helpers of its own: pgkd's Ctrl-C handler is the parent's, and in a forked child it neither
    raises (a traceback on the terminal) nor marks the child interrupted; the parent stops its children."""
    with processes.stop_signals():
        pid = os.fork()
        if pid == 0:     # the child
            try:
                time.sleep(2)
                os._exit(0 if not processes.interrupted() else 3)
            except BaseException:
                os._exit(1)
        time.sleep(0.3)
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_server_folder_a_sigkilled_pgkd_left_is_removed_at_the_next_start_and_nothing_else(tmp_path, monkeypatch):
    """adopted_children's `finally` never runs in a process killed by SIGKILL: its folder (PyTriton's
    workspace inside) and its shared memory stay. The next block removes them, and only them: a folder of a
    running process, one pgkd did not mark, a link, a folder whose pid now names another process (its
    shared memory is that process's) all stay."""
    import json
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = python(f"""
        import tempfile, time
        tempfile.tempdir = {str(tmp_path)!r}
        from pgkd.processes import adopted_children
        with adopted_children() as folder:
            (folder / "pytriton").mkdir()
            print(folder, flush=True)
            time.sleep(300)
        """)
    left = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait(10)
    segment = Path(f"/dev/shm/pytrtion{killed.pid}-pgkd-test")
    segment.write_bytes(b"x")

    def marked(name: str, pid, started) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / processes.SERVER_OWNER).write_text(json.dumps({"written_by": "pgkd", "pid": pid, "started": started,
                                                                  "pid_namespace": processes._pid_namespace()}))
        return folder
    running = marked("pgkd-server-running", os.getpid(), processes._started(os.getpid()))
    reused = marked("pgkd-server-reused", os.getpid(), -1)          # the pid, now of another process
    mine = Path(f"/dev/shm/pytrtion{os.getpid()}-pgkd-test")
    mine.write_bytes(b"x")
    foreign = tmp_path / "pgkd-server-foreign"
    foreign.mkdir()
    (foreign / processes.SERVER_OWNER).write_text(json.dumps({"pid": killed.pid, "started": 1}))
    elsewhere = marked("elsewhere", killed.pid, 1)
    container = marked("pgkd-server-container", killed.pid, 1)     # a dead pid here, but another namespace's
    owner = json.loads((container / processes.SERVER_OWNER).read_text())
    (container / processes.SERVER_OWNER).write_text(json.dumps({**owner, "pid_namespace": "pid:[1]"}))
    (tmp_path / "pgkd-server-link").symlink_to(elsewhere)
    try:
        assert left.is_dir() and left.parent == tmp_path and (left / "pytriton").is_dir()
        paths = [left, segment, reused, running, foreign, elsewhere, mine, container]
        # in a process of its own: the block makes its process a subreaper
        starts = python(f"""
            import json, os, tempfile
            from pathlib import Path
            tempfile.tempdir = {str(tmp_path)!r}
            from pgkd.processes import SERVER_OWNER, adopted_children
            with adopted_children() as folder:
                owner = json.loads((folder / SERVER_OWNER).read_text())
                print(json.dumps([owner["pid"] == os.getpid(), [Path(p).exists() for p in {[str(p) for p in paths]!r}]]))
            print(json.dumps(folder.exists()))
            """)
        out, _ = starts.communicate(timeout=60)
        assert starts.returncode == 0
        first, last = out.splitlines()
        assert json.loads(first) == [True, [False, False, False, True, True, True, True, True]], first
        assert json.loads(last) is False                 # the block's own folder, at its end
    finally:
        segment.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)
