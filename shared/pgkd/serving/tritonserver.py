"""The real Triton Inference Server here: the tritonserver binary bundled in the nvidia-pytriton wheel,
with its Python backend (the only backend it carries), started as a process and stopped with it.
`pgkd serve` runs the student on it; the tests run the teacher's and the student's repositories on it.

How the Python backend is made to work outside NVIDIA's container (the same as PyTriton does in
pytriton/triton.py, `_prepare_triton_inference_server`, and pytriton/server/triton_server.py, `_get_env`):

- the wheel ships `backends/python/` (libtriton_python.so, triton_python_backend_utils.py) without the
  stub process, and one `triton_python_backend_stub` per Python version under `python_backend_stubs/X.Y/`.
  The backend looks for the stub next to itself, so a backend directory gets links to the two files plus
  the stub of the running Python's version;
- the stub embeds Python (it links libpython3.X.so): LD_LIBRARY_PATH gets the running interpreter's LIBDIR
  (first: a system libpython of another patch release may be on the default path) and the wheel's bundled
  libraries (nvidia_pytriton.libs: libtritonserver, libcudart, ...; the binaries' RPATH is relative to their
  own location, which the links in the backend directory do not preserve);
- the embedded Python finds its prefix by looking up `python3` on PATH: PATH starts with the running
  interpreter's bin folder, so a virtual environment's site-packages (numpy, onnxruntime) are the stub's.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from pgkd import processes
from pgkd.net import free_ports, url_host


# --- the bundled server --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the tritonserver bundled in the installed `pytriton` package are."""

    binary: Path       # .../pytriton/tritonserver/bin/tritonserver
    python_backend: Path  # .../pytriton/tritonserver/backends/python
    stub: Path         # .../pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub
    libs: Path | None  # .../nvidia_pytriton.libs (bundled shared libraries), when present


def find_tritonserver() -> TritonDistribution | None:
    """The bundled tritonserver for the running Python, or None when pytriton (or a piece) is missing."""
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent
    server = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDistribution(
        binary=server / "bin" / "tritonserver",
        python_backend=server / "backends" / "python",
        stub=server / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=next((p for p in (root.parent / "nvidia_pytriton.libs", server / "external_libs") if p.is_dir()), None),
    )
    required = (dist.binary, dist.python_backend / "libtriton_python.so",
                dist.python_backend / "triton_python_backend_utils.py", dist.stub)
    return dist if all(p.exists() for p in required) else None


def tritonserver_unavailable_reason() -> str | None:
    """None when run_tritonserver() can work here; otherwise why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return "the bundled tritonserver runs on Linux only"
    if find_tritonserver() is None:
        return ("nvidia-pytriton with its bundled tritonserver and a Python-backend stub for "
                f"Python {sys.version_info.major}.{sys.version_info.minor} is not installed")
    return None


def prepare_backend_directory(folder: Path, dist: TritonDistribution | None = None) -> Path:
    """A --backend-directory with a working Python backend: `folder/python/` holding links to the
    backend library and utilities, and the stub for this Python version. Returns `folder`."""
    dist = dist or _require_distribution()
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (dist.python_backend / "libtriton_python.so",
                   dist.python_backend / "triton_python_backend_utils.py",
                   dist.stub):
        target = python / source.name
        if not target.exists():
            target.symlink_to(source)
    return folder


def server_environment(dist: TritonDistribution | None = None, env: Mapping[str, str] | None = None) -> dict:
    """os.environ (updated with `env`) plus what tritonserver and the Python-backend stub need."""
    dist = dist or _require_distribution()
    result = dict(os.environ)
    result.update(env or {})
    libraries = [sysconfig.get_config_var("LIBDIR")] + ([str(dist.libs)] if dist.libs else [])
    if result.get("LD_LIBRARY_PATH"):
        libraries.append(result["LD_LIBRARY_PATH"])
    result["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
    result["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), result.get("PATH", "")])
    result.setdefault("HF_HUB_OFFLINE", "1")
    result.setdefault("TOKENIZERS_PARALLELISM", "false")
    return result


# --- the running server ---------------------------------------------------------------------------------

class TritonServerError(RuntimeError):
    """The server did not start, or a model did not become ready; the message ends with the log's tail."""


@dataclass
class RunningTriton:
    """What run_tritonserver() yields."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    model_repository: Path
    address: str = "127.0.0.1"   # what it binds to
    # The ports it must listen on itself before it counts as ready (default: all three). Another program
    # that answers on the HTTP port (a server left running) must not pass for it.
    listens_on: tuple[int, ...] | None = None
    # The Python backend's shared-memory segments are /dev/shm/PREFIX*: tritonserver leaves them when it
    # exits, so stop() unlinks them once it has.
    shm_prefix: str | None = None

    @property
    def http_url(self) -> str:
        """"HOST:PORT" (127.0.0.1 for 0.0.0.0), as tritonclient.http.InferenceServerClient(url=...) takes it."""
        return f"{url_host(self.address)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """"HOST:PORT", as tritonclient.grpc.InferenceServerClient(url=...) takes it."""
        return f"{url_host(self.address)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.address)}:{self.metrics_port}/metrics"

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The log's error lines, then its last `lines` lines without the big ASCII tables that
        tritonserver prints at start (they would push the interesting lines out)."""
        text = [line for line in self.log().splitlines() if not line.startswith(("|", "+"))]
        errors = [line for line in text if re.match(r"E\d{4} ", line)]
        tail = "\n".join(text[-lines:])
        return "errors:\n" + "\n".join(errors) + f"\n\nlast lines:\n{tail}" if errors else tail

    def is_ready(self, model: str | None = None) -> bool:
        path = "/v2/health/ready" if model is None else f"/v2/models/{model}/ready"
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def holds_ports(self) -> bool:
        """Whether this server's process itself listens on each of its ports (`listens_on`; default the
        HTTP, gRPC and metrics ports). Triton answers on HTTP before it binds the metrics port, and a
        port it could not bind makes it exit: ready is only ready once it holds them all. True where the
        system does not tell (no /proc)."""
        held = listening_ports(self.process.pid)
        wanted = self.listens_on if self.listens_on is not None else (self.http_port, self.grpc_port,
                                                                     self.metrics_port)
        return held is None or set(wanted) <= held

    def wait_ready(self, models: Sequence[str] = (), timeout_s: float = 120.0) -> None:
        """Until the server and each of `models` are ready, answered by this server's own process, which
        holds all its ports; TritonServerError on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                        f"log {self.log_path}:\n{self.log_tail()}")
            if self.is_ready() and all(self.is_ready(m) for m in models) and self.holds_ports() \
                    and self.process.poll() is None:
                return
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not ready after {timeout_s:.0f}s (models: {list(models)}); "
                                        f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM to the server and its stubs (Triton unloads its models and stops the stubs), SIGKILL to
        what is left after `timeout_s` seconds; then its shared-memory segments unlinked. Returns the exit code."""
        processes.stop(self.process, timeout_s)
        if self.shm_prefix:
            for segment in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                segment.unlink(missing_ok=True)
        return self.process.returncode


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports the process `pid` listens on: its sockets (the inodes of /proc/PID/fd) among the
    LISTEN rows of /proc/PID/net/tcp and tcp6. An empty set for a process that is gone; None where there
    is no /proc (not Linux) to tell."""
    if not Path("/proc/self/fd").is_dir():
        return None
    inodes = set()
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(entry.path)
            except OSError:   # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()   # sl local_address rem_address st ... inode (the 10th)
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _enabled_ports(http_port: int, grpc_port: int, metrics_port: int, args: Sequence[str]) -> tuple[int, ...]:
    """The ports tritonserver binds with these arguments (an endpoint turned off binds none)."""
    off = {a.split("=", 1)[0] for a in args if a.endswith(("=false", "=0"))}
    return tuple(port for port, flag in ((http_port, "--allow-http"), (grpc_port, "--allow-grpc"),
                                         (metrics_port, "--allow-metrics")) if flag not in off)


def default_models(model_repository: Path) -> list[str]:
    """The model folders (those with a config.pbtxt) in a repository."""
    return sorted(p.parent.name for p in Path(model_repository).glob("*/config.pbtxt"))


@contextlib.contextmanager
def run_tritonserver(
    model_repository: str | Path,
    *,
    models: Sequence[str] | None = None,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    workdir: str | Path | None = None,
    attempts: int = 3,
    ports: tuple[int, int, int] | None = None,
    address: str = "127.0.0.1",
) -> Iterator[RunningTriton]:
    """Start the bundled tritonserver on `address` with `model_repository`, wait until the server and
    `models` (default: every model folder in the repository) are ready, yield a RunningTriton, stop it at exit.

    env: extra environment variables for the server and its Python-backend stubs (e.g. PGKD_TEACHER_MODEL).
    extra_args: more tritonserver command-line arguments. workdir: where the backend directory and
    tritonserver.log go (default: a temporary folder of this server's own, removed at exit, kept with
    its log when the start failed). Never inside the model repository: Triton would take it for a model.
    attempts: a port taken between choosing it and binding it is retried on new ports.
    ports: (http, grpc, metrics); default: free ones, chosen here (then `attempts` applies).
    """
    dist = _require_distribution()
    model_repository = Path(model_repository).resolve()
    models = default_models(model_repository) if models is None else list(models)
    own_workdir = workdir is None
    # Absolute: tritonserver runs in this folder and is given paths inside it.
    folder = processes.server_folder("tritonserver-") if own_workdir else Path(workdir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    server: RunningTriton | None = None
    failed = False
    try:
        backends = prepare_backend_directory(folder / "backends", dist)
        environment = server_environment(dist, env)
        for attempt in range(1, attempts + 1):
            http_port, grpc_port, metrics_port = ports or free_ports(3)
            log_path = folder / ("tritonserver.log" if attempt == 1 else f"tritonserver.{attempt}.log")
            # Shared-memory regions of the Python backend are named by this prefix: a unique one keeps servers
            # that run at the same time (parallel test workers) apart, as PyTriton does.
            shm_prefix = f"pgkd{os.getpid()}-{secrets.token_hex(4)}"
            command = [
                str(dist.binary),
                f"--model-repository={model_repository}",
                f"--backend-directory={backends}",
                f"--http-address={address}", f"--http-port={http_port}",
                f"--grpc-address={address}", f"--grpc-port={grpc_port}",
                f"--metrics-address={address}", f"--metrics-port={metrics_port}",
                "--allow-gpu-metrics=false",
                "--exit-on-error=true",
                "--exit-timeout-secs=5",
                f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
                *extra_args,
            ]
            with open(log_path, "wb") as log:
                process = processes.spawn(command, log=log, env=environment, cwd=folder)
            server = RunningTriton(process, http_port, grpc_port, metrics_port, log_path, model_repository, address,
                                   listens_on=_enabled_ports(http_port, grpc_port, metrics_port, command),
                                   shm_prefix=shm_prefix)
            try:
                server.wait_ready(models, timeout_s)
                break
            except TritonServerError:
                server.stop()
                if ports is None and attempt < attempts and port_taken(server.log()):
                    continue
                failed = True
                raise
        yield server
    finally:
        if server is not None:
            server.stop()
        if own_workdir and not failed:
            shutil.rmtree(folder, ignore_errors=True)
        elif own_workdir:        # kept with its log, which the error names: no later start removes it
            (folder / processes.SERVER_OWNER).unlink(missing_ok=True)


def port_taken(log: str) -> bool:
    """Whether tritonserver's log (or an error holding its tail) says a port was taken: Triton 2.51 says
    `Socket '127.0.0.1:8000' already in use` (HTTP, metrics), gRPC `Address already in use`."""
    return "already in use" in log.lower()


def taken_port(log: str, ports: Mapping[str, int]) -> str | None:
    """Which of `ports` (name -> port) tritonserver's log says was taken (`Socket 'HOST:PORT' already in
    use`, or a gRPC bind error naming `:PORT`), or None when it does not say."""
    for line in log.splitlines():
        if "already in use" in line.lower() or "failed to add port" in line.lower():
            for name, port in ports.items():
                if re.search(rf":{port}\b", line):
                    return name
    return None


def _require_distribution() -> TritonDistribution:
    dist = find_tritonserver()
    if dist is None:
        raise TritonServerError(tritonserver_unavailable_reason() or "bundled tritonserver not found")
    return dist


