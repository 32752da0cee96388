"""`pgkd serve`: a model repository of students on a real Triton server, until SIGTERM, SIGHUP or Ctrl-C.

Triton runs with explicit model control: it loads the newest version at start, and a new version
(from `pgkd export --out REPO` or the deployer) is swapped in by its load API, without a restart.
Here the server is the tritonserver bundled with PyTriton (Python backend only: the student's ONNX
graph runs in ONNX Runtime inside the Python-backend model); NGC's tritonserver image runs the same
repository (deploy/triton/Dockerfile.student adds onnxruntime and tokenizers to it).
"""
from __future__ import annotations

import sys
from pathlib import Path

from pgkd import processes
from pgkd.errors import UserError
from pgkd.net import DEFAULT_HOST, require_free_ports, triton_host, url_host
from pgkd.serving.repository import MODEL_NAME, check_repository, versions
from pgkd.serving.tritonserver import TritonServerError, port_taken, run_tritonserver, taken_port


def explicit_control(model: str = MODEL_NAME) -> list[str]:
    """tritonserver arguments: load `model` at start, then only when asked (the repository API)."""
    return ["--model-control-mode=explicit", f"--load-model={model}"]


def serve_repository(repository: Path, model: str = MODEL_NAME, http_port: int = 8000, grpc_port: int = 8001,
                     metrics_port: int = 8002, address: str = DEFAULT_HOST, wait_for_version: bool = False) -> int:
    """Serve on `address` until SIGTERM, SIGHUP or Ctrl-C. With `wait_for_version`, a repository with no
    version yet is served too: Triton starts without the model, and the first version the deployer writes
    loads. The server's own files (its log, its backend directory) are in a temporary folder, removed at
    exit: the repository holds models only, as Triton requires."""
    repository = Path(repository)
    version = None
    if wait_for_version and not versions(repository, model):
        repository.mkdir(parents=True, exist_ok=True)
    else:
        version = check_repository(repository, model)
    # A port taken (or given twice) is the user's to change: said in one line, before Triton starts. One
    # taken between this check and Triton's bind is caught from Triton's log below; the server counts as
    # started (and `serving` is said) only once its own process holds all three ports and answers ready,
    # not when another program answers on the HTTP port.
    address = triton_host(address)
    require_free_ports(address, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    serving = False
    try:
        # Without a version, the failed load of the model at start must not stop the server.
        extra = explicit_control(model) + (["--exit-on-error=false"] if version is None else [])
        with (processes.stop_signals(),
              run_tritonserver(repository, models=[model] if version else [], address=address, attempts=1,
                               ports=(http_port, grpc_port, metrics_port), extra_args=extra) as server):
            what = (f"version {version.number} ({len(version.manifest['labels'])} labels, {version.manifest['format']} "
                    f"{version.manifest['precision']})" if version else "(no version yet: the deployer writes the first)")
            print(f"pgkd: serving {model} {what} from {repository} on {address}: http :{http_port}, grpc :{grpc_port}, "
                  f"metrics :{metrics_port}/metrics; pgkd classify --url http://{url_host(address)}:{http_port} TEXT",
                  flush=True)
            serving = True
            code = server.process.wait()
            print(f"pgkd: tritonserver exited with code {code}; its log:\n{server.log_tail()}", file=sys.stderr)
            return 1
    except TritonServerError as e:
        message = str(e)
        if port_taken(message):
            ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
            option = taken_port(message, ports)
            if option is not None:
                raise UserError(f"{option} {ports[option]}: the port is already in use on {address}") from None
            raise UserError(f"a port of --http-port {http_port} / --grpc-port {grpc_port} / --metrics-port "
                            f"{metrics_port} is taken") from None
        print(f"pgkd: {message}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, processes.Stopped):
        if not serving:     # a start interrupted: said as any command's interruption (exit 130 on Ctrl-C)
            raise
        print("pgkd: stopped serving", file=sys.stderr)     # a server's normal end
        return 0
