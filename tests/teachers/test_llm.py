"""The LLM teacher against a real local HTTP server that speaks OpenAI's chat-completions format:
answers, usage and cost, concurrency, retries, repair, timeouts, the circuit breaker, the cache."""
import json
import time

import pytest
from chat_server import ChatServer, answer
from pgkd.teachers.answers import AnswerError, parse_answer
from pgkd.artifacts import ArtifactStore
from pgkd.types import GenerationRequest, Sample, TeacherUnavailable
from pgkd.teachers.llm import LLMSettings, LLMTeacher, ResponseCache

TAXONOMY = ["card_lost", "refund"]


@pytest.fixture
def chat():
    return ChatServer()


def request(n: int) -> GenerationRequest:
    return GenerationRequest(taxonomy=TAXONOMY, examples=[Sample(text="i lost my card", label="card_lost")],
                             report=None, hard_negatives=[], misclassified=[], correct=[], n=n, cycle=1)


def teacher(url: str, **settings) -> LLMTeacher:
    options = dict(backoff=0.01, timeout=5.0) | settings
    return LLMTeacher(url, LLMSettings(**options), count_tokens=lambda text: len(text.split()))


def test_answers_usage_cost_and_the_key_stays_a_secret(chat, monkeypatch):
    monkeypatch.setenv("PGKD_TEST_KEY", "sk-secret-123")
    chat.script = [("ok", "Here you go:\n```json\n" + answer(4) + "\n```\nGood luck!")]
    t = teacher(chat.url, price_prompt_per_1k=0.5, price_completion_per_1k=2.0)
    batch = t.generate(request(4))
    assert [s.label for s in batch.samples] == ["refund"] * 4 and batch.rejected == {}
    assert (batch.usage.calls, batch.usage.prompt_tokens, batch.usage.completion_tokens) == (1, 1000, 200)
    assert batch.usage.cost == pytest.approx(1000 / 1000 * 0.5 + 200 / 1000 * 2.0)
    sent = chat.requests[0]
    assert sent["authorization"] == "Bearer sk-secret-123" and sent["body"]["model"] == "test-llm"
    assert "a list of exactly 4 samples" in sent["body"]["messages"][0]["content"]
    assert "sk-secret" not in json.dumps(t.describe()) and t.describe()["simulated"] is False


def test_a_large_request_is_split_into_concurrent_calls(chat):
    chat.script = [("sleep", 0.3, answer(10, start=10 * i)) for i in range(4)]
    batch = teacher(chat.url, max_per_call=10, concurrency=4).generate(request(35))
    assert len(chat.requests) == 4 and chat.most_in_flight >= 2
    asked = sorted(int(r["body"]["messages"][0]["content"].split("exactly ")[1].split()[0]) for r in chat.requests)
    assert asked == [5, 10, 10, 10] and len(batch.samples) == 40 and batch.usage.calls == 4
    assert all("part" in r["body"]["messages"][0]["content"] for r in chat.requests)


def test_server_errors_are_retried_with_backoff(chat):
    chat.script = [("status", 500), ("status", 503), ("ok", answer(2))]
    batch = teacher(chat.url, retries=3).generate(request(2))
    assert len(batch.samples) == 2 and batch.usage.retries == 2
    assert batch.usage.errors == {"server_error": 2} and len(chat.requests) == 3


def test_a_broken_answer_gets_one_repair_request(chat):
    chat.script = [("ok", "Sure! [{'text': 'single quotes are not JSON'}"), ("ok", answer(2))]
    batch = teacher(chat.url).generate(request(2))
    assert len(batch.samples) == 2 and batch.rejected == {"unparseable_answer": 1} and batch.usage.calls == 2
    repair = chat.requests[1]["body"]["messages"][0]["content"]
    # The prompt again and the repair words, not the broken answer: it fits where the prompt fit.
    assert repair.startswith(chat.requests[0]["body"]["messages"][0]["content"])
    assert "could not be used" in repair and "single quotes are not JSON" not in repair


def test_an_answer_that_stays_broken_yields_no_samples_and_says_why(chat):
    chat.script = [("ok", "I would rather not."), ("ok", "Still no.")]
    batch = teacher(chat.url).generate(request(2))
    assert batch.samples == [] and batch.rejected == {"unparseable_answer": 2}


def test_timeouts_open_the_circuit_and_the_teacher_fails_fast(chat):
    chat.script = [("sleep", 3, answer(2))] * 10
    t = teacher(chat.url, timeout=0.3, retries=1, breaker_threshold=1)
    started = time.monotonic()
    with pytest.raises(TeacherUnavailable, match="timeout"):
        t.generate(request(2))
    assert time.monotonic() - started < 2.5 and len(chat.requests) == 2
    started = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=r"1 call\(s\) failed in a row"):
        t.generate(request(2))                      # open: no call at all
    assert time.monotonic() - started < 1.0 and len(chat.requests) == 2      # open: at once, not after a timeout


def test_a_client_error_is_not_retried(chat):
    chat.script = [("status", 400)]
    with pytest.raises(TeacherUnavailable, match="refused the request: HTTP 400"):
        teacher(chat.url, retries=3).generate(request(2))
    assert len(chat.requests) == 1


def test_a_repeated_request_is_answered_from_the_cache(chat, tmp_path):
    cache = ResponseCache(ArtifactStore(f"file://{tmp_path}/cache"))
    first = teacher(chat.url)
    first.cache = cache
    original = first.generate(request(2))
    second = teacher(chat.url)
    second.cache = cache
    again = second.generate(request(2))
    assert again.samples == original.samples and again.usage.cache_hits == 1 and again.usage.calls == 0
    assert len(chat.requests) == 1


def test_answers_are_found_inside_chatter_and_fences():
    assert len(parse_answer('{"samples": [{"text": "a b c", "label": "x"}]}').samples) == 1
    parsed = parse_answer('Notes [1, 2] then ```\n[{"text": "a b c", "label": "x"}, {"label": "y"}, "z"]\n```')
    assert [s.text for s in parsed.samples] == ["a b c"] and parsed.dropped == {"malformed_sample": 2}
    with pytest.raises(AnswerError, match="begins: 'no json here'"):
        parse_answer("no json here")


def test_an_openai_teacher_runs_the_loop_and_records_usage(chat, toy_data, tmp_path):
    from pgkd.loop.config import DistillConfig
    from pgkd.loop.embedded import run
    chat.script = [("ok", answer(8, label="refund")), ("ok", json.dumps([{"text": "x y z w", "label": "pizza"}] * 3))]
    config = DistillConfig(data=str(toy_data), labeled=40, student="tiny", teacher=chat.url, samples_per_cycle=8,
                           max_cycles=2, epochs=2, cycle_epochs=1, learning_rate=1e-2, head_learning_rate=1e-2,
                           batch_size=16, teacher_cache="none", price_prompt_per_1k=1.0)
    report = run(config, tmp_path / "run", progress=False).report
    first, second = report.cycles[1], report.cycles[2]
    assert (first.generated, first.accepted) == (8, 8)
    assert second.accepted == 0 and second.rejected == {"unknown_label": 3}
    assert report.teacher_usage.calls == 2 and report.teacher_usage.cost == pytest.approx(2.0)
    assert report.stop_reason.startswith("max_cycles")


def test_check_reaches_the_server_before_any_call_and_says_what_is_wrong(chat):
    teacher(chat.url).check()                      # no /models list (404): the server answered
    chat.model_list = ["test-llm", "other"]
    teacher(chat.url).check()
    chat.model_list = ["other"]
    with pytest.raises(TeacherUnavailable, match="model 'test-llm' is not served there"):
        teacher(chat.url).check()
    chat.model_list = 401
    with pytest.raises(TeacherUnavailable, match="refused the key in PGKD_TEST_KEY"):
        teacher(chat.url).check()
    chat.model_list = None
    wrong = chat.url.replace("/v1?", "/v2?")      # a wrong path, as a Triton server's port is: 404 everywhere
    with pytest.raises(TeacherUnavailable, match=r"HTTP 404 at http://127.0.0.1:\d+/v2/chat/completions: no "
                                                 "OpenAI-compatible API there"):
        teacher(wrong).check()
    chat.model_list, chat.chat_status = "metrics", 405     # a Triton server's metrics port, as a reviewer tried
    with pytest.raises(TeacherUnavailable, match="HTTP 405 at .*: no OpenAI-compatible API there"):
        teacher(chat.url).check()
    assert chat.requests == []                    # reaching it asked for no completion


def test_an_unreachable_openai_teacher_stops_the_run_before_any_training(toy_data, tmp_path, capsys):
    """As a Triton teacher does: one error line, exit 1 (the environment's failure), nothing written (it used
    to train cycle 0)."""
    from pgkd.net import free_port
    from pgkd.cli import main
    out = tmp_path / "run"
    assert main(["distill", "--data", str(toy_data), "--out", str(out), "--labeled", "40", "--student", "tiny",
                 "--teacher", f"openai://127.0.0.1:{free_port()}/v1?model=x", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cycle 0" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pgkd: teacher openai://127.0.0.1:")
    assert "cannot reach it (transport: ClientConnectorError" in err
    assert not out.exists()
