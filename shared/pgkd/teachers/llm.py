"""The LLM teacher: the PGKD prompt to a real LLM (Triton or OpenAI-compatible), samples back.

One `generate` call:
1. splits the request into calls of at most `max_per_call` samples (one answer holds only so much)
   and sends them concurrently (asyncio, at most `concurrency` in flight);
2. answers a call from the response cache when the same prompt was answered before (a run resumed
   after a crash does not pay the teacher twice);
3. retries transient failures (timeouts, connection errors, 5xx) with exponential backoff, at most
   `retries` times; a circuit breaker opens after `breaker_threshold` calls failed in a row, and then
   `generate` raises TeacherUnavailable at once instead of hanging on a teacher that is down;
4. asks for a structured answer (the answer's JSON schema: pgkd.teachers.prompt) where the server
   takes one; a server that refuses it (HTTP 400 naming `response_format`) is asked once more without,
   and for the rest of the run (`structured` in describe() says so; `&structured=off` in the URL);
5. keeps each prompt within `max_prompt_tokens` (prompt.fit), recording what it left out per call;
6. parses each answer tolerantly (answers.py); a broken answer gets one repair request;
7. counts usage (calls, tokens from the server or else a tokenizer, latency, cost) and every
   dropped answer or list item by reason.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass

from pgkd.teachers.answers import AnswerError, parse_answer, parse_labels
from pgkd.types import (ClassificationRequest, GeneratedBatch, GenerationRequest, Sample, TeacherUnavailable,
                        TeacherUsage)
from pgkd.teachers.transports import Completion, TeacherURL, TransportError, make_transport, public_url
from pgkd.teachers.prompt import REPAIR_TOKENS, Prompt, PromptTooLong, fit, render_classification, repair_prompt

log = logging.getLogger("pgkd.teachers")


@dataclass
class LLMSettings:
    timeout: float = 120.0             # seconds per call
    retries: int = 3                   # per call, on transient failures
    backoff: float = 1.0               # seconds before the first retry; doubles each time
    concurrency: int = 4
    max_per_call: int = 32             # samples asked for in one call
    max_tokens: int = 4096
    max_prompt_tokens: int | None = 8000   # longer prompts are trimmed (prompt.fit); None: never
    temperature: float = 0.7
    breaker_threshold: int = 2         # calls failed in a row (each after its retries) that open the circuit
    breaker_cooldown: float = 60.0     # seconds the circuit stays open before one call may try again
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0


CHECK_TIMEOUT = 10.0    # seconds one attempt to reach the teacher before a run may take
CHECK_ATTEMPTS = 2


class ResponseCache:
    """Answers by request hash, in an artifact store (a folder or a bucket)."""

    def __init__(self, store, prefix: str = "teacher-cache"):
        self.store, self.prefix = store, prefix

    def _key(self, digest: str) -> str:
        return f"{self.prefix}/{digest[:2]}/{digest}.json"

    def get(self, digest: str) -> dict | None:
        key = self._key(digest)
        return self.store.get_json(key) if self.store.exists(key) else None

    def put(self, digest: str, value: dict) -> None:
        self.store.put_json(self._key(digest), value)


class CircuitBreaker:
    def __init__(self, threshold: int, cooldown: float):
        self.threshold, self.cooldown = threshold, cooldown
        self.failures_in_a_row = 0
        self.open_until = 0.0
        self.last_error = ""

    def check(self, teacher: str) -> None:
        if self.failures_in_a_row >= self.threshold and time.monotonic() < self.open_until:
            raise TeacherUnavailable(f"teacher {teacher} unavailable: {self.failures_in_a_row} call(s) failed in a "
                                     f"row (last: {self.last_error})")

    def failed(self, error: str) -> None:
        self.failures_in_a_row += 1
        self.last_error = error
        if self.failures_in_a_row >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown

    def succeeded(self) -> None:
        self.failures_in_a_row = 0


class LLMTeacher:
    simulated = False

    def __init__(self, spec: str, settings: LLMSettings | None = None, cache: ResponseCache | None = None,
                 count_tokens=None, seed: int = 0):
        self.spec = spec
        self.name = public_url(spec)
        self.settings = settings or LLMSettings()
        self.transport = make_transport(spec)
        self.cache = cache
        self.count_tokens = count_tokens or default_token_counter()
        self.breaker = CircuitBreaker(self.settings.breaker_threshold, self.settings.breaker_cooldown)
        self.rng = random.Random(seed)   # only for backoff jitter
        self.served_by: dict | None = None
        self.structured = TeacherURL.parse(spec).structured   # ask for a structured (JSON schema) answer
        self.structured_refused: str | None = None              # why the server refused one, once it did

    def describe(self) -> dict:
        s = self.settings
        served = self.served_by or {}
        return {"name": self.name, "simulated": bool(served.get("simulated", False)),
                **({"served_model": served} if served else {}), "transport": type(self.transport).__name__,
                "max_per_call": s.max_per_call, "max_tokens": s.max_tokens, "temperature": s.temperature,
                "timeout": s.timeout, "retries": s.retries, "concurrency": s.concurrency,
                "max_prompt_tokens": s.max_prompt_tokens, "structured": self.structured_answers(),
                "price_per_1k_tokens": {"prompt": s.price_prompt_per_1k, "completion": s.price_completion_per_1k},
                "tokens_counted_by": "the server where it reports them, else "
                + getattr(self.count_tokens, "name", "a token counter")}

    def structured_answers(self) -> str:
        if not self.structured:
            return "off (structured=off in the URL): the answer format is asked for in the prompt only"
        if getattr(self.transport, "takes_schema", True) is False:
            return ("not taken by the model (no sampling_parameters or guided_decoding_guide input): the answer "
                    "format is asked for in the prompt only")
        if self.structured_refused:
            return (f"refused by the server ({self.structured_refused}): the answer format is asked for in the "
                    "prompt only, for the rest of the run")
        return "json_schema: the answer must follow the JSON schema of its samples (labels: the taxonomy)"

    def state(self) -> dict:  # what carries over between requests: a server's refusal of structured answers
        return {"structured_refused": self.structured_refused} if self.structured_refused else {}

    def load_state(self, state: dict) -> None:
        self.structured_refused = (state or {}).get("structured_refused")

    def prompt(self, request: GenerationRequest, note: str = "") -> Prompt:
        """The prompt sent for `request`, trimmed to `max_prompt_tokens`; PromptTooLong when even the
        smallest does not fit (a run checks this before any training: pgkd.loop.dryrun)."""
        return fit(request, self.settings.max_prompt_tokens, self.count_tokens, note, reserve=REPAIR_TOKENS)

    # -- one generation request -----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GeneratedBatch:
        self.breaker.check(self.name)
        return asyncio.run(self._generate(request))

    def classify(self, request: ClassificationRequest) -> tuple[list[str | None], TeacherUsage]:
        """The teacher's label for each text (the classification prompt, with its answer's schema where
        the server takes one): None where its answer held no label of the taxonomy for that text."""
        self.breaker.check(self.name)

        async def ask():
            usage = TeacherUsage()
            await self._open()
            try:
                prompt = render_classification(request)
                completion = await self._call(prompt.text, usage, prompt.schema)
            finally:
                await self.transport.close()
            try:
                return parse_labels(completion.text, request.taxonomy, len(request.texts)), usage
            except AnswerError:
                usage.errors = {**usage.errors, "unparseable_answer": 1}
                return [None] * len(request.texts), usage
        return asyncio.run(ask())

    def check(self) -> None:
        """Reach the teacher once, before a run spends minutes training its first student, so that a
        wrong URL, a server that is down or one that never answers is found at once. Each attempt is
        bounded by `check_timeout`, not by the (long) per-call timeout."""
        limit = self.check_timeout

        async def reach():
            try:
                await asyncio.wait_for(self.transport.reach(), limit)
            finally:
                await self.transport.close()
        for attempt in range(CHECK_ATTEMPTS):
            try:
                asyncio.run(reach())
                return
            except (TransportError, asyncio.TimeoutError) as e:
                reason = (f"no answer within {limit:g} s" if isinstance(e, asyncio.TimeoutError)
                          else f"{e.kind}: {e}")
                refused = isinstance(e, TransportError) and not e.transient
                if refused or attempt == CHECK_ATTEMPTS - 1:
                    raise TeacherUnavailable(f"teacher {self.name}: cannot reach it ({reason}"
                                             f"{'' if attempt == 0 else f'; {attempt + 1} attempts'})",
                                             refused=refused) from None
                time.sleep(self.settings.backoff)

    @property
    def check_timeout(self) -> float:
        return min(self.settings.timeout, CHECK_TIMEOUT)

    async def _open(self) -> None:
        for attempt in range(self.settings.retries + 1):
            try:
                await asyncio.wait_for(self.transport.open(), self.settings.timeout)
                return
            except (TransportError, asyncio.TimeoutError) as e:
                await self.transport.close()
                transient = not isinstance(e, TransportError) or e.transient
                reason = str(e) or f"no answer within {self.settings.timeout:g} s"
                if not transient or attempt == self.settings.retries:
                    self.breaker.failed(reason)
                    raise TeacherUnavailable(f"teacher {self.name}: cannot reach it ({reason})") from None
                await asyncio.sleep(self.settings.backoff * 2 ** attempt * (0.5 + self.rng.random()))

    async def _generate(self, request: GenerationRequest) -> GeneratedBatch:
        per_call = self.settings.max_per_call
        sizes = [min(per_call, request.n - i) for i in range(0, request.n, per_call)]
        notes = part_notes(request.n, per_call)
        try:
            prompts = [self.prompt(request.model_copy(update={"n": size}), note) for size, note in zip(sizes, notes)]
        except PromptTooLong as e:
            raise TeacherUnavailable(f"teacher {self.name}: {e}") from None
        usage, dropped = TeacherUsage(), Counter()
        limit = asyncio.Semaphore(self.settings.concurrency)
        await self._open()
        try:
            async def one(prompt: str):
                async with limit:
                    return await self._answer(prompt, request.cycle)
            results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
        finally:
            await self.transport.close()
        samples: list[Sample] = []
        unavailable = None
        for result in results:
            if isinstance(result, TeacherUnavailable):
                unavailable = result
                continue
            if isinstance(result, BaseException):
                raise result
            part_samples, part_usage, part_dropped = result
            samples += part_samples
            usage, dropped = usage + part_usage, dropped + part_dropped
        if unavailable is not None and not samples:
            raise unavailable
        return GeneratedBatch(samples=samples, teacher=self.name, usage=usage, rejected=dict(dropped))

    async def _answer(self, prompt: Prompt, cycle: int) -> tuple[list[Sample], TeacherUsage, Counter]:
        """One part: ask (from the cache if answered before), parse, and ask once more if broken."""
        usage, dropped = TeacherUsage(), Counter()
        usage.trimmed = [prompt.trimmed]
        completion = await self._call(prompt.text, usage, prompt.schema)
        try:
            parsed = parse_answer(completion.text)
        except AnswerError:
            dropped["unparseable_answer"] += 1
            completion = await self._call(f"{prompt.text}\n{repair_prompt()}", usage, prompt.schema)
            try:
                parsed = parse_answer(completion.text)
            except AnswerError:
                dropped["unparseable_answer"] += 1
                return [], usage, dropped
        dropped.update(parsed.dropped)
        return parsed.samples, usage, dropped

    async def _call(self, prompt: str, usage: TeacherUsage, schema: dict | None = None) -> Completion:
        s = self.settings
        schema = schema if self.structured and not self.structured_refused else None
        digest = hashlib.sha256(json.dumps([self.name, prompt, s.max_tokens, s.temperature, schema],
                                           sort_keys=True).encode()).hexdigest()
        if self.cache is not None and (hit := await asyncio.to_thread(self.cache.get, digest)) is not None:
            usage.cache_hits += 1
            return Completion(**hit)
        self.breaker.check(self.name)
        for attempt in range(s.retries + 1):
            started = time.perf_counter()
            try:
                completion = await asyncio.wait_for(
                    self.transport.complete(prompt, s.max_tokens, s.temperature, schema), s.timeout)
            except (TransportError, asyncio.TimeoutError) as e:
                error = e if isinstance(e, TransportError) else TransportError(
                    "timeout", f"no answer within {s.timeout:g} s", transient=True)
                usage.seconds += time.perf_counter() - started
                if error.kind == "structured_refused" and schema is not None:
                    if not self.structured_refused:
                        self.structured_refused = str(error)
                        log.warning("teacher %s refused structured answers (%s): asking for the answer format in "
                                    "the prompt only, for the rest of the run", self.name, error)
                    usage.errors = {**usage.errors, error.kind: usage.errors.get(error.kind, 0) + 1}
                    return await self._call(prompt, usage)
                usage.errors = {**usage.errors, error.kind: usage.errors.get(error.kind, 0) + 1}
                if not error.transient:
                    self.breaker.failed(f"{error.kind}: {error}")
                    raise TeacherUnavailable(f"teacher {self.name} refused the request: {error}") from None
                if attempt == s.retries:
                    self.breaker.failed(f"{error.kind}: {error}")
                    raise TeacherUnavailable(f"teacher {self.name}: {s.retries + 1} attempts failed "
                                             f"(last: {error.kind}: {error})") from None
                usage.retries += 1
                await asyncio.sleep(s.backoff * 2 ** attempt * (0.5 + self.rng.random()))
                continue
            self.breaker.succeeded()
            if completion.served_by and self.served_by is None:
                try:
                    self.served_by = json.loads(completion.served_by)
                except ValueError:
                    self.served_by = {"description": completion.served_by}
                if isinstance(self.served_by, dict) and self.served_by.get("simulated"):   # said once, at once
                    log.warning("the teacher at %s is a simulation, not an LLM (%s)", self.name,
                                self.served_by.get("name") or self.served_by.get("served_by") or "it says so")
            self._account(usage, prompt, completion, time.perf_counter() - started)
            if self.cache is not None:
                await asyncio.to_thread(self.cache.put, digest, completion.__dict__)
            return completion
        raise AssertionError("unreachable")

    def _account(self, usage: TeacherUsage, prompt: str, completion: Completion, seconds: float) -> None:
        if completion.prompt_tokens is None:
            completion.prompt_tokens = self.count_tokens(prompt)
        if completion.completion_tokens is None:
            completion.completion_tokens = self.count_tokens(completion.text)
        s = self.settings
        usage.calls += 1
        usage.seconds += seconds
        usage.call_seconds = usage.call_seconds + [round(seconds, 6)]
        usage.prompt_tokens += completion.prompt_tokens
        usage.completion_tokens += completion.completion_tokens
        usage.cost += (completion.prompt_tokens * s.price_prompt_per_1k
                       + completion.completion_tokens * s.price_completion_per_1k) / 1000


def part_notes(n: int, per_call: int) -> list[str]:
    """A request for n samples goes in parts of at most per_call; identical prompts would get alike
    answers, so each part's prompt says which part it is ("" for a request in one part)."""
    parts = math.ceil(n / per_call)
    return [f"(This is part {i + 1} of {parts} of the request: write texts unlike those you would write for the "
            "other parts.)" if parts > 1 else "" for i in range(parts)]


class TokenCounter:
    """Counts tokens with a Hugging Face tokenizer when the server does not report them: an estimate
    for another model's tokenizer, exact for the same one. A piece the tokenizer does not know ([UNK]:
    emoji, scripts outside its vocabulary) counts as one token per UTF-8 byte, as a byte-level tokenizer
    may count it at worst, so that the estimate does not fall far below the model's own count."""

    def __init__(self, path: str | None = None):
        self.path = path
        self._tokenizer = None
        from pathlib import Path
        self.name = f"the {Path(path).name if path else 'MiniLM (BERT WordPiece)'} tokenizer, unknown pieces by bytes"

    def __call__(self, text: str) -> int:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from pgkd.encoder import minilm_path
            self._tokenizer = AutoTokenizer.from_pretrained(self.path or str(minilm_path()),
                                                            local_files_only=True)
            self._tokenizer.model_max_length = 10**9   # it counts prompts; it does not cut them for a model
        encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown = self._tokenizer.unk_token_id
        return sum(len(text[a:b].encode("utf-8")) if token == unknown else 1
                   for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]))


def default_token_counter() -> TokenCounter:
    return TokenCounter()
