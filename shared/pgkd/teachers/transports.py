"""How a prompt reaches a teacher LLM and its answer comes back: one call, no retries (llm.py
does those).

- `triton://HOST:PORT/MODEL` (HTTP) and `triton+grpc://HOST:PORT/MODEL` (gRPC), through tritonclient:
  a Triton LLM model with the text-in / text-out convention of Triton's vLLM and TensorRT-LLM
  models: BYTES `text_input` in, BYTES `text_output` out; `max_tokens` and `temperature` when the
  model takes them; token counts from `prompt_tokens` / `completion_tokens` when it reports them.
- `openai://HOST:PORT/v1?model=NAME` (`openai+https://` for TLS): OpenAI-compatible chat completions
  (vLLM, gateways). The API key comes from the environment variable named by `key_env` (default
  OPENAI_API_KEY) and is never logged or recorded.

A structured answer (`schema`, the answer's JSON schema) is asked for as each server takes it: an
OpenAI-compatible server as `response_format` of type `json_schema` (a 400 that names it is
`structured_refused`, for the teacher to ask again without); a Triton model of vLLM's backend in its
`sampling_parameters` (`guided_decoding`), one of TensorRT-LLM's in `guided_decoding_guide_type` and
`guided_decoding_guide`; a Triton model that takes neither gets the prompt alone (docs/real-llms.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np
from pgkd.errors import Option, UserError
from pgkd.net import parse_address, url_host



@dataclass
class Completion:
    text: str
    prompt_tokens: int | None = None       # None: the server did not say; the teacher counts them
    completion_tokens: int | None = None
    served_by: str | None = None           # the model's own account of itself, when it gives one


class TransportError(Exception):
    """A failed call. `transient` ones (timeouts, connection errors, 5xx) are worth retrying."""

    def __init__(self, kind: str, message: str, transient: bool):
        super().__init__(message)
        self.kind, self.transient = kind, transient


# Each scheme and the port a URL without one means: Triton's HTTP and gRPC ports, vLLM's for an
# OpenAI-compatible server over plain HTTP, and HTTPS's own (api.openai.com, a gateway).
DEFAULT_PORTS = {"triton": 8000, "triton+http": 8000, "triton+grpc": 8001, "openai": 8000, "openai+http": 8000,
                 "openai+https": 443}
SCHEMES = tuple(DEFAULT_PORTS)


def is_llm_teacher(spec: str) -> bool:
    return spec.split("://", 1)[0] in SCHEMES


@dataclass
class TeacherURL:
    """A teacher URL taken apart and checked: a malformed one is a UserError that says what is wrong."""
    scheme: str
    host: str
    port: int
    path: str
    query: dict[str, list[str]]

    @classmethod
    def parse(cls, spec: str) -> "TeacherURL":
        if any(c.isspace() for c in spec):   # urlsplit would drop tabs and line breaks without a word
            raise UserError(Option("teacher", spec, quoted=True), ": a URL has no spaces, tabs or line breaks")
        try:
            parts = urlsplit(spec)
        except ValueError as e:    # an unclosed IPv6 bracket, a host that Unicode normalization changes
            raise UserError(Option("teacher", spec), f": {e}") from None
        if parts.scheme not in SCHEMES:
            raise UserError(Option("teacher", spec), f": unknown scheme {parts.scheme!r}")
        if not parts.hostname:
            raise UserError(Option("teacher", spec), f": no host (expected {_EXPECTED[parts.scheme.split('+')[0]]})")
        host, port = parse_address(parts.netloc.rpartition("@")[2], Option("teacher", spec),
                                   default_port=DEFAULT_PORTS[parts.scheme])
        url = cls(parts.scheme, host, port, parts.path, parse_qs(parts.query))
        if url.is_triton and (not url.model or "/" in url.model):
            raise UserError(Option("teacher", spec), f": expected {_EXPECTED['triton']}")
        if not url.is_triton and not url.model:
            raise UserError(Option("teacher", spec), f": expected {_EXPECTED['openai']}")
        known = ("structured",) if url.is_triton else ("model", "key_env", "structured")
        unknown = [k for k in url.query if k not in known]
        if unknown:     # a typo (key-env=) would otherwise fall back to a default without a word
            raise UserError(Option("teacher", spec), f": unknown parameter {unknown[0]!r} (it takes "
                            f"{', '.join(known)})")
        if any(v not in ("on", "off") for v in url.query.get("structured", [])):
            raise UserError(Option("teacher", spec), ": structured= takes on or off")
        return url

    @property
    def is_triton(self) -> bool:
        return self.scheme.startswith("triton")

    @property
    def address(self) -> str:
        return f"{url_host(self.host)}:{self.port}"

    @property
    def structured(self) -> bool:
        """`&structured=off` turns structured answers off (on by default)."""
        return self.query.get("structured", ["on"])[-1] != "off"

    @property
    def model(self) -> str:
        if self.is_triton:
            return self.path.strip("/")
        return self.query.get("model", [""])[0]


_EXPECTED = {"triton": "triton://HOST:PORT/MODEL", "openai": "openai://HOST:PORT/v1?model=NAME"}


def public_url(spec: str) -> str:
    """The teacher URL as it may be shown and recorded: without user info."""
    TeacherURL.parse(spec)
    parts = urlsplit(spec)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def make_transport(spec: str):
    url = TeacherURL.parse(spec)
    if url.is_triton:
        return TritonTransport(url.address, url.model, grpc=url.scheme == "triton+grpc")
    scheme = "https" if url.scheme == "openai+https" else "http"
    base = f"{scheme}://{url.address}{url.path.rstrip('/')}"
    return OpenAITransport(base, url.model, key_env=url.query.get("key_env", ["OPENAI_API_KEY"])[0])


# The key of vLLM's SamplingParams that takes a JSON schema, as Triton's vLLM backend reads the
# `sampling_parameters` input: `structured_outputs` from release r25.11 on (`guided_decoding` in r25.01 to
# r25.10); its value is itself a JSON string. docs/real-llms.md says what else that backend needs.
VLLM_GUIDED_KEY = "structured_outputs"


class TritonTransport:
    def __init__(self, address: str, model: str, grpc: bool = False):
        self.address, self.model, self.grpc = address, model, grpc
        self.name = f"triton{'+grpc' if grpc else ''}://{address}/{model}"
        self._client = None
        self._inputs: set[str] | None = None
        self._outputs: set[str] | None = None

    def _module(self):
        if self.grpc:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        return module

    async def open(self) -> None:
        self._client = self._module().InferenceServerClient(self.address)
        if self._inputs is None:  # what the model takes and reports, asked once
            try:
                meta = (await self._client.get_model_metadata(self.model, as_json=True) if self.grpc
                        else await self._client.get_model_metadata(self.model))
            except Exception as e:
                raise _triton_error(e) from None
            self._inputs = {i["name"] for i in meta.get("inputs", [])}
            self._outputs = {o["name"] for o in meta.get("outputs", [])}
            if "text_input" not in self._inputs or "text_output" not in self._outputs:
                raise TransportError("incompatible_model", f"{self.name}: the model does not take text_input and "
                                     "return text_output (Triton's text-in / text-out LLM convention)", False)

    async def reach(self) -> None:
        """The server answers and serves a model of the text-in / text-out convention."""
        self._inputs = None
        await self.open()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def takes_schema(self) -> bool | None:
        """Whether the model takes a JSON schema for its answer (None: not asked yet)."""
        if self._inputs is None:
            return None
        return "sampling_parameters" in self._inputs or "guided_decoding_guide" in self._inputs

    async def complete(self, prompt: str, max_tokens: int, temperature: float, schema: dict | None = None) -> Completion:
        import tritonclient.grpc as grpc_types
        import tritonclient.http as http_types
        types = grpc_types if self.grpc else http_types

        def tensor(name: str, value, datatype: str):
            t = types.InferInput(name, [1, 1], datatype)
            t.set_data_from_numpy(value)
            return t
        inputs = [tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES")]
        if "max_tokens" in self._inputs:
            inputs.append(tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"))
        if "temperature" in self._inputs:
            inputs.append(tensor("temperature", np.array([[temperature]], dtype=np.float32), "FP32"))
        if "sampling_parameters" in self._inputs:   # Triton's vLLM backend: vLLM's SamplingParams, as JSON
            parameters = {"max_tokens": max_tokens, "temperature": temperature}
            if schema is not None:
                parameters[VLLM_GUIDED_KEY] = json.dumps({"json": schema})
            inputs.append(tensor("sampling_parameters", np.array([[json.dumps(parameters).encode()]], dtype=object),
                                 "BYTES"))
        if schema is not None and "guided_decoding_guide" in self._inputs:   # TensorRT-LLM's backend
            inputs.append(tensor("guided_decoding_guide_type", np.array([[b"json_schema"]], dtype=object), "BYTES"))
            inputs.append(tensor("guided_decoding_guide", np.array([[json.dumps(schema).encode()]], dtype=object),
                                 "BYTES"))
        wanted = [n for n in ("text_output", "prompt_tokens", "completion_tokens", "served_by") if n in self._outputs]
        outputs = [types.InferRequestedOutput(n) for n in wanted]
        try:
            result = await self._client.infer(self.model, inputs, outputs=outputs)
        except Exception as e:
            raise _triton_error(e) from None

        def first(name: str):
            value = result.as_numpy(name) if name in wanted else None
            return None if value is None else value.reshape(-1)[0]
        text = first("text_output")
        tokens = [first(n) for n in ("prompt_tokens", "completion_tokens")]
        served_by = first("served_by")
        return Completion(text=_text(text), prompt_tokens=None if tokens[0] is None else int(tokens[0]),
                          completion_tokens=None if tokens[1] is None else int(tokens[1]),
                          served_by=None if served_by is None else _text(served_by))


def refuses_schema(text: str) -> bool:
    """A 400's (TGI: 422's) body names the structured-answer request (`response_format`, `json_schema`)."""
    lowered = text.lower()
    return "response_format" in lowered or "json_schema" in lowered


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _triton_error(e: Exception) -> TransportError:
    from tritonclient.utils import InferenceServerException
    if isinstance(e, InferenceServerException):
        status = str(e.status() or "")
        message = str(e.message() or e)
        if any(s in status for s in ("UNAVAILABLE", "DEADLINE", "INTERNAL", "UNKNOWN", "RESOURCE")) or \
                status.startswith("5") or (not status and "connect" in message.lower()):
            return TransportError("server_error" if "INTERNAL" in status or status.startswith("5") else "transport",
                                  f"{status} {message}".strip(), transient=True)
        return TransportError("rejected_request", f"{status} {message}".strip(), transient=False)
    return TransportError("transport", f"{type(e).__name__}: {e}", transient=True)  # connection refused, reset...


class OpenAITransport:
    def __init__(self, base_url: str, model: str, key_env: str = "OPENAI_API_KEY"):
        self.base_url, self.model, self.key_env = base_url, model, key_env
        self.name = f"openai {base_url} model {model}"
        self._session = None

    async def open(self) -> None:
        import aiohttp
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.key_env):
            headers["Authorization"] = f"Bearer {key}"
        self._session = aiohttp.ClientSession(headers=headers)

    async def reach(self) -> None:
        """The server answers (`GET /models`, which OpenAI-compatible servers serve) and accepts the
        key; where it lists its models, the one asked for is among them."""
        import aiohttp
        await self.open()
        try:
            async with self._session.get(f"{self.base_url}/models") as response:
                text = await response.text()
        except aiohttp.ClientError as e:
            raise TransportError("transport", f"{type(e).__name__}: {e}", transient=True) from None
        if response.status in (401, 403):
            raise TransportError("rejected_request", f"HTTP {response.status}: the server refused the key in "
                                 f"{self.key_env}", transient=False)
        if response.status >= 500:
            raise TransportError("server_error", f"HTTP {response.status}: {text[:200]}", transient=True)
        if response.status != 200:     # a server without the list (404, 405): is its chat endpoint there?
            await self._chat_endpoint_answers()
            return
        try:
            served = [m["id"] for m in json.loads(text)["data"]]
        except (ValueError, KeyError, TypeError):     # a 200 that is no list of models (a metrics page)
            await self._chat_endpoint_answers()
            return
        if served and self.model not in served:
            raise TransportError("rejected_request", f"model {self.model!r} is not served there (it serves "
                                 f"{', '.join(served[:10])})", transient=False)

    async def _chat_endpoint_answers(self) -> None:
        """An empty request costs nothing (an OpenAI-compatible server refuses it as invalid: 400, 422); a
        404 or 405 means no such endpoint: a URL of another server (a Triton server's port) or a wrong path."""
        import aiohttp
        try:
            async with self._session.post(f"{self.base_url}/chat/completions", json={}) as response:
                await response.read()
        except aiohttp.ClientError as e:
            raise TransportError("transport", f"{type(e).__name__}: {e}", transient=True) from None
        if response.status in (404, 405):    # no such endpoint, or one that takes no POST
            raise TransportError("rejected_request", f"HTTP {response.status} at {self.base_url}/chat/completions: "
                                 "no OpenAI-compatible API there", transient=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    takes_schema = True

    def body(self, prompt: str, max_tokens: int, temperature: float, schema: dict | None = None) -> dict:
        """The chat-completions request (tests/teachers check it against the OpenAI API's own types)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature}
        if schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "pgkd_" + next(iter(schema["properties"])),
                                                       "strict": True, "schema": schema}}
        return body

    async def complete(self, prompt: str, max_tokens: int, temperature: float, schema: dict | None = None) -> Completion:
        import aiohttp
        body = self.body(prompt, max_tokens, temperature, schema)
        try:
            async with self._session.post(f"{self.base_url}/chat/completions", json=body) as response:
                text = await response.text()
                if response.status >= 500 or response.status == 429:
                    raise TransportError("rate_limited" if response.status == 429 else "server_error",
                                         f"HTTP {response.status}: {text[:200]}", transient=True)
                if response.status in (400, 422) and schema is not None and refuses_schema(text):   # 422: TGI
                    raise TransportError("structured_refused", f"HTTP {response.status}: {text[:200]}",
                                         transient=False)
                if response.status >= 400:
                    raise TransportError("rejected_request", f"HTTP {response.status}: {text[:200]}", transient=False)
        except aiohttp.ClientError as e:
            raise TransportError("transport", f"{type(e).__name__}: {e}", transient=True) from None
        try:
            data = json.loads(text)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TransportError("server_error", f"not a chat completion: {text[:200]}", transient=True) from None
        usage = data.get("usage") or {}
        return Completion(text=content or "", prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"))
