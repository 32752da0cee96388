"""Ready for a real LLM: structured answers (the JSON schema asked for, checked against the OpenAI API's
own published request types, a refusal remembered), and prompts that fit (trimmed in the stated order)."""
import json

import jsonschema
import pytest
from chat_server import ChatServer, answer
from pydantic import TypeAdapter

from pgkd.teachers.llm import LLMSettings, LLMTeacher
from pgkd.teachers.prompt import TRIM_ORDER, PromptTooLong, fit, labels_schema, render_classification, samples_schema
from pgkd.teachers.transports import OpenAITransport
from pgkd.types import (ClassificationRequest, ClassScores, EvalReport, GenerationRequest, MinedSample, Sample)

TAXONOMY = ["card_lost", "refund", "transfer"]


@pytest.fixture
def chat():
    return ChatServer()


def words(text: str) -> int:
    return len(text.split())


def teacher(url: str, **settings) -> LLMTeacher:
    return LLMTeacher(url, LLMSettings(**(dict(backoff=0.01, timeout=5.0) | settings)), count_tokens=words)


def request(n: int = 4, taxonomy=TAXONOMY, **fields) -> GenerationRequest:
    return GenerationRequest(taxonomy=taxonomy, examples=[Sample(text="i lost my card", label=taxonomy[0])],
                             report=None, hard_negatives=[], misclassified=[], correct=[], n=n, cycle=1, **fields)


# -- the request, as the OpenAI API publishes it -------------------------------------------------------------

def test_the_request_body_is_a_valid_openai_chat_completion_request():
    """Checked against the `openai` package's own request types (its TypedDicts, generated from the
    OpenAI API's OpenAPI document), not only against our test server."""
    from openai.types.chat import completion_create_params
    from openai.types.shared_params import ResponseFormatJSONSchema
    schema = samples_schema(TAXONOMY, 4)
    body = OpenAITransport("http://h/v1", "gpt-x").body("the prompt", 512, 0.7, schema)
    params = completion_create_params.CompletionCreateParamsNonStreaming
    assert set(body) <= set(params.__annotations__), set(body) - set(params.__annotations__)
    TypeAdapter(params).validate_python(body)                      # types of every field, nested messages too
    TypeAdapter(ResponseFormatJSONSchema).validate_python(body["response_format"])
    from openai.types.shared_params.response_format_json_schema import JSONSchema
    assert set(body["response_format"]["json_schema"]) <= set(JSONSchema.__annotations__)
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"strict": True}}}   # no name
    with pytest.raises(Exception):
        TypeAdapter(params).validate_python(bad)
    assert "response_format" not in OpenAITransport("http://h/v1", "m").body("p", 1, 0.0, None)


def test_the_answer_schema_meets_strict_mode_and_bounds_the_labels_and_the_count():
    schema = samples_schema(TAXONOMY, 3)
    jsonschema.Draft202012Validator.check_schema(schema)
    # OpenAI's strict mode: the root is an object, every property required, no additional properties.
    for node in (schema, schema["properties"]["samples"]["items"]):
        assert node["type"] == "object" and node["additionalProperties"] is False
        assert set(node["required"]) == set(node["properties"])
    good = {"samples": [{"text": f"t{i}", "label": "refund"} for i in range(3)]}
    jsonschema.validate(good, schema)
    for bad in ({"samples": good["samples"][:2]},                                          # too few
                {"samples": good["samples"] + [{"text": "x", "label": "refund"}]},        # too many
                {"samples": [{"text": "t", "label": "not_a_class"}] * 3},                 # outside the taxonomy
                {"samples": [{"text": "t", "label": "refund", "extra": 1}] * 3}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    labels = labels_schema(TAXONOMY, 2)
    jsonschema.validate({"labels": ["refund", "transfer"]}, labels)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"labels": ["refund", "nope"]}, labels)


# -- servers that honour, refuse, or turn it off -------------------------------------------------------------

def test_a_server_that_honours_response_format_gets_the_schema_and_its_answer_is_read(chat):
    chat.follow_schema = True
    t = teacher(chat.url)
    batch = t.generate(request(5))
    sent = chat.requests[0]["body"]
    assert sent["response_format"]["type"] == "json_schema" and sent["response_format"]["json_schema"]["strict"]
    item = sent["response_format"]["json_schema"]["schema"]["properties"]["samples"]
    assert item["items"]["properties"]["label"]["enum"] == TAXONOMY and item["minItems"] == item["maxItems"] == 5
    assert len(batch.samples) == 5 and {s.label for s in batch.samples} <= set(TAXONOMY)
    assert t.describe()["structured"].startswith("json_schema")


@pytest.mark.parametrize("status", [400, 422])    # 400: vLLM, llama.cpp's server; 422: TGI
def test_a_server_that_refuses_the_schema_is_asked_once_more_without_and_that_is_remembered(chat, status, caplog):
    chat.refuse_schema = status
    chat.script = [("ok", answer(2)), ("ok", answer(2, start=10))]
    t = teacher(chat.url)
    first = t.generate(request(2))
    assert len(first.samples) == 2 and first.usage.errors == {"structured_refused": 1}
    assert ["response_format" in r["body"] for r in chat.requests] == [True, False]
    second = t.generate(request(2))                                # remembered: not asked with the schema again
    assert len(second.samples) == 2 and second.usage.errors == {}
    assert ["response_format" in r["body"] for r in chat.requests] == [True, False, False]
    said = t.describe()["structured"]
    assert said.startswith("refused by the server") and f"HTTP {status}" in said
    assert "refused structured answers" in caplog.text
    restarted = teacher(chat.url)                                  # a restarted generator remembers it too
    restarted.load_state(t.state())
    restarted.generate(request(2))
    assert "response_format" not in chat.requests[-1]["body"]


def test_any_other_400_is_not_taken_for_a_refusal_of_the_schema(chat):
    chat.script = [("status", 400)]
    t = teacher(chat.url, retries=0)
    from pgkd.types import TeacherUnavailable
    with pytest.raises(TeacherUnavailable, match="refused the request"):
        t.generate(request(2))
    assert t.structured_refused is None and len(chat.requests) == 1


def test_structured_off_in_the_url_sends_no_schema(chat):
    t = teacher(chat.url + "&structured=off")
    t.generate(request(2))
    assert "response_format" not in chat.requests[0]["body"] and t.describe()["structured"].startswith("off")
    from pgkd.errors import UserError
    with pytest.raises(UserError, match="structured= takes on or off"):
        teacher(chat.url + "&structured=maybe")


def test_an_answer_that_breaks_the_schema_anyway_is_counted_by_reason(chat):
    """A server that says it follows the schema but does not: items without a label are dropped and
    counted, as a prompt-only answer's would be; a label outside the taxonomy is screened later."""
    chat.script = [("ok", json.dumps({"samples": [{"text": "a"}, {"text": "b", "label": "refund"}, 7]}))]
    batch = teacher(chat.url).generate(request(3))
    assert [s.text for s in batch.samples] == ["b"] and batch.rejected == {"malformed_sample": 2}


# -- a prompt that fits -----------------------------------------------------------------------------------

def big_request(classes: int = 500, per_kind: int = 16, described: bool = True) -> GenerationRequest:
    labels = [f"CLASS_{i:03d}_CODE" for i in range(classes)]

    def mined(kind: str, wrong: bool) -> list[MinedSample]:
        return [MinedSample(text=f"{kind} text number {i} " + "word " * 20, label=labels[i],
                            predicted=labels[i + 1] if wrong else labels[i], confidence=0.9) for i in range(per_kind)]
    per_class = {c: ClassScores(precision=1.0 if i % 2 else 0.5, recall=1.0 if i % 2 else 0.5,
                                f1=1.0 if i % 2 else 0.5, support=3) for i, c in enumerate(labels)}
    report = EvalReport(accuracy=0.7, macro_precision=0.7, macro_recall=0.7, macro_f1=0.7, weighted_precision=0.7,
                        weighted_recall=0.7, weighted_f1=0.7, loss=1.0, samples=1500, per_class=per_class,
                        confusions=[])
    return GenerationRequest(
        taxonomy=labels, n=32, cycle=1, report=report,
        descriptions={c: f"the customer asks about topic {i} of the policy" for i, c in enumerate(labels)}
        if described else {},
        examples=[Sample(text=f"an example of class {i} " + "word " * 10, label=c) for i, c in enumerate(labels[:40])],
        hard_negatives=mined("hard", True), misclassified=mined("missed", True), correct=mined("right", False))


def test_a_500_class_prompt_is_trimmed_in_the_stated_order_and_never_loses_the_taxonomy_or_hard_negatives():
    whole = fit(big_request(), None, words)
    assert whole.trimmed == {} and "CLASS_499_CODE: the customer asks about topic 499" in whole.text
    floor = fit(big_request(), 10**9, words).tokens
    previous = None
    for limit in range(floor, floor - 4000, -250):    # tighter and tighter limits, each trimming more
        prompt = fit(big_request(), limit, words)
        assert prompt.tokens <= limit
        kinds = [k for k in TRIM_ORDER if prompt.trimmed.get(k)]
        # Trimmed in order: a kind is trimmed only once every kind before it is gone entirely.
        available = {"correct": 16, "misclassified": 16, "examples": 40, "report_lines": 250}
        for earlier, later in zip(TRIM_ORDER, TRIM_ORDER[1:]):
            if prompt.trimmed.get(later):
                assert prompt.trimmed.get(earlier) == available[earlier], (limit, prompt.trimmed)
        for i in range(500):        # the taxonomy, whole, with its descriptions
            assert f"- CLASS_{i:03d}_CODE: the customer asks about topic {i} of the policy" in prompt.text
        assert prompt.text.count("hard text number") == 16
        assert all(f"- CLASS_{i:03d}_CODE: 0.50" in prompt.text for i in range(0, 500, 2))   # classes with errors
        if previous is not None:
            assert sum(prompt.trimmed.values()) >= sum(previous.values())
        previous = prompt.trimmed
        if kinds == list(TRIM_ORDER):
            break
    assert kinds == list(TRIM_ORDER), "the limits tried never reached the last kind"


def test_a_limit_below_the_minimal_prompt_is_one_clear_error():
    with pytest.raises(PromptTooLong) as e:
        fit(big_request(), 3000, words)
    message = str(e.value)
    assert message.startswith("teacher_max_prompt_tokens=3000: even the smallest prompt takes") and "\n" not in message
    assert "500 classes with their descriptions" in message


def test_the_teacher_sends_trimmed_prompts_to_a_server_with_a_small_context_and_records_what_it_left_out(chat):
    chat.follow_schema = True
    full = fit(big_request(classes=60), None, words).tokens
    chat.context_tokens = full - 300
    t = teacher(chat.url, max_prompt_tokens=full - 300, max_per_call=16)
    batch = t.generate(big_request(classes=60).model_copy(update={"n": 32}))
    assert len(batch.samples) == 32 and chat.longest_prompt <= full - 300
    assert len(batch.usage.trimmed) == 2 and all(trim.get("correct") for trim in batch.usage.trimmed)


# -- the classification prompt shares the renderer ------------------------------------------------------------

def test_the_classification_prompt_shows_the_taxonomy_as_the_generation_prompt_does():
    descriptions = {"card_lost": "the card is lost or stolen", "refund": "wants money back"}
    generation = fit(request(2, descriptions=descriptions), None, None).text
    prompt = render_classification(ClassificationRequest(taxonomy=TAXONOMY, descriptions=descriptions,
                                                         examples=[Sample(text="i lost my card", label="card_lost")],
                                                         texts=["where is my money", 'say "hi"\nnow']))
    classes = generation[generation.index("## Classes"):generation.index("## Labeled examples")]
    assert classes in prompt.text and "- card_lost: the card is lost or stolen" in classes
    assert '1. "where is my money"\n2. "say \\"hi\\"\\nnow"' in prompt.text     # one line per text, quoted
    assert prompt.schema == labels_schema(TAXONOMY, 2)


# -- a whole run against a server whose context is smaller than the untrimmed prompt --------------------------

def test_a_run_with_a_taxonomy_completes_against_a_small_context_server_trimmed_and_structured(chat, tmp_path):
    import pgkd
    from conftest import make_toy_dataset
    from pgkd.data import load_dataset, make_splits, with_taxonomy
    from pgkd.loop.config import DistillConfig
    from pgkd.loop.dryrun import stand_in_request
    from pgkd.teachers.llm import default_token_counter
    from pgkd.teachers.prompt import render_prompt
    data = make_toy_dataset(tmp_path / "toy")
    taxonomy = tmp_path / "classes.yaml"
    taxonomy.write_text("- {label: card_lost, description: the card is lost or stolen}\n"
                        "- {label: refund, description: wants money back}\n"
                        "- {label: transfer, description: sends money to an account}\n"
                        "- {label: pin_change, description: changes or resets the PIN}\n"
                        "- {label: card_fraud, description: a payment the customer did not make, examples: "
                        "[someone used my card]}\n")
    options = dict(labeled=40, epochs=1, cycle_epochs=1, batch_size=16, samples_per_cycle=8, max_cycles=2,
                   hard_negatives=2, misclassified=16, correct=16, seed=1, teacher_max_prompt_tokens=800)
    config = DistillConfig(data=str(data), teacher=chat.url, taxonomy=str(taxonomy), **options)
    splits = make_splits(with_taxonomy(load_dataset(data), str(taxonomy)), 40, 1)
    untrimmed = render_prompt(stand_in_request(config, splits))
    chat.count = default_token_counter()           # the server counts tokens as the teacher estimates them
    assert chat.count(untrimmed) > 800
    chat.follow_schema, chat.context_tokens = True, 800     # fewer tokens than the untrimmed prompt has
    result = pgkd.distill(data, teacher=chat.url, taxonomy=taxonomy, student="tiny", out=tmp_path / "out",
                          progress=False, teacher_cache="none", **options)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.report.stop_reason.startswith("max_cycles") and len(chat.requests) == 2
    assert chat.longest_prompt <= 800 and all("response_format" in r["body"] for r in chat.requests)
    sent = chat.requests[0]["body"]["messages"][0]["content"]
    assert "- card_fraud: a payment the customer did not make" in sent and "someone used my card" in sent
    usage = report["teacher_usage"]
    assert len(usage["trimmed"]) == 2 and all(t.get("correct") for t in usage["trimmed"])
    assert report["teacher"]["structured"].startswith("json_schema")
    recorded = report["dataset"]["taxonomy"]
    assert recorded["not_in_data"] == ["card_fraud"] and recorded["classes"] == 5
    assert report["config"]["taxonomy"] == str(taxonomy) and report["dataset"]["classes"] == 5
    assert sum(c["accepted"] for c in report["cycles"]) > 0


def test_the_teacher_labels_texts_into_the_taxonomy_with_the_classification_prompt(chat):
    chat.follow_schema = True
    t = teacher(chat.url)
    request = ClassificationRequest(taxonomy=TAXONOMY, descriptions={"refund": "wants money back"},
                                    texts=["where is my money", "send 5 to bob", "lost it"])
    labels, usage = t.classify(request)
    assert labels == ["card_lost", "refund", "transfer"] and usage.calls == 1
    sent = chat.requests[0]["body"]
    assert sent["response_format"]["json_schema"]["name"] == "pgkd_labels"
    assert sent["response_format"]["json_schema"]["schema"] == labels_schema(TAXONOMY, 3)
    assert "- refund: wants money back" in sent["messages"][0]["content"]
    chat.script = [("ok", '{"labels": ["refund", "pizza"]}')]        # outside the taxonomy, and one short
    assert t.classify(request)[0] == ["refund", None, None]
    chat.script = [("ok", "I think it is a refund.")]
    labels, usage = t.classify(request)
    assert labels == [None, None, None] and usage.errors == {"unparseable_answer": 1}


def test_a_repair_request_fits_where_its_prompt_did(chat):
    from pgkd.teachers.llm import default_token_counter
    from pgkd.teachers.prompt import REPAIR_TOKENS, repair_prompt
    count = default_token_counter()
    chat.count, chat.context_tokens = count, 3000
    chat.script = [("ok", "not json at all"), ("ok", answer(2))]
    t = LLMTeacher(chat.url, LLMSettings(backoff=0.01, timeout=5.0, max_prompt_tokens=3000), count_tokens=count)
    batch = t.generate(big_request(classes=40).model_copy(update={"n": 2}))
    assert len(batch.samples) == 2 and batch.usage.calls == 2 and chat.longest_prompt <= 3000
    assert batch.usage.trimmed[0] and count(repair_prompt()) <= REPAIR_TOKENS


def test_a_teacher_cache_in_a_folder_of_someone_elses_is_refused_before_any_training(chat, tmp_path):
    import pgkd
    from conftest import make_toy_dataset
    from pgkd.errors import UserError
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes.txt was not written by pgkd .* \(teacher_cache='"):
        pgkd.distill(make_toy_dataset(tmp_path / "toy"), teacher=chat.url, student="tiny", labeled=40,
                     teacher_cache=str(foreign), progress=False)
    assert chat.requests == [] and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
