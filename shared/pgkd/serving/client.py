"""The client of a served student: texts in batches to Triton (HTTP or gRPC), labels back.

    from pgkd.serving import classify
    classify("http://127.0.0.1:8000", ["where is my card?"])   # [{"text": ..., "label": ..., "probability": ...}]
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from pgkd.errors import UserError
from pgkd.names import check_name
from pgkd.net import parse_address, url_host
from pgkd.serving.repository import MODEL_NAME
from pgkd.students.contract import text_list


class ServingError(RuntimeError):
    """The server could not be reached or did not answer (not the request's fault)."""


class ServerUnreachable(ServingError):
    """Nothing answered at the address (not started yet, or gone)."""


@dataclass(frozen=True)
class Endpoint:
    protocol: str      # "http" | "grpc"
    address: str       # host:port, as tritonclient takes it

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        scheme, sep, rest = url.partition("://")
        scheme, rest = (scheme, rest) if sep else ("http", url)
        rest = rest.rstrip("/")
        if scheme not in ("http", "grpc") or "/" in rest:
            raise UserError(f"--url {url}: expected http://HOST:PORT or grpc://HOST:PORT")
        host, port = parse_address(rest, f"--url {url}")
        return cls(scheme, f"{url_host(host)}:{port}")


class StudentClient:
    """One connection to a served student; `classify` batches texts into requests of `batch_size`."""

    def __init__(self, url: str, model: str = MODEL_NAME, timeout: float = 60.0):
        check_positive(timeout, "timeout", (int, float))
        self.endpoint = Endpoint.parse(url)
        self.model = check_name(model, "model name")   # it goes in the request's path
        self.timeout = timeout
        if self.endpoint.protocol == "http":
            import tritonclient.http as client
            self._client = client.InferenceServerClient(self.endpoint.address, connection_timeout=timeout,
                                                        network_timeout=timeout)
        else:
            import tritonclient.grpc as client
            self._client = client.InferenceServerClient(self.endpoint.address)
        self._module = client

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def infer(self, texts: list[str]) -> dict:
        """One request: {"label": [...], "probability": [...], "probabilities": array, "version": str}."""
        from tritonclient.utils import InferenceServerException
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        inputs = [self._module.InferInput("text", list(data.shape), "BYTES")]
        inputs[0].set_data_from_numpy(data)
        outputs = [self._module.InferRequestedOutput(n) for n in ("label", "probability", "probabilities")]
        try:
            kwargs = {"client_timeout": self.timeout} if self.endpoint.protocol == "grpc" else {}
            result = self._client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except InferenceServerException as e:
            raise _request_error(e, self.endpoint) from None
        except (OSError, ConnectionError) as e:
            raise ServingError(f"{self.endpoint.protocol}://{self.endpoint.address}: {e}") from None
        response = result.get_response()
        version = response["model_version"] if isinstance(response, dict) else response.model_version
        return {"label": [x.decode() for x in result.as_numpy("label").reshape(-1)],
                "probability": result.as_numpy("probability").reshape(-1).tolist(),
                "probabilities": result.as_numpy("probabilities"), "version": str(version)}

    def classify(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """A JSON-ready answer per text: text, label, probability (rounded as `pgkd predict` prints it)."""
        texts = check_texts(texts)
        check_positive(batch_size, "batch_size", int)
        answers = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            try:
                result = self.infer(chunk)
            except UserError as e:   # the server numbers texts within the request: number them in the call
                raise UserError(re.sub(r"text (\d+):", lambda m: f"text {int(m.group(1)) + start}:", str(e))) from None
            answers += [{"text": t, "label": label, "probability": round(float(p), 4)}
                        for t, label, p in zip(chunk, result["label"], result["probability"], strict=True)]
        return answers


def _request_error(e, endpoint: Endpoint) -> Exception:
    """A request the server refused (the request's fault) as UserError; an unreachable or failing
    server as ServingError."""
    message = str(e.message() if hasattr(e, "message") and callable(e.message) else e).strip()
    status = str(e.status() or "") if hasattr(e, "status") else ""
    if "unavailable" in status.lower() or "failed to connect" in message.lower() or "connection" in message.lower():
        return ServingError(f"{endpoint.protocol}://{endpoint.address}: {message.splitlines()[0] if message else status}")
    return UserError(f"the server refused the request: {message.splitlines()[0] if message else status}")


def check_texts(texts) -> list[str]:
    """The texts as a list, each a str that UTF-8 can encode; a lone str is refused (TypeError), as
    it would be classified one character at a time."""
    texts = text_list(texts)
    if not texts:
        raise UserError("no texts to classify")
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise UserError(f"text {number}: not a string ({type(text).__name__})")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"text {number}: not UTF-8 text ({e.reason} at character {e.start})") from None
    return texts


def check_positive(value, name: str, kind) -> None:
    """`value` is a number of type `kind` above zero: TypeError, or UserError for a number out of range
    (the CLI passes its options on as they are, and reports a UserError in one line)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name}: expected a {'whole ' if kind is int else ''}number, got {value!r}")
    if not value > 0:
        raise UserError(f"{name} {value}: must be more than 0")


def classify(url: str, texts, model: str = MODEL_NAME, batch_size: int = 64, timeout: float = 60.0) -> list[dict]:
    """Classify `texts` with the student served at `url` (http://HOST:PORT or grpc://HOST:PORT)."""
    texts = check_texts(texts)                      # before any connection is made
    check_positive(batch_size, "batch_size", int)
    with StudentClient(url, model, timeout) as client:
        return client.classify(texts, batch_size)


def load_model(http_address: str, model: str = MODEL_NAME, timeout: float = 300.0) -> None:
    """Ask the server at `http_address` (host:port) to load the newest version of `model` (Triton's
    repository API; the server must run with --model-control-mode=explicit). ServingError with the
    server's reason when the version fails to load: the version it had goes on serving."""
    request = urllib.request.Request(f"http://{http_address}/v2/repository/models/{model}/load", data=b"{}",
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", errors="replace")
        raise ServingError(f"{model}: the server did not load the new version: {body.strip()[:500]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnreachable(f"http://{http_address}: {getattr(e, 'reason', e)}") from None


def served_version(http_address: str, model: str = MODEL_NAME, timeout: float = 10.0) -> str | None:
    """The version of `model` that is ready on the server, or None."""
    import json
    try:
        with urllib.request.urlopen(f"http://{http_address}/v2/models/{model}", timeout=timeout) as response:
            versions = json.loads(response.read()).get("versions") or []
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return max(versions, key=int) if versions else None
