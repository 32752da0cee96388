"""`make demo-services` on a tiny configuration: `python -m pgkd_services.local` starts Tansu (a
Kafka-compatible broker, not Apache Kafka), Prometheus, the teacher on Triton (the pool-random
simulation: no MiniLM) and the four services, submits a run, prints its cycles and table, serves its
student (`pgkd serve` and the deployer) and classifies with it, and stops everything it started, also
when interrupted."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TOY_CLASSES, make_toy_dataset
from process_tools import as_in_a_terminal
from pgkd import processes
from service_processes import cli_options
from test_services_kafka import CONFIG

TINY = {**CONFIG, "max_cycles": 2, "teacher_cache": "none"}
TOY_LABELS = set(TOY_CLASSES)
del TINY["teacher"]     # --serve-teacher names it


def process_table() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, start time, command line)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:          # gone meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[19], command)
    return table


class Demo:
    """`python -m pgkd_services.local` in a session of its own (as a terminal runs a command), and
    every process it started, as seen while it ran."""

    def __init__(self, tmp_path: Path, *extra: str):
        data = make_toy_dataset(tmp_path / "toy")
        self.folder = tmp_path / "cluster"
        # Not processes.spawn, which merges stdout and stderr and keeps an ignored SIGINT: the tests read
        # the two apart and send Ctrl-C, as a terminal does.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pgkd_services.local", "--folder", str(self.folder), "--serve-teacher",
             "pool-random", "--data", str(data), *cli_options(TINY), "--no-progress", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            # A terminal's foreground command takes Ctrl-C; a suite started in the background (`make test &`,
            # as CI may) hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt.
            preexec_fn=as_in_a_terminal)
        self.seen: dict[tuple[int, str], str] = {}    # (pid, start time): command line
        self.stderr: list[str] = []
        threading.Thread(target=self._watch, daemon=True).start()
        self._reader = threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)
        self._reader.start()

    def _watch(self) -> None:
        while self.process.poll() is None:
            table = process_table()
            family, grew = {self.process.pid}, True
            while grew:
                more = {pid for pid, (parent, _, _) in table.items() if parent in family} - family
                family |= more
                grew = bool(more)
            for pid in family - {self.process.pid}:
                # The latest command line: a child caught between fork and exec still shows its parent's
                # (CI saw it under load); an exiting process has none left.
                if table[pid][2]:
                    self.seen[(pid, table[pid][1])] = table[pid][2]
            time.sleep(0.2)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            assert self.process.poll() is None, f"exited before {text!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        """What it printed on stderr, and the end of each log, for a failure's message."""
        logs = "".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}\n"
                       for log in sorted(self.folder.glob("*.log")))
        return "".join(self.stderr) + logs

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        stdout = self.process.stdout.read()
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code, stdout, "".join(self.stderr)

    def left_behind(self, grace: float = 10.0) -> list[str]:
        """What is still running, after `grace` seconds for the stragglers that end by themselves once
        their parent has (multiprocessing's resource tracker, tidying up after a service)."""
        deadline = time.monotonic() + grace
        while True:
            table = process_table()
            alive = [command for (pid, started), command in self.seen.items()
                     if pid in table and table[pid][1] == started]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def saw(self, word: str) -> bool:
        return any(word in command for command in self.seen.values())


@pytest.fixture
def demo(tmp_path):
    demos = []

    def start(*extra: str) -> Demo:
        demos.append(Demo(tmp_path, *extra))
        return demos[-1]
    yield start
    for d in demos:          # a failed test still leaves nothing running:
        processes.stop(d.process)            # it stops what it started in turn,
        table = process_table()
        for pid, started in d.seen:         # and what it did not stop is killed
            if pid in table and table[pid][1] == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def test_a_run_on_the_local_cluster_prints_its_cycles_and_table_serves_its_student_and_stops_everything(demo):
    d = demo("--serve-student")
    code, stdout, stderr = d.finish()
    assert code == 0, d.output()
    cycles = [line for line in stderr.splitlines() if line.startswith("cycle ")]
    assert [line.split(":")[0] for line in cycles] == [f"cycle  {i}" for i in range(TINY["max_cycles"] + 1)]
    assert "baseline (cycle 0)" in stdout and "distilled (cycle" in stdout and "test macro-F1" in stdout
    assert "stopped: max_cycles" in stdout
    assert "not Apache Kafka" in stderr and "everything it started is stopped" in stderr
    (completed,) = (d.folder / "artifacts" / "runs").glob("*/completed.json")
    assert json.loads(completed.read_text())["decided_from"] == "prometheus"   # the evaluator read Prometheus
    # the promoted student, served: three test texts answered through `pgkd classify` (its answers are the
    # proof it ran: it lives half a second, which the process table, sampled every 0.2 s, may miss)
    answers = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 3 and all(a["label"] in TOY_LABELS for a in answers), stdout
    assert "the distilled student answers at http://127.0.0.1:" in stderr and "(version 1)" in stderr
    (manifest,) = (d.folder / "models" / "student").glob("1/pgkd-version.json")
    assert json.loads(manifest.read_text())["source"]["checkpoint"] == json.loads(completed.read_text())[
        "best_checkpoint"]["uri"]
    for part in ("tansu", "prometheus", "tritonserver", "service trainer", "service evaluator", "service miner",
                 "service generator", "submit", "service deployer", "serve --model"):
        assert d.saw(part), f"{part} never ran: {sorted(set(d.seen.values()))}"
    assert d.left_behind() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_everything_it_started(demo, sig):
    """Ctrl-C (SIGINT to the terminal's process group) once the run is submitted, and SIGTERM while
    the teacher and the services are starting."""
    # A run of many cycles, so that it is still running when the signal comes (two tiny cycles can end
    # within the three seconds).
    d = demo("--max-cycles", "30", "--patience", "30") if sig == signal.SIGINT else demo()
    if sig == signal.SIGINT:
        d.wait_for("local: submitting the run")
        time.sleep(3)
        os.killpg(d.process.pid, sig)
    else:
        d.wait_for("local: prometheus")
        deadline = time.monotonic() + 60
        while not d.saw("service generator"):     # the last of the four to be started; none is ready yet
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.1)
        d.process.send_signal(sig)
    code, _, stderr = d.finish(timeout=60)
    assert code == 128 + sig, d.output()
    assert "interrupted; everything it started is stopped" in stderr
    assert d.saw("tansu") and d.saw("teacher serve") and d.saw("service generator")
    assert d.left_behind() == []


def test_bad_input_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys):
    from pgkd_services.local import main
    folder = tmp_path / "c"
    assert main(["--folder", str(folder), "--data", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"local: error: {tmp_path / 'nowhere'}: no such file or folder\n"
    assert main(["--folder", str(folder), "--data", str(tmp_path), "--max-cycles", "-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not folder.exists()
    with pytest.raises(SystemExit) as exit:
        main(["--serve-teacher", "pool-random", "--teacher", "pool-random", "--data", str(tmp_path)])
    assert exit.value.code == 2 and "--serve-teacher and --teacher" in capsys.readouterr().err
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["--folder", str(folder), "--data", str(tmp_path)]) == 2
    assert "not a local cluster's folder" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"
    assert main(["--folder", str(folder / "notes.txt"), "--data", str(tmp_path)]) == 2    # a file, not a folder
    assert capsys.readouterr().err == f"local: error: {folder / 'notes.txt'}: not a folder; choose another\n"
    assert (folder / "notes.txt").read_text() == "mine"
