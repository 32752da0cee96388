"""The client of a served student: texts in batches to Triton (HTTP or gRPC), labels back.

    from pgkd.serving import classify
    classify("http://127.0.0.1:8000", ["where is my card?"])   # [{"text": ..., "label": ..., "probability": ...}]
"""
from __future__ import annotations

import http.client
import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from pgkd.errors import EnvironmentFailure, Option, UserError
from pgkd.names import check_name
from pgkd.net import parse_address, url_host
from pgkd.serving.repository import MODEL_NAME
from pgkd.students.contract import text_list


class ServingError(EnvironmentFailure):
    """The server could not be reached, did not answer in time, is not a Triton server serving the
    model, or failed the request itself: not the request's fault (`pgkd classify` exits 1)."""


class ServerUnreachable(ServingError):
    """Nothing answered at the address (not started yet, or gone)."""


@dataclass(frozen=True)
class Endpoint:
    protocol: str      # "http" | "grpc"
    address: str       # host:port, as tritonclient takes it

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        if not isinstance(url, str):
            raise TypeError(f"url: expected a server's URL as a str (http://HOST:PORT), got {type(url).__name__}")
        scheme, sep, rest = url.partition("://")
        scheme, rest = (scheme, rest) if sep else ("http", url)
        if "@" in rest.partition("/")[0]:      # user:password@host: said without it, as no secret is printed
            shown = f"{scheme}://{rest.rpartition('@')[2]}"
            raise UserError(Option("url", shown), " (a user and password before it, not shown): a Triton server's "
                                                  "URL holds none; expected http://HOST:PORT or grpc://HOST:PORT")
        rest = rest.rstrip("/")
        if scheme not in ("http", "grpc") or "/" in rest:
            raise UserError(Option("url", url), ": expected http://HOST:PORT or grpc://HOST:PORT")
        host, port = parse_address(rest, Option("url", url))
        return cls(scheme, f"{url_host(host)}:{port}")


# How a cascade's row begins when the student behind it did not answer: the server's fault, not the text's
STUDENT_UNAVAILABLE = "the student could not answer"


class StudentClient:
    """One connection to a served student; `classify` batches texts into requests of `batch_size`."""

    def __init__(self, url: str, model: str = MODEL_NAME, timeout: float = 60.0):
        check_positive(timeout, "timeout", (int, float))
        if not math.isfinite(timeout):   # gRPC takes an infinite deadline as one already passed
            raise UserError(Option("timeout", timeout), ": must be a finite number of seconds")
        self.endpoint = Endpoint.parse(url)
        self.model = check_name(model, Option("model"))   # it goes in the request's path
        self.timeout = timeout
        self._max_batch_size: int | None = None   # the served model's, read from its config when needed
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

    def _inputs(self, texts: list[str]) -> list:
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        inputs = [self._module.InferInput("text", list(data.shape), "BYTES")]
        inputs[0].set_data_from_numpy(data)
        return inputs

    def infer(self, texts: list[str]) -> dict:
        """One request: {"label": [...], "probability": [...], "probabilities": array, "version": str}."""
        # Every output the model has: a student's three, and a cascade's `answered_by` and `error` besides.
        result = self._call(self._client.infer, self.model, self._inputs(texts))
        labels, probability, probabilities = (result.as_numpy(n) for n in ("label", "probability", "probabilities"))
        if labels is None or probability is None or probabilities is None or labels.size != len(texts):
            raise ServingError(f"{self._where()}: the answer has no label and probability per text: not a "
                               f"student model (pgkd export) named {self.model!r}")
        errors = [_text(x) for x in _column(result, "error")]
        if any(errors):     # a cascade answers a bad text in its own row: the same refusal as a student's
            error = next(e for e in errors if e)
            if error.startswith(STUDENT_UNAVAILABLE):
                raise ServingError(f"{self._where()}: {error}")
            raise UserError(f"the server refused the request: {error}")
        response = result.get_response()
        version = response.get("model_version", "") if isinstance(response, dict) else response.model_version
        answer = {"label": [_text(x) for x in labels.reshape(-1)],
                  "probability": probability.reshape(-1).tolist(), "probabilities": probabilities,
                  "version": str(version)}
        answered_by = _column(result, "answered_by")
        return answer | ({"answered_by": [_text(x) for x in answered_by]} if len(answered_by) else {})

    def served_labels(self) -> list[str]:
        """The served model's labels, in the order of its probabilities: its label map (labels.txt), read
        through Triton's classification extension (the top `n` classes of one request, as value:index:label)."""
        text = ["a text to read the served labels"]
        n = self.infer(text)["probabilities"].shape[1]
        outputs = [self._module.InferRequestedOutput("probabilities", class_count=n)]
        result = self._call(self._client.infer, self.model, self._inputs(text), outputs=outputs)
        labels: list[str | None] = [None] * n
        for entry in result.as_numpy("probabilities").reshape(-1):
            _, index, *label = _text(entry).split(":", 2)
            if label and index.isdigit() and int(index) < n:
                labels[int(index)] = label[0]
        if any(label is None for label in labels):
            raise ServingError(f"{self._where()}: model {self.model!r} has no label map (labels.txt) for its "
                               f"{n} probabilities")
        return labels

    def max_batch_size(self) -> int | None:
        """The served model's max_batch_size (its config.pbtxt; Triton refuses a request of more texts),
        asked once; None when the model does not say (no batching limit known)."""
        if self._max_batch_size is None:
            config = self._call(self._client.get_model_config, self.model,
                                **({"as_json": True} if self.endpoint.protocol == "grpc" else {}))
            config = config.get("config", config) if isinstance(config, dict) else {}
            try:
                self._max_batch_size = int(config.get("max_batch_size") or 0)
            except (TypeError, ValueError):
                self._max_batch_size = 0
        return self._max_batch_size or None

    def _where(self) -> str:
        return f"{self.endpoint.protocol}://{self.endpoint.address}"

    def _call(self, method, *args, **kwargs):
        """A call to the server; what went wrong as UserError (the request's fault) or ServingError."""
        from tritonclient.utils import InferenceServerException
        if self.endpoint.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        try:
            return method(*args, **kwargs)
        except InferenceServerException as e:
            error = _request_error(e, self._where(), self.model, self.timeout)
            if isinstance(error, _NotServed):
                error = self._not_served(error)
            raise error from None
        except TimeoutError:
            raise ServingError(f"{self._where()}: no answer within the timeout of {self.timeout:g} s") from None
        except OSError as e:     # refused, reset, no route
            raise ServingError(f"{self._where()}: {_first_line(e) or type(e).__name__}") from None
        except (http.client.HTTPException, ValueError):   # an answer that is not HTTP, or not Triton's
            hint = " (a gRPC port? then grpc://)" if self.endpoint.protocol == "http" else ""
            raise ServingError(f"{self._where()}: the answer is not a Triton server's{hint}") from None

    def _not_served(self, error: "_NotServed") -> Exception:
        """The server has no model of this name ready: a name it does not know while it serves others is
        the user's (UserError, naming those it serves); one in its repository that is not loaded, or a
        server that serves nothing yet (a deployer still to write the first version), is the server's."""
        try:
            kwargs = {"as_json": True, "client_timeout": self.timeout} if self.endpoint.protocol == "grpc" else {}
            index = self._client.get_model_repository_index(**kwargs)
        except Exception:  # noqa: BLE001 -- the index is a courtesy: without it, the server's own answer
            return UserError(str(error))
        models = index.get("models", []) if isinstance(index, dict) else index
        models = [m for m in models if isinstance(m, dict)]
        mine = [m for m in models if m.get("name") == self.model]
        if mine:
            state = mine[0].get("state") or "not loaded"
            reason = mine[0].get("reason") or ""
            return ServingError(f"{self._where()}: model {self.model!r} has no version loaded ({state}"
                                f"{': ' + reason.splitlines()[0] if reason.strip() else ''})")
        ready = sorted({str(m.get("name")) for m in models if m.get("state") == "READY"})
        if not ready:
            return ServingError(f"{self._where()}: serves no model yet, so none named {self.model!r}")
        return UserError(f"no model {self.model!r} at {self._where()}; it serves {', '.join(ready)}")

    def classify(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """A JSON-ready answer per text: text, label, probability (rounded as `pgkd predict` prints it)."""
        texts = check_texts(texts)
        check_positive(batch_size, "batch_size", int)
        if batch_size > 1 and len(texts) > 1:
            # more texts a request than the served model takes: split further, as a user expects
            batch_size = min(batch_size, self.max_batch_size() or batch_size)
        answers = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            try:
                result = self.infer(chunk)
            except UserError as e:   # the server numbers texts within the request: number them in the call
                raise UserError(re.sub(r"text (\d+):", lambda m: f"text {int(m.group(1)) + start}:", str(e))) from None
            who = result.get("answered_by") or [None] * len(chunk)     # a cascade says who answered each
            answers += [{"text": t, "label": label, "probability": round(float(p), 4)}
                        | ({"answered_by": by} if by is not None else {})
                        for t, label, p, by in zip(chunk, result["label"], result["probability"], who, strict=True)]
        return answers


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _column(result, name: str) -> list:
    values = result.as_numpy(name)
    return [] if values is None else list(values.reshape(-1))


class _NotServed(Exception):
    """The server knows no model of the name: a typo, or nothing deployed yet (StudentClient._not_served)."""


def _first_line(e) -> str:
    text = str(e.message() if hasattr(e, "message") and callable(e.message) else e).strip()
    return text.splitlines()[0].strip() if text else ""


def _request_error(e, where: str, model: str, timeout: float) -> Exception:
    """What a Triton client's InferenceServerException means for the user: UserError (exit 2) when the
    server says the request itself is wrong (HTTP 400, gRPC INVALID_ARGUMENT) or it serves no model of
    that name; ServingError (exit 1) for everything that is the server's or the network's: no answer in
    time, unreachable, the model not loaded, a server that is not Triton, a failure of the server."""
    message = _first_line(e)
    status = str(e.status() or "") if hasattr(e, "status") else ""
    code = status.removeprefix("StatusCode.")
    if code in ("400", "INVALID_ARGUMENT"):
        return UserError(f"the server refused the request: {message or status}")
    if "while decoding the response" in message:     # tritonclient.http: the answer was not Triton's JSON
        return ServingError(f"{where}: not a Triton server (HTTP {status or '?'} without Triton's JSON answer)")
    if code in ("404", "NOT_FOUND") and "unknown model" in message.lower():
        if "no available versions" in message:      # the model is there, no version of it is loaded
            return ServingError(f"{where}: model {model!r} has no version loaded: {message}")
        return _NotServed(f"no model {model!r} at {where} ({message})")   # StudentClient._not_served decides
    if code == "DEADLINE_EXCEEDED":
        return ServingError(f"{where}: no answer within the timeout of {timeout:g} s")
    if code == "UNAVAILABLE" or "failed to connect" in message.lower():
        return ServingError(f"{where}: unreachable: {message or status}")
    return ServingError(f"{where}: the server failed the request ({status or 'no status'}): {message or 'no message'}")


def check_texts(texts) -> list[str]:
    """The texts as a list, each a str that UTF-8 can encode; a lone str is refused (TypeError), as
    it would be classified one character at a time."""
    texts = text_list(texts)      # each a str that UTF-8 encodes (TypeError, UserError)
    if not texts:
        raise UserError("no texts to classify")
    return texts


def check_positive(value, name: str, kind) -> None:
    """`value` is a number of type `kind` above zero: TypeError, or UserError for a number out of range
    (the CLI passes its options on as they are, and reports a UserError in one line)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name}: expected a {'whole ' if kind is int else ''}number, got {value!r}")
    if not value > 0:
        raise UserError(Option(name, value), ": must be more than 0")


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
