"""A real local HTTP server that speaks OpenAI's chat-completions format, for the LLM teacher's tests
(tests/teachers/test_llm.py) and the generator service's (tests/services/test_services_kafka.py)."""
import asyncio
import json
import threading

from aiohttp import web
from pgkd.net import free_port


def answer(n: int, label: str = "refund", start: int = 0) -> str:
    return json.dumps([{"text": f"please give my money back number {start + i}", "label": label} for i in range(n)])


class ChatServer:
    """Replies from a script of behaviours, one per request: ("ok", content), ("status", code),
    ("sleep", seconds, content). Records every request and the most calls seen in flight.

    As real servers do, it can also: refuse a structured-answer request (`refuse_schema`: the status,
    400 as vLLM's or llama.cpp's validation, 422 as TGI's, with a body naming `response_format`);
    answer one by its JSON schema when the script is empty (`follow_schema`: samples whose labels
    cycle through the schema's enum); and refuse a prompt longer than its context (`context_tokens`, as
    `count` counts them: whitespace-separated words unless a test gives a tokenizer)."""

    def __init__(self):
        self.ready = threading.Event()
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.model_list: list[str] | int | str | None = None
        self.chat_status: int | None = None
        self.refuse_schema: int | None = None
        self.follow_schema = False
        self.context_tokens: int | None = None
        self.count = lambda text: len(text.split())
        self.longest_prompt = 0     # in tokens (`count`), of the prompts it answered
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    async def models(self, request):
        """`GET /models`: 404 by default (servers without the list), else what `model_list` says."""
        if self.model_list is None:
            return web.Response(status=404)
        if isinstance(self.model_list, int):
            return web.Response(status=self.model_list)
        if self.model_list == "metrics":     # a 200 that is no list of models: Triton's metrics port
            return web.Response(text="# HELP nv_inference_count\n", content_type="text/plain")
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.model_list]})

    async def handle(self, request):
        if self.chat_status is not None:     # a server with no such endpoint (405: it takes no POST there)
            return web.Response(status=self.chat_status)
        body = await request.json()
        if "messages" not in body:   # refused as invalid, as OpenAI-compatible servers do (pgkd's check sends {})
            return web.json_response({"object": "error", "message": "messages: field required"}, status=400)
        self.requests.append({"body": body, "authorization": request.headers.get("Authorization")})
        if self.refuse_schema and "response_format" in body:
            return web.json_response({"object": "error", "message": "1 validation error: response_format: "
                                      "json_schema is not supported by this server", "code": self.refuse_schema},
                                     status=self.refuse_schema)
        tokens = self.count("\n".join(m["content"] for m in body["messages"]))
        if self.context_tokens is not None and tokens > self.context_tokens:
            return web.json_response({"object": "error", "message": f"This model's maximum context length is "
                                      f"{self.context_tokens} tokens. However, you requested {tokens} tokens."},
                                     status=400)
        self.longest_prompt = max(self.longest_prompt, tokens)
        if self.follow_schema and not self.script and "labels" in body.get("response_format", {}).get(
                "json_schema", {}).get("schema", {}).get("properties", {}):     # a classification: labels in turn
            labels = body["response_format"]["json_schema"]["schema"]["properties"]["labels"]
            enum = labels["items"]["enum"]
            self.script = [("ok", json.dumps({"labels": [enum[i % len(enum)] for i in range(labels["minItems"])]}))]
        if self.follow_schema and not self.script and "response_format" in body:
            schema = body["response_format"]["json_schema"]["schema"]["properties"]["samples"]
            labels, n = schema["items"]["properties"]["label"]["enum"], schema["minItems"]
            start = len(self.requests) * 100
            self.script = [("ok", json.dumps({"samples": [
                {"text": f"a new text about {labels[i % len(labels)]} number {start + i}", "label": labels[i % len(labels)]}
                for i in range(n)]}))]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            behaviour = self.script.pop(0) if self.script else ("ok", answer(2))
            if behaviour[0] == "status":
                return web.Response(status=behaviour[1], text="overloaded")
            if behaviour[0] == "sleep":
                await asyncio.sleep(behaviour[1])
            content = behaviour[-1]
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": content}}],
                                      "usage": {"prompt_tokens": 1000, "completion_tokens": 200}})
        finally:
            self.in_flight -= 1

    @property
    def url(self) -> str:
        return f"openai://127.0.0.1:{self.port}/v1?model=test-llm&key_env=PGKD_TEST_KEY"
