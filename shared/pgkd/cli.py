"""The `pgkd` command: the engine's commands (distill, predict, export, serve, classify, teacher serve,
bench), and those that installed packages register (the services' submit, status, service, send,
stream, topics). Bad input prints one line on stderr and exits 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from pgkd.errors import EnvironmentFailure, Option, UserError, invalid
from pgkd.names import check_name
from pgkd.net import DEFAULT_HOST, host_option, port_option
from pgkd.processes import Stopped, stop_signals


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, instead of usage + error
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


# Every control character (C0, DEL, C1) and every other character str.splitlines breaks a line at, as it
# is shown instead (\n, \x1b, \u2028, ...): a terminal's escape sequence in a name is shown, not obeyed.
_BREAKS = {c: repr(c)[1:-1] for c in [*map(chr, range(32)), *map(chr, range(127, 160)), "\u2028", "\u2029"]
           if c != "\t"}


def one_line(message: object) -> str:
    """A message as one line: a line break or a control character inside a user's text (a name, a path) is
    shown, not obeyed."""
    return str(message).translate(str.maketrans(_BREAKS))


def _command_plugins():
    """The `register(subparsers, distill_arguments)` functions of installed packages (entry points in
    the group `pgkd.commands`): the engine knows its own commands only, the services add theirs."""
    from importlib.metadata import entry_points
    return [entry.load() for entry in sorted(entry_points(group="pgkd.commands"), key=lambda e: e.name)]


def distill_arguments(p: argparse.ArgumentParser, with_out: bool = True, with_dry_run: bool = False) -> None:
    """The options of a run (`pgkd distill`; `pgkd submit`, `pgkd bench bus` and `python -m
    pgkd_services.local` take them too): one per DistillConfig field (pgkd.options), then --out,
    --dry-run and --no-progress, which are the command's, not the run's. `run_config(args)` reads them back."""
    from pgkd.loop.config import DistillConfig
    from pgkd.options import add_options
    add_options(p, DistillConfig)
    if with_out:
        p.add_argument("--out", help="output folder: report.json, best/, history.png, reliability.png (required but "
                                     "with --dry-run)")
    if with_dry_run:
        p.add_argument("--dry-run", action="store_true", help=(
            "train nothing, call no teacher, write nothing: print the first prompt, its tokens, and the most "
            "teacher calls, tokens and cost the run can spend"))
        p.add_argument("--prompt-file", help="with --dry-run: write the first prompt to this new file instead")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def dry_run(config, prompt_file: str | None) -> int:
    """`--dry-run`: what the run would send and spend (pgkd.loop.dryrun), from its data alone. The
    prompt goes to `prompt_file`, a new file (never one that exists), or to stdout (None or -)."""
    from pgkd.data import load_dataset, make_splits, with_taxonomy
    from pgkd.loop.dryrun import plan
    from pgkd.students.contract import check_student
    from pgkd.teachers.llm import default_token_counter
    from pgkd.teachers.transports import is_llm_teacher, public_url
    target = None if prompt_file in (None, "-") else Path(prompt_file)
    if target is not None:     # checked before any work; created exclusively, so never over another file
        if not prompt_file.strip():
            raise UserError(Option("prompt_file", prompt_file, quoted=True), ": an empty file name")
        if os.path.lexists(target):
            raise UserError(Option("prompt_file", prompt_file), ": exists already; name a new file")
        from pgkd.files import output_path_problem
        if (problem := output_path_problem(target)) is not None:
            raise UserError(Option("prompt_file", prompt_file), f": {problem}")
        if not target.parent.is_dir():
            raise UserError(Option("prompt_file", prompt_file), f": no folder {target.parent}")
    check_student(config.student)      # what the run would refuse, a dry run refuses too (without loading it)
    if config.device != "auto":        # and a device this machine lacks
        from pgkd.encoder import pick_device
        pick_device(config.device)
    dataset = with_taxonomy(load_dataset(config.data, config.text_column, config.label_column, seed=config.seed),
                            config.taxonomy)
    splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
    llm = is_llm_teacher(config.teacher)
    result = plan(config, splits, public_url(config.teacher) if llm else config.teacher, not llm,
                  default_token_counter())
    if target is None:
        print("----- first prompt -----")
        print(result.prompt.text, end="")
        print("----- end of prompt -----")
    else:
        try:
            with open(target, "x", encoding="utf-8") as f:
                f.write(result.prompt.text)
        except FileExistsError:
            raise UserError(Option("prompt_file", prompt_file), ": exists already; name a new file") from None
    print("\n".join(result.lines()))
    if target is not None:
        print(f"wrote the first prompt to {prompt_file}")
    return 0


def run_config(args: argparse.Namespace):
    """The run's options given to a command that took `distill_arguments`: a DistillConfig, validated
    (pydantic's ValidationError, which `main` says naming the flags)."""
    from pgkd.loop.config import DistillConfig
    from pgkd.options import from_options
    return from_options(DistillConfig, args)


def cmd_distill(args) -> int:
    from pgkd.loop.cycle import TEACHER_UNAVAILABLE
    from pgkd.loop.embedded import run
    from pgkd.loop.report import summary_table
    config = run_config(args)
    if args.dry_run:
        if args.out is not None:           # as the run would check it; nothing is written
            from pgkd.loop.outputs import RunOutput
            RunOutput(args.out).check()
        return dry_run(config, args.prompt_file)
    if args.prompt_file is not None:
        raise UserError(Option("prompt_file", args.prompt_file), ": is for --dry-run only")
    if args.out is None:
        raise UserError(Option("out"), ": required: the folder the run writes (only --dry-run runs without one)")
    report = run(config, args.out, progress=args.progress).report
    print(summary_table(report))
    print(f"stopped: {report.stop_reason}")
    calibration = report.calibration or {}
    print(f"wrote {args.out}/report.json, {args.out}/best/, {args.out}/history.png"
          + (f", {args.out}/reliability.png" if calibration.get("samples") else ""))
    if calibration.get("deferral"):
        d = calibration["deferral"]
        print(f"cascade: threshold {d['threshold']:.4f} ({d['target']}): on {d['samples']} held texts the student "
              f"answers {d['student_share']:.1%}" + ("" if d["student_accuracy"] is None else
                                                      f" at accuracy {d['student_accuracy']:.4f}"))
    # The run's results are written either way; a teacher that went away is still a failure to report,
    # and so is a deferral target the held scores cannot meet (the student is kept without a threshold).
    if calibration.get("deferral_problem"):
        raise UserError(f"{calibration['deferral_problem']} (the run's results are written to {args.out}, "
                        "the student without a threshold)")
    return 1 if report.stop_reason.startswith(TEACHER_UNAVAILABLE) else 0


def cmd_teacher_serve(args) -> int:
    from pgkd.options import from_options
    from pgkd.teachers.server import Simulation, serve
    serve(from_options(Simulation, args), args.http_port, args.grpc_port, args.metrics_port, host=args.host)
    return 0


def _utf8_text(text: str, where: str) -> str:
    """A text that really is UTF-8: Python hands undecodable bytes (in arguments, or on stdin under a C
    locale) over as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: not UTF-8 text (an undecodable byte or a lone surrogate at character {e.start + 1})") from None
    return text


def _read_stdin_texts() -> list[str]:
    texts = []
    stream = getattr(sys.stdin, "buffer", sys.stdin)     # bytes where there are bytes: decoded strictly below
    for number, line in enumerate(stream, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"stdin:{number}: not UTF-8 text (byte 0x{line[e.start]:02x} at byte {e.start + 1})") \
                    from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"stdin:{number}: not JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"stdin:{number}: expected a JSON object with a non-empty \"text\"")
        texts.append(_utf8_text(text, f"stdin:{number}"))
    return texts


def cmd_predict(args) -> int:
    from pgkd.students import load_student
    texts = [_utf8_text(t, f"argument {i}") for i, t in enumerate(args.texts, start=1)] or _read_stdin_texts()
    if not texts:
        raise UserError("no texts: give them as arguments or as JSON Lines on stdin")
    empty = next((i for i, t in enumerate(texts, start=1) if not t.strip()), None)
    if empty is not None:     # as stdin's rows are: an empty text has nothing to classify
        raise UserError(f"argument {empty}: an empty text")
    student = load_student(args.model, device=args.device)
    probs = student.predict_proba(texts)
    for text, row in zip(texts, probs):
        best = int(row.argmax())
        print(json.dumps({"text": preview(text), "label": student.labels[best],
                          "probability": round(float(row[best]), 4)}, ensure_ascii=False))
    return 0


PREVIEW_CHARS = 60


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """A text as a printed answer shows it: itself up to `limit` characters, else its start and "…" (a
    line per text, in the order given, is what matches answers to texts; a long text is not echoed)."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def cmd_export(args) -> int:
    from pathlib import Path

    from pgkd.files import output_path_problem, require_writable
    from pgkd.serving import student_from
    from pgkd.serving.repository import require_own_folder, write_version
    out = Path(args.out)
    if args.format == "hf":
        if (problem := output_path_problem(out)) is not None:
            raise UserError(f"--out {out}: {problem}")
        from pgkd.artifacts import ArtifactError, ArtifactStore
        from pgkd.distributed.steps import export_checkpoint
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out}: not empty")
        require_writable(out)
        try:
            export_checkpoint(ArtifactStore(args.artifacts), args.model, out)
        except ArtifactError as e:
            raise UserError(str(e)) from None
        print(f"wrote {out}/ (a Hugging Face model folder: pgkd predict --model {out})")
        return 0
    check_name(args.model_name, "--model-name")
    require_own_folder(out, "--out", args.model_name)
    if args.int8 and args.format != "onnx":
        raise UserError("--int8 needs --format onnx (dynamic quantization is ONNX Runtime's)")
    student, source = student_from(args.model, args.artifacts)
    print(f"pgkd: exporting {args.model} ({len(student.labels)} labels) as {args.format}"
          f"{' int8' if args.int8 else ''} ...", file=sys.stderr, flush=True)   # seconds to a minute
    with stop_signals():   # SIGTERM or SIGHUP unwinds as Ctrl-C does: no half-written version is left
        version = write_version(out, student, source, model=args.model_name, fmt=args.format, int8=args.int8,
                                gpu=args.gpu)
    print(f"wrote {version.path}/ (version {version.number} of {args.model_name}, {args.format}"
          f"{', int8' if args.int8 else ''}): pgkd serve --model {out}")
    return 0


def cmd_serve(args) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from pgkd.serving import student_from
    from pgkd.serving.repository import is_repository, require_own_folder, write_version
    from pgkd.serving.server import serve_repository
    temporary = None
    with stop_signals():   # SIGTERM or SIGHUP unwinds as Ctrl-C does, through the `finally` below
        try:
            if is_repository(Path(args.model)) or args.wait_for_version:
                repository = Path(args.model)
                require_own_folder(repository, "--model", writes=False)   # read: a link to it is fine
            else:
                student, source = student_from(args.model, args.artifacts)
                if args.repository is None:
                    repository = temporary = Path(tempfile.mkdtemp(prefix="pgkd-serve-"))
                else:
                    repository = Path(args.repository)
                    require_own_folder(repository, "--repository")
                write_version(repository, student, source, model=args.model_name, fmt=args.format, int8=args.int8,
                              gpu=args.gpu)
            return serve_repository(repository, args.model_name, args.http_port, args.grpc_port, args.metrics_port,
                                    address=args.host, wait_for_version=args.wait_for_version)
        finally:
            if temporary is not None:   # the repository pgkd made for this server alone
                shutil.rmtree(temporary, ignore_errors=True)


def cmd_classify(args) -> int:
    from pgkd.serving.client import Endpoint, classify
    Endpoint.parse(args.url)   # a bad URL is said before stdin is read
    texts = [_utf8_text(t, f"argument {i}") for i, t in enumerate(args.texts, start=1)] or _read_stdin_texts()
    if not texts:
        raise UserError("no texts: give them as arguments or as JSON Lines on stdin")
    answers = classify(args.url, texts, model=args.model_name, batch_size=args.batch_size, timeout=args.timeout)
    for answer in answers:   # the lines `pgkd predict` prints: a long text as its start (preview)
        print(json.dumps({**answer, "text": preview(answer["text"])}, ensure_ascii=False))
    return 0


def _csv(kind):
    """A comma-separated list of `kind`: no item may be empty (`--seeds ''`, `--datasets a,,b` are refused,
    not read as the default list, or as a shorter one)."""
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty item in a comma-separated list")
        return [kind(x) for x in items]
    return parse


def cmd_bench_quality(args) -> int:
    from pathlib import Path

    from pgkd.bench.quality import run_quality
    quick = args.quick
    if args.dev_samples < 0:
        raise UserError(Option("dev_samples", args.dev_samples), ": expected 0 or more")
    options = {"student": args.student, "labeled": args.labeled, "samples_per_cycle": args.samples_per_cycle,
               "max_cycles": args.max_cycles if args.max_cycles is not None else (3 if quick else 10),
               "patience": args.patience, "label_noise": args.label_noise}
    if args.epochs:
        options["epochs"] = args.epochs
    if args.cycle_epochs:
        options["cycle_epochs"] = args.cycle_epochs
    datasets = args.datasets or (["banking77", "hwu64"] if quick else ["banking77", "clinc150", "hwu64", "ag_news"])
    seeds = args.seeds or ([1] if quick else [1, 2, 3])
    summary = run_quality(Path(args.data_dir), datasets, args.arms, seeds, Path(args.out), options,
                          progress=args.progress, dev_samples=args.dev_samples)
    from pgkd.bench.quality import markdown
    print(markdown(summary), end="")
    print(f"wrote {args.out}/quality.json, quality.md, quality.png ({summary['seconds']:.0f} s)")
    return 0


def cmd_bench_peers(args) -> int:
    from pathlib import Path

    from pgkd.bench.peers import DEFAULT_DATASETS, SetFitRecipe, markdown, run_peers
    if args.quick:   # a tiny configuration for tests: minutes, not hours
        datasets = args.datasets or ["banking77"]
        students = {"tiny": [1]}
        options = {"labeled": args.labeled or 160, "max_cycles": 1, "samples_per_cycle": 16, "epochs": 1,
                   "cycle_epochs": 1, "patience": 5}
        setfit, setfit_seeds = SetFitRecipe(num_iterations=1, max_length=32), args.setfit_seeds or [1]
    else:
        datasets = args.datasets or list(DEFAULT_DATASETS)
        students = {"minilm-frozen": args.seeds or [1, 2, 3], "minilm": args.fine_tuned_seeds or [1]}
        if args.students:
            students = {spec: seeds for spec, seeds in students.items() if spec in args.students}
        options = {"labeled": args.labeled or 1000, "max_cycles": 10, "samples_per_cycle": 32, "patience": 5}
        setfit, setfit_seeds = SetFitRecipe(args.setfit_iterations), args.setfit_seeds or args.seeds or [1, 2, 3]
    summary = run_peers(Path(args.data_dir), datasets, Path(args.out), students, setfit_seeds, setfit, options,
                        progress=args.progress, existing_only=args.existing_only)
    print(markdown(summary), end="")
    print(f"wrote {args.out}/peers.json, peers.md ({summary['seconds']:.0f} s)")
    return 0


def cmd_bench_speed(args) -> int:
    from pathlib import Path

    from pgkd.bench.speed import markdown, run_speed
    quick = args.quick
    result = run_speed(Path(args.data), Path(args.out), student_spec=args.student,
                       train_samples=200 if quick else args.train_samples, epochs=1 if quick else args.epochs,
                       inference_texts=300 if quick else args.inference_texts, batch_size=args.batch_size,
                       latency_calls=30 if quick else args.latency_calls, device=args.device, onnx=not args.no_onnx,
                       seed=args.seed, model=Path(args.model) if args.model else None)
    print(markdown(result), end="")
    print(f"wrote {args.out}/speed.json, speed.md")
    return 0


def cmd_bench_serve(args) -> int:
    from pathlib import Path

    from pgkd.bench.serve import batching_markdown, markdown, run_batching_bench, run_serve_bench
    if args.batching_delays is not None:
        result = run_batching_bench(Path(args.model), Path(args.data), Path(args.out), args.batching_delays,
                                    repeats=args.repeats, calls=args.calls, clients=args.clients,
                                    client_calls=args.client_calls, test_texts=args.test_texts)
        print(batching_markdown(result), end="")
        print(f"wrote {args.out}/batching.json, batching.md")
        return 0
    result = run_serve_bench(Path(args.model), Path(args.data), Path(args.out), price_per_cpu_hour=args.price_per_cpu_hour,
                             calls=args.calls, clients=args.clients, client_calls=args.client_calls,
                             test_texts=args.test_texts)
    print(markdown(result), end="")
    print(f"wrote {args.out}/serve.json, serve.md")
    return 0


def cmd_bench_stream(args) -> int:
    from pathlib import Path

    if args.samples is not None:
        return _bench_stream_scale(args)
    args.out = args.out or "runs/bench/stream"
    from pgkd.bench.stream import markdown, run_stream_bench
    result = run_stream_bench(Path(args.data), Path(args.out), student=args.student, labeled=args.labeled,
                              size=args.size, bad_percent=args.bad_percent, trigger_count=args.trigger_count,
                              max_cycles=args.max_cycles, seed=args.seed, progress=args.progress)
    print(markdown(result), end="")
    print(f"wrote {args.out}/stream.json, stream.md, artifacts/")
    return 0


def _bench_stream_scale(args) -> int:
    """`bench stream --samples N` runs ingest over a local broker: the services' benchmark (an entry
    point in `pgkd.benchmarks`, since the engine does not import the services)."""
    from importlib.metadata import entry_points
    from pathlib import Path
    found = [e for e in entry_points(group="pgkd.benchmarks") if e.name == "stream-scale"]
    if not found:
        raise UserError("bench stream --samples: needs the services (pgkd_services); run `make setup`")
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: expected a positive number of samples")
    out = args.out or "runs/bench/stream-scale"
    result = found[0].load()(samples=args.samples, out=out, stages=args.stages, batch_max=args.batch_max,
                             progress=args.progress)
    print(Path(out, "stream-scale.md").read_text(), end="")
    print(f"wrote {out}/stream-scale.json, stream-scale.md ({result['seconds']:.0f} s)")
    return 0


def cmd_bench_cascade(args) -> int:
    from pathlib import Path

    from pgkd.bench.cascade import markdown, run_cascade_bench
    given = {name: getattr(args, name) for name in ("targets", "price_per_million_tokens", "guidance_source",
                                                    "price_per_million_output_tokens", "student_cost_per_million")
             if getattr(args, name) is not None}
    result = run_cascade_bench(Path(args.data_root), args.datasets, Path(args.out), labeled=args.labeled,
                               student=args.student, max_cycles=args.max_cycles, llm_accuracy=args.llm_accuracy,
                               windows=args.windows, seed=args.seed, progress=args.progress, **given)
    print(markdown(result), end="")
    print(f"wrote {args.out}/cascade.json, cascade.md, cascade.png ({result['seconds']:.0f} s)")
    return 0


def cmd_bench_bus(args) -> int:
    from pathlib import Path

    from pgkd.bench.bus import markdown, run_bus_bench
    if args.repeats < 1:
        raise UserError(Option("repeats", args.repeats), ": expected 1 or more")
    result = run_bus_bench(run_config(args), Path(args.out), repeats=args.repeats)
    print(markdown(result), end="")
    print(f"wrote {args.out}/bus.json, bus.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pgkd", description="Performance-Guided Knowledge Distillation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    distill = sub.add_parser("distill", help="run PGKD in this process")
    distill_arguments(distill, with_dry_run=True)
    distill.set_defaults(func=cmd_distill)
    predict = sub.add_parser("predict", help="classify texts with a saved student")
    predict.add_argument("--model", required=True, help="a student folder, e.g. OUT/best")
    predict.add_argument("--device", default="auto")
    predict.add_argument("texts", nargs="*", help="texts; none: JSON Lines on stdin")
    predict.set_defaults(func=cmd_predict)
    export = sub.add_parser("export", help="a student as the next version of a Triton model repository "
                                           "(or, --format hf, a stored checkpoint as a model folder)")
    export.add_argument("model", help="a student folder (OUT/best), or a checkpoint's URI in the artifact store")
    export.add_argument("--out", required=True, help="the model repository (new, empty, or one pgkd wrote)")
    export.add_argument("--format", default="onnx", choices=["onnx", "torch", "hf"],
                        help="onnx (ONNX Runtime), torch (TorchScript), hf (a checkpoint as a Hugging Face folder)")
    export.add_argument("--int8", action="store_true", help="ONNX dynamically quantized to int8 (see BENCHMARKS.md)")
    export.add_argument("--gpu", action="store_true", help="a GPU instance in config.pbtxt (KIND_GPU)")
    export.add_argument("--model-name", default="student", help="the model's name in the repository")
    export.add_argument("--artifacts", default=None, help="the artifact store's URL (default: PGKD_ARTIFACTS)")
    export.set_defaults(func=cmd_export)
    serve_student = sub.add_parser("serve", help="serve a student on a real Triton server (HTTP, gRPC, metrics)")
    serve_student.add_argument("--model", required=True,
                               help="a model repository (pgkd export), a student folder, or a checkpoint URI")
    serve_student.add_argument("--host", type=host_option, default=DEFAULT_HOST,
                               help="the address to listen on (0.0.0.0: every interface)")
    serve_student.add_argument("--http-port", type=port_option, default=8000, help="default 8000")
    serve_student.add_argument("--grpc-port", type=port_option, default=8001, help="default 8001")
    serve_student.add_argument("--metrics-port", type=port_option, default=8002, help="default 8002")
    serve_student.add_argument("--repository", default=None,
                               help="for a student folder or checkpoint: where to write its repository "
                                    "(default: a new temporary folder)")
    serve_student.add_argument("--format", default="onnx", choices=["onnx", "torch"])
    serve_student.add_argument("--int8", action="store_true")
    serve_student.add_argument("--gpu", action="store_true", help="a GPU instance (a repository's own config decides)")
    serve_student.add_argument("--model-name", default="student")
    serve_student.add_argument("--wait-for-version", action="store_true",
                               help="--model is a repository that may have no version yet: serve it anyway, "
                                    "and load the first version the deployer writes")
    serve_student.add_argument("--artifacts", default=None, help="the artifact store's URL (default: PGKD_ARTIFACTS)")
    serve_student.set_defaults(func=cmd_serve)
    classify = sub.add_parser("classify", help="classify texts with a served student (pgkd serve)")
    classify.add_argument("--url", required=True, help="http://HOST:PORT or grpc://HOST:PORT")
    classify.add_argument("--model-name", default="student")
    classify.add_argument("--batch-size", type=int, default=64, help="texts per request")
    classify.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    classify.add_argument("texts", nargs="*", help="texts; none: JSON Lines on stdin")
    classify.set_defaults(func=cmd_classify)
    from pgkd.settings import add_command as add_settings_command
    add_settings_command(sub)   # `pgkd settings`: every PGKD_* variable, its default and meaning

    for register in _command_plugins():   # the bus commands (pgkd_services) register themselves here
        register(sub, distill_arguments)

    teacher = sub.add_parser("teacher", help="the teacher side")
    teacher_sub = teacher.add_subparsers(dest="teacher_command", required=True, parser_class=Parser)
    serve = teacher_sub.add_parser("serve", help="serve a simulated teacher as a Triton LLM model (text in, JSON out)")
    from pgkd.options import add_options
    from pgkd.teachers.simulated import Simulation
    add_options(serve, Simulation)
    serve.add_argument("--host", type=host_option, default=DEFAULT_HOST,
                       help="the address to listen on (0.0.0.0: every interface)")
    # not pgkd serve's 8000-8002: a student and its teacher run side by side (make demo's ports)
    serve.add_argument("--http-port", "--port", type=port_option, default=8010, help="default 8010")
    serve.add_argument("--grpc-port", type=port_option, default=8011, help="default 8011")
    serve.add_argument("--metrics-port", type=port_option, default=8012, help="default 8012")
    serve.set_defaults(func=cmd_teacher_serve)

    bench = sub.add_parser("bench", help="benchmarks: quality of the arms, speed of the student")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)
    quality = bench_sub.add_parser("quality", help="baseline, unguided, guided PGKD and ablations side by side")
    quality.add_argument("--data-dir", default="../shared/data", help="folder holding the dataset folders")
    quality.add_argument("--datasets", type=_csv(str), default=None,
                         help="comma-separated names under --data-dir (default: all four; --quick: two)")
    quality.add_argument("--arms", type=_csv(str),
                         default=["baseline", "pool-random", "pool-guided", "guided-no-report",
                                  "guided-no-hard-negatives"])
    quality.add_argument("--seeds", type=_csv(int), default=None, help="default 1,2,3 (--quick: 1)")
    quality.add_argument("--student", default="minilm-frozen", help="minilm-frozen (cheap) or minilm (fine-tuned)")
    quality.add_argument("--labeled", type=int, default=1000)
    quality.add_argument("--samples-per-cycle", type=int, default=32)
    quality.add_argument("--max-cycles", type=int, default=None, help="default 10 (--quick: 3)")
    quality.add_argument("--patience", type=int, default=5)
    quality.add_argument("--label-noise", type=float, default=0.0)
    quality.add_argument("--epochs", type=int, default=None)
    quality.add_argument("--cycle-epochs", type=int, default=None)
    quality.add_argument("--dev-samples", type=int, default=0, help=(
        "hold this many train samples out of every run and score each kept student on them: a dev set for "
        "choices that must not be made on test (0: none)"))
    quality.add_argument("--quick", action="store_true", help="a small configuration: minutes, not hours")
    quality.add_argument("--out", default="runs/bench/quality")
    quality.add_argument("--no-progress", dest="progress", action="store_false")
    quality.set_defaults(func=cmd_bench_quality)

    peers = bench_sub.add_parser("peers", help="our students against SetFit on the same labels, and the literature")
    peers.add_argument("--data-dir", default="../shared/data", help="folder holding the dataset folders")
    peers.add_argument("--datasets", type=_csv(str), default=None, help="default: all four (--quick: banking77)")
    peers.add_argument("--seeds", type=_csv(int), default=None, help="the frozen student's and SetFit's (1,2,3)")
    peers.add_argument("--fine-tuned-seeds", type=_csv(int), default=None, help="the fine-tuned student's (1)")
    peers.add_argument("--students", type=_csv(str), default=None, help="minilm-frozen,minilm (default: both)")
    peers.add_argument("--setfit-seeds", type=_csv(int), default=None, help="default: --seeds")
    peers.add_argument("--setfit-iterations", type=int, default=20, help="SetFit's pairs per sample")
    peers.add_argument("--labeled", type=int, default=None)
    peers.add_argument("--quick", action="store_true", help="a tiny configuration (the tests')")
    peers.add_argument("--existing-only", action="store_true",
                       help="tabulate the runs written already under --out and run nothing")
    peers.add_argument("--out", default="runs/bench/peers")
    peers.add_argument("--no-progress", dest="progress", action="store_false")
    peers.set_defaults(func=cmd_bench_peers)

    speed = bench_sub.add_parser("speed", help="student training and inference against the Hugging Face tools")
    speed.add_argument("--data", default="../shared/data/banking77")
    speed.add_argument("--student", default="minilm")
    speed.add_argument("--model", default=None, help="a saved student to measure inference on, e.g. runs/demo/best")
    speed.add_argument("--train-samples", type=int, default=800)
    speed.add_argument("--epochs", type=int, default=2)
    speed.add_argument("--inference-texts", type=int, default=1000)
    speed.add_argument("--batch-size", type=int, default=32)
    speed.add_argument("--latency-calls", type=int, default=100)
    speed.add_argument("--device", default="auto", help="auto | cpu | cuda")
    speed.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurements")
    speed.add_argument("--seed", type=int, default=1)
    speed.add_argument("--quick", action="store_true", help="fewer samples and calls: about a minute")
    speed.add_argument("--out", default="runs/bench/speed")
    speed.set_defaults(func=cmd_bench_speed)
    serve_bench = bench_sub.add_parser("serve", help="the student answering traffic: in-process torch and ONNX "
                                                     "(fp32, int8) against the served model over HTTP and gRPC")
    serve_bench.add_argument("--model", default="runs/demo/best", help="a fine-tuned student folder (make demo's)")
    serve_bench.add_argument("--data", default="../shared/data/banking77", help="its dataset: the test split is used")
    serve_bench.add_argument("--price-per-cpu-hour", type=float, default=0.05, help="for the cost per million texts")
    serve_bench.add_argument("--calls", type=int, default=60, help="calls per latency measurement at batch 1")
    serve_bench.add_argument("--clients", type=int, default=16, help="concurrent clients")
    serve_bench.add_argument("--client-calls", type=int, default=20, help="one-text calls per concurrent client")
    serve_bench.add_argument("--test-texts", type=int, default=None, help="the first N test texts (default: all)")
    serve_bench.add_argument("--batching-delays", type=_csv(int), default=None,
                             help="instead: the served model's dynamic-batching delay, e.g. 2000,500,0 (microseconds), "
                                  "side by side at 1 client and at --clients (batching.json, batching.md)")
    serve_bench.add_argument("--repeats", type=int, default=3, help="with --batching-delays: rounds over the delays")
    serve_bench.add_argument("--out", default="runs/bench/serve")
    serve_bench.set_defaults(func=cmd_bench_serve)
    stream = bench_sub.add_parser("stream", help="a stream of new labeled data with bad messages in it: the "
                                                 "triggered run and its decision")
    stream.add_argument("--data", default="../shared/data/banking77")
    stream.add_argument("--student", default="minilm-frozen")
    stream.add_argument("--labeled", type=int, default=1000, help="labels of the base run")
    stream.add_argument("--size", type=int, default=1000, help="messages streamed (new labels from the pool)")
    stream.add_argument("--bad-percent", type=float, default=5.0, help="share of bad messages among them")
    stream.add_argument("--trigger-count", type=int, default=500, help="new samples that start a run")
    stream.add_argument("--max-cycles", type=int, default=3)
    stream.add_argument("--seed", type=int, default=1)
    stream.add_argument("--samples", type=int, default=None,
                        help="the storage at scale instead: ingest over a local Kafka-protocol broker up to this "
                             "many stored samples (synthetic texts), its rate, restarts and the time to cut a dataset")
    stream.add_argument("--stages", type=_csv(int), default=None, help="with --samples: where to measure on the way "
                                                                        "(default: 10000,100000)")
    stream.add_argument("--batch-max", type=int, default=500, help="with --samples: ingest's PGKD_STREAM_BATCH_MAX")
    stream.add_argument("--out", default=None, help="default: runs/bench/stream (with --samples: stream-scale)")
    stream.add_argument("--no-progress", dest="progress", action="store_false")
    stream.set_defaults(func=cmd_bench_stream)
    # Defaults left None are pgkd.bench.cascade's (declared there, once; importing it here would load torch).
    cascade = bench_sub.add_parser("cascade", help="the student answers, a simulated LLM backs it up: accuracy "
                                                   "against the share deferred, costs, a stream of windows")
    cascade.add_argument("--data-root", default="../shared/data", help="folder holding the dataset folders")
    cascade.add_argument("--datasets", type=_csv(str), default=["banking77", "clinc150", "hwu64"],
                         help="comma-separated names under --data-root")
    cascade.add_argument("--labeled", type=int, default=1000, help="labels of each distilled run")
    cascade.add_argument("--student", default="minilm-frozen", help="minilm-frozen (cheap on CPU) or minilm")
    cascade.add_argument("--max-cycles", type=int, default=3, help="cycles of each distilled run")
    cascade.add_argument("--llm-accuracy", type=float, default=0.95,
                         help="the simulated LLM's accuracy p: the gold label with probability p (a simulation)")
    cascade.add_argument("--targets", default=None, help=(
        "comma-separated: p-D (the student's answers at least D below --llm-accuracy), a number (that accuracy), "
        "share:S (the simulated LLM answers at most S); each threshold chosen on held validation scores; the "
        "stream uses the first (default: p-0.01,p-0.02,share:0.2)"))
    cascade.add_argument("--price-per-million-tokens", type=float, default=None,
                         help="an assumed LLM price, $ per million input tokens (default 0.15)")
    cascade.add_argument("--price-per-million-output-tokens", type=float, default=None,
                         help="an assumed LLM price, $ per million output tokens (default 0.60)")
    cascade.add_argument("--student-cost-per-million", type=float, default=None,
                         help="$ per million texts the student answers (default: BENCHMARKS.md's served student, "
                              "337 texts/s on 2 CPU threads at $0.05 per CPU-hour: 0.0824)")
    cascade.add_argument("--windows", type=int, default=5, help="windows of the stream of test traffic")
    cascade.add_argument("--guidance-source", default=None, choices=["out-of-fold", "validation"], help=(
        "the distilled runs' guidance (default out-of-fold: the teacher is shown no validation text, so all of "
        "them are held scores for the threshold)"))
    cascade.add_argument("--seed", type=int, default=1)
    cascade.add_argument("--out", default="runs/bench/cascade")
    cascade.add_argument("--no-progress", dest="progress", action="store_false")
    cascade.set_defaults(func=cmd_bench_cascade)
    bus = bench_sub.add_parser("bus", help="the distributed loop's cost: the same run embedded and through the "
                                           "services' steps and the artifact store, side by side")
    distill_arguments(bus, with_out=False)
    bus.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    bus.add_argument("--out", default="runs/bench/bus")
    bus.set_defaults(func=cmd_bench_bus, max_cycles=3)
    return parser


# The engine names a caller's parameter as Python does (pgkd.errors.Option); a command's option of
# another name is here, parameter -> the option's dest.
PARAMETER_DESTS = {"fmt": "format", "name": "model_name", "model": "model_name"}


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def flags_of(parser: argparse.ArgumentParser, func):
    """name -> how the command that runs `func` spells the parameter: its long option (`--labeled`), ""
    for a positional argument, None where the command has no such option (the Python name is shown)."""
    from pgkd.options import flags
    flag = flags(next((p for p in _parsers(parser) if p.get_default("func") is func), parser))
    return lambda name: flag(PARAMETER_DESTS.get(name, name), flag(name))



def _warnings_as_pgkd_lines() -> None:
    """A warning the engine logs (pgkd.teachers: a teacher that refused structured answers) reaches the
    terminal as `pgkd: ...`, where no logging is set up (Python's last-resort handler would print it bare).
    A service sets up its own logging (timestamps, levels), and then this is never used."""
    handler = logging.StreamHandler()          # sys.stderr as it is when the warning is written
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("pgkd: %(message)s"))
    logging.lastResort = handler


def main(argv: list[str] | None = None) -> int:
    _warnings_as_pgkd_lines()
    try:        # the commands' modules load here: a Ctrl-C this early is an interruption too, not a traceback
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("pgkd: interrupted", file=sys.stderr)
        return 130
    try:
        with stop_signals():   # SIGTERM and SIGHUP unwind every command as Ctrl-C does: its `finally`s run
            return args.func(args)
    except UserError as e:     # a parameter it names is named as this command's option (pgkd.errors.Option)
        print(f"pgkd: error: {one_line(e.for_command(flags_of(parser, args.func)))}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"pgkd: error: {one_line(invalid(e).for_command(flags_of(parser, args.func)))}", file=sys.stderr)
        return 2
    except BrokenPipeError:    # the reader went away (`pgkd settings | head`): nothing to say, as Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        return 128 + signal.SIGPIPE
    except (EnvironmentFailure, TimeoutError, OSError) as e:    # OSError: a disk full, a file system gone
        print(f"pgkd: {one_line(e)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as e:    # the commands that write an output folder write it whole or not at all
        written = "; nothing was written to the output folder" if args.func in (cmd_distill, cmd_export) else ""
        print(f"pgkd: interrupted{written}", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Stopped) else 2)   # 130: Ctrl-C (SIGINT)


if __name__ == "__main__":
    sys.exit(main())
