"""One run state (pgkd.loop.state.RunState) that the embedded run and the services' steps both drive:
what `pgkd status` and `pgkd submit --wait` show is read from it; a cycle's timings mean the same in
both modes; only the evaluator ends a run; a state that cannot be the one a message names is one line."""
import json

import pytest
from conftest import make_toy_dataset
from pgkd.cli import main
from pgkd.distributed import steps
from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import CycleEvaluated, RunCompleted, TeacherStopped
from pgkd.distributed.runs import RunFiles
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.types import METRICS
from pgkd.loop.report import PhaseTimes, without_times
from pgkd.loop.state import RunState, StateError

RUN = dict(labeled=40, student="tiny", teacher="pool-random", samples_per_cycle=16, max_cycles=2, patience=5,
           epochs=4, cycle_epochs=2, learning_rate=1e-2, head_learning_rate=1e-2, batch_size=16, seed=1)


def scores(value: float) -> dict[str, float]:
    return {name: value for name in METRICS}


def test_status_shows_the_best_cycle_on_the_scores_that_select_not_on_validation(tmp_path, monkeypatch, capsys):
    """The drift the issue found: with --selection-source out-of-fold, `pgkd status` (and `submit --wait`,
    the same lines) named the best cycle by validation. A run whose validation peaks at cycle 0 and whose
    selection scores peak at cycle 1 kept cycle 1: its lines must say so."""
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), selection_source="out-of-fold", **RUN)
    request = steps.submit(config, store, run_id="oof")
    ran = steps.run_through_steps(request, store)
    final = store.get_model(ran.state, RunState)
    # The same run, its scores set as the issue reproduced them: validation 0.80 then 0.75, selection 0.70 then 0.75.
    cycles = [final.cycles[0].model_copy(update={"validation": scores(0.8), "selection": scores(0.7)}),
              final.cycles[1].model_copy(update={"validation": scores(0.75),
                                                 "selection": scores(0.75) | {"accuracy": 0.6}})]
    state = final.model_copy(update={"cycles": cycles, "cycle": 1, "phase": "evaluated"})
    store.put_json(RunFiles("oof").state(9, "evaluated", "f" * 64), state.model_dump(mode="json"))   # the latest state
    monkeypatch.setenv("PGKD_ARTIFACTS", store.url)

    assert main(["status", "oof"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cycle")]
    assert len(lines) == 2
    assert "selection macro_f1 0.7000" in lines[0] and "best 0.7000 @ 0" in lines[0]
    assert "selection macro_f1 0.7500" in lines[1] and "best 0.7500 @ 1" in lines[1]   # not "best 0.8000 @ 0"
    assert "acc 0.6000" in lines[1]          # the selection's accuracy beside its macro-F1, not validation's 0.75
    assert state.best_cycle() == 1


def test_status_names_a_state_or_an_ending_of_another_run_and_a_lost_report_in_one_line(tmp_path, monkeypatch, capsys):
    """A reviewer copied one run's state and completed.json into another's folder: `pgkd status` showed them
    as that run's. And a report gone from the store was a traceback."""
    import shutil
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **RUN)
    for run_id in ("one", "two"):
        steps.run_through_steps(steps.submit(config, store, run_id=run_id), store)
    monkeypatch.setenv("PGKD_ARTIFACTS", store.url)
    runs = tmp_path / "artifacts" / "runs"

    def status(run_id: str) -> tuple[int, list[str]]:
        code = main(["status", run_id])
        return code, capsys.readouterr().err.strip().splitlines()
    shutil.copy(runs / "one" / "completed.json", runs / "two" / "completed.json")
    code, err = status("two")
    assert code == 2 and len(err) == 1 and "completed.json: damaged (the completion of run one, not of run two)" in err[0]
    newest = sorted((runs / "one" / "state").iterdir())[-1]
    shutil.copy(newest, runs / "two" / "state" / "9999-9-taught.json")
    code, err = status("two")
    assert code == 2 and len(err) == 1 and "run two: state " in err[0] and "of run one, not of this run" in err[0], err
    completed = json.loads((runs / "one" / "completed.json").read_text())
    (tmp_path / "artifacts" / store.key_of(completed["report"]["uri"])).unlink()
    code, err = status("one")
    assert code == 1 and len(err) == 1 and "report.json: missing" in err[0] and "Traceback" not in err[0], err


def test_the_steps_and_the_embedded_run_time_every_phase_of_a_cycle_alike(tmp_path):
    """A cycle's seconds are its phases' (mine, teacher, train, evaluate, queue), in both modes: every
    phase present and non-negative; a cycle after 0 spent time in each working phase; the cycle's
    `seconds` is their sum."""
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **RUN)
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    completed = steps.run_through_steps(steps.submit(config, store, run_id="timed"), store)
    through_steps = store.get_json(completed.report)
    embedded = run(config, None, progress=False).report.model_dump(mode="json")
    assert without_times(through_steps) == without_times(embedded)     # timings' shape included
    for report in (through_steps, embedded):
        for cycle in report["cycles"]:
            timings = PhaseTimes.model_validate(cycle["timings"])
            assert set(cycle["timings"]) == {"mine", "teacher", "train", "evaluate", "queue"}
            assert min(cycle["timings"].values()) >= 0
            assert timings.train > 0 and timings.evaluate > 0
            assert (timings.mine > 0 and timings.teacher > 0) == (cycle["cycle"] > 0)
            assert cycle["seconds"] == pytest.approx(timings.total)


def test_an_exhausted_teacher_is_a_message_the_evaluator_ends_the_run_on(tmp_path):
    """The generator never scores a student: it says TeacherStopped, and the evaluator completes the run,
    as the embedded run stops."""
    data = make_toy_dataset(tmp_path / "toy", train_per_class=20)
    config = DistillConfig(data=str(data), **{**RUN, "labeled": 40, "max_cycles": 6})
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    message, seen = steps.submit(config, store, run_id="dry"), []
    while not isinstance(message, RunCompleted):
        step = steps.STEP_OF[type(message)]
        message = step(message, store)
        seen.append(type(message).__name__)
    assert "TeacherStopped" in seen and seen[seen.index("TeacherStopped") + 1] == "RunCompleted"
    assert message.reason.startswith("teacher_exhausted") and message.decided_from == "teacher"
    embedded = run(config, None, progress=False).report.model_dump(mode="json")
    assert embedded["stop_reason"] == message.reason
    assert without_times(store.get_json(message.report)) == without_times(embedded)


@pytest.fixture
def evaluated(tmp_path):
    """A run through its first evaluation, and the CycleEvaluated the miner would take."""
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **RUN)
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    trained = steps.train(steps.submit(config, store, run_id="r1"), store)
    message = steps.evaluate(trained, store)
    assert isinstance(message, CycleEvaluated)
    steps.submit(config, store, run_id="r2")
    return store, message


def bad_state(store, message, case: str) -> CycleEvaluated:
    """`message`, its state made missing, damaged, of a newer schema, or of another run."""
    data = store.get_json(message.state)
    if case == "missing":
        return message.model_copy(update={"state": message.state.model_copy(update={"uri": "runs/r1/state/gone.json"})})
    if case == "damaged":     # cut short, as a full disk leaves a file
        return message.model_copy(update={"state": store.put_bytes("runs/r1/state/cut.json",
                                                                    store.get_bytes(message.state)[:200])})
    if case == "outside":
        return message.model_copy(update={"state": message.state.model_copy(update={"uri": "../../etc/passwd"})})
    if case == "newer":
        return message.model_copy(update={"state": store.put_json("runs/r1/state/newer.json",
                                                                  {**data, "schema_version": 2})})
    if case == "another cycle":
        return message.model_copy(update={"cycle": 3})
    if case == "another phase":     # the state the evaluator read, named by the message it writes
        trained = store.list("runs/r1/state")[0]
        return message.model_copy(update={"state": store.put_bytes(trained, store.get_bytes(trained))})
    return message.model_copy(update={"run_id": "r2"})   # "another run": r1's state, named by a message of r2


@pytest.mark.parametrize("case, problem", [("missing", "missing"), ("damaged", "damaged"),
                                           ("outside", "not a relative path inside its folder"), ("newer", "newer schema (2)"), ("another", "of run r1, not of this run"),
                                           ("another cycle", "of cycle 0 evaluated, not the cycle 3 evaluated"),
                                           ("another phase", "of cycle 0 trained, not the cycle 0 evaluated")])
def test_a_state_that_cannot_be_the_runs_is_one_line_naming_the_run_and_the_file(evaluated, case, problem):
    store, message = evaluated
    bad = bad_state(store, message, case)
    before = sorted(store.list("runs"))
    with pytest.raises(StateError) as raised:
        steps.mine(bad, store)
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"run {bad.run_id}: state ") and problem in line
    assert (bad.state.uri if case == "outside" else store.location(bad.state)) in line
    assert sorted(store.list("runs")) == before          # nothing advanced, nothing written


def test_each_phase_saves_its_state_and_a_message_points_to_it(evaluated):
    store, message = evaluated
    state = steps.load_state(store, message)
    assert (state.phase, state.cycle, len(state.cycles)) == ("evaluated", 0, 1)
    assert state.best.cycle == 0 and state.baseline is not None and state.stop_reason is None
    names = [key.rsplit("/", 1)[1] for key in sorted(store.list(RunFiles("r1").states))]
    assert [name.rsplit("-", 1)[0] for name in names] == ["0000-3-trained", "0000-4-evaluated"]
    assert names[1] == f"0000-4-evaluated-{message.state.sha256[:16]}.json"     # named by its content too
    assert steps.latest_state(store, "r1") == state
    assert json.loads(store.get_bytes(message.state))["schema_version"] == 1
    assert isinstance(TeacherStopped(run_id="r1", cycle=1, state=message.state), TeacherStopped)


def test_a_step_run_twice_leaves_the_first_messages_state_intact(tmp_path):
    """At least once: a trainer that published and died before committing has its message run again by
    another replica. The second run saves another state (its times differ) beside the first, so the
    first message, which the evaluator may take, still points to a state that is there and whole."""
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **RUN)
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    request = steps.submit(config, store, run_id="twice")
    first = steps.train(request, store)
    second = steps.train(request, store)
    assert first.state != second.state                       # other times: another file
    assert isinstance(steps.evaluate(first, store), CycleEvaluated)
    assert steps.load_state(store, first).phase == "trained"
