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
    ("sleep", seconds, content). Records every request and the most calls seen in flight."""

    def __init__(self):
        self.ready = threading.Event()
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.model_list: list[str] | int | None = None
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
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.model_list]})

    async def handle(self, request):
        body = await request.json()
        self.requests.append({"body": body, "authorization": request.headers.get("Authorization")})
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
