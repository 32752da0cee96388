"""Child processes as the tests see them from outside: the process table, what a process started, the
addresses it listens on, and a `pgkd` command run as a terminal runs it."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What others keep in the temporary folder across processes, not pgkd's to remove: tritonserver's session
# file, and torch's compilation cache (one per user).
NOT_OURS = (".ses", "torchinductor_")


def as_in_a_terminal() -> None:
    """A preexec_fn: the child's stop signals as a terminal's new process has them. SIGINT at its default
    (a background job ignores it) and none of them blocked: a test worker's signal mask, left by a library
    that blocks signals around its own threads, is inherited across exec and would hold a Ctrl-C back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command name) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                head, tail = (entry / "stat").read_text().rsplit(")", 1)
            except OSError:
                continue
            fields = tail.split()
            table[int(entry.name)] = (int(fields[1]), fields[0], head.split("(", 1)[1])
    return table


def descendants(pid: int) -> dict[int, str]:
    """The processes `pid` started, and theirs: pid -> command name."""
    table = process_table()
    family, grew = {pid}, True
    while grew:
        more = {p for p, (parent, _, _) in table.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return {p: table[p][2] for p in family - {pid}}


def gone(pids, timeout: float = 20) -> bool:
    """Until none of `pids` runs (a zombie does not)."""
    deadline = time.monotonic() + timeout
    while True:
        table = process_table()
        if not any(p in table and table[p][1] != "Z" for p in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs the process `pid` listens on, from /proc/net/tcp and tcp6 (an IPv4
    address mapped into IPv6, ::ffff:127.0.0.1, as the IPv4 address)."""
    assert Path(f"/proc/{pid}").exists(), f"process {pid} is gone"
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:   # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.add((str(ip), int(port, 16)))
    return found


class Pgkd:
    """A `pgkd` command running as a process of its own (as a terminal runs it), its temporary folders
    (TMPDIR, PYTRITON_HOME) one of the test's, its output to a log."""

    def __init__(self, tmp_path: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        # Short, not under tmp_path: PyTriton puts a Unix socket in it, and a socket's path has at most
        # 107 bytes (pytest's folders under xdist are longer). Removed by kill().
        self.tmp = Path(tempfile.mkdtemp(prefix="pgkd-t-"))
        self.log_path = tmp_path / f"pgkd-{args[0]}-{time.monotonic_ns()}.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pgkd.cli", *args], stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                env={**os.environ, "TMPDIR": str(self.tmp), "PYTRITON_HOME": str(self.tmp), **(env or {})},
                start_new_session=True,
                preexec_fn=as_in_a_terminal)   # Ctrl-C, as in a terminal
        self.seen: dict[int, str] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process.poll() is None, f"exited with {self.process.returncode} before {text!r}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.log()}"
            self.seen.update(descendants(self.process.pid))
            time.sleep(0.1)
        self.seen.update(descendants(self.process.pid))

    def tritonserver(self) -> int:
        found = [p for p, name in descendants(self.process.pid).items() if name == "tritonserver"]
        assert len(found) == 1, f"tritonserver processes: {found}\n{self.log()}"
        return found[0]

    def listening_on(self, ports, timeout: float = 30) -> set[str]:
        """The addresses its tritonserver listens on, once it listens on each of `ports` (a server may
        open one, its metrics, after it says it serves)."""
        deadline = time.monotonic() + timeout
        triton = self.tritonserver()
        while True:
            assert Path(f"/proc/{triton}").exists(), f"tritonserver {triton} exited:\n{self.log()}"
            if {port for _, port in listening(triton)} == {int(p) for p in ports}:
                break
            assert time.monotonic() < deadline, f"on {listening(triton)}, not on each of {ports}:\n{self.log()}"
            time.sleep(0.2)
        return {address for address, _ in listening(triton)}

    def stop(self, sig: int, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def left_in_tmp(self) -> list[str]:
        """What is left in its temporary folder (TMPDIR, and PYTRITON_HOME for PyTriton's workspace)."""
        return sorted(p.name for p in self.tmp.iterdir() if not p.name.startswith(NOT_OURS))

    def kill(self) -> None:
        """At the end of a test, whatever happened."""
        for pid in [self.process.pid, *self.seen]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        self.process.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)
