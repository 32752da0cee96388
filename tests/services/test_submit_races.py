"""Two submits of one run id at once, a run no trainer has taken yet, and a local cluster's folder that
holds files of a person's beside its own."""
import json
import sys

import pytest
from conftest import make_toy_dataset
from pgkd.artifacts import ArtifactStore
from pgkd.errors import UserError


def test_put_new_stores_a_key_once_and_leaves_the_first_bytes(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    first = store.put_new("runs/r/request.json", b"first")
    assert first is not None and first.uri == "runs/r/request.json"
    assert store.put_new("runs/r/request.json", b"second") is None
    assert store.get_bytes(first) == b"first"
    assert sorted(p.name for p in (tmp_path / "store" / "runs" / "r").iterdir()) == ["request.json"]  # no temporary


def test_a_submit_that_loses_the_race_for_its_run_id_is_refused_and_publishes_nothing(tmp_path, kafka_url,
                                                                                      monkeypatch, capsys):
    """Another `pgkd submit --run-id race1` records its run after this one's look for it and before this
    one records its own (check-then-act): this one is refused as a later submit is, and the run keeps
    the first's request."""
    import pgkd.distributed.steps as steps
    import pgkd_services.cli
    from pgkd.cli import main
    from pgkd.distributed.runs import RunFiles
    data = make_toy_dataset(tmp_path / "toy")
    monkeypatch.setenv("PGKD_BROKER_URL", kafka_url)
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/artifacts")
    checked = steps.checked_request

    def racing(config, run_id=None):
        make = checked(config, run_id)

        def make_after_the_other(store):
            other = make(store).model_copy(update={"promote": True})   # the other submit, recorded first
            store.put_json(RunFiles(run_id).request, other.model_dump(mode="json"))
            return make(store)
        return make_after_the_other
    monkeypatch.setattr(steps, "checked_request", racing)
    sent = []

    async def recording_send(broker, body, topic, key=None):
        sent.append(body)
    monkeypatch.setattr(pgkd_services.cli, "send", recording_send)
    code = main(["submit", "--data", str(data), "--labeled", "40", "--student", "tiny", "--run-id", "race1"])
    captured = capsys.readouterr()
    assert code == 2 and "submitted run" not in captured.out, captured
    assert captured.err.strip().splitlines() == [
        f"pgkd: error: --run-id race1: a run of this id is already in file://{tmp_path / 'artifacts'} "
        "(`pgkd status race1`); choose another"], captured.err
    assert sent == []
    request = json.loads((tmp_path / "artifacts" / "runs" / "race1" / "request.json").read_text())
    assert request["promote"] is True   # the first's, not overwritten


def test_status_of_a_run_no_trainer_has_taken_says_it_waits_for_one(tmp_path, monkeypatch, capsys):
    """Submitted while no service ran: not `running`. Once a trainer has marked its message taken (what
    `submit --wait` looks for), it is running."""
    from pgkd.cli import main
    from pgkd.distributed.runs import RunFiles
    from pgkd.distributed.steps import submit
    from pgkd.loop.config import DistillConfig
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/artifacts")
    store = ArtifactStore()
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), labeled=40, student="tiny")
    submit(config, store, "queued")
    assert main(["status", "queued"]) == 0
    out = capsys.readouterr().out
    assert "waiting for a trainer" in out and "running" not in out.splitlines() and "no cycle" not in out, out
    store.put_bytes(f"{RunFiles('queued').base}/handled/RunRequested-0000.taken", b"")  # as the trainer marks it
    assert main(["status", "queued"]) == 0
    out = capsys.readouterr().out
    assert "waiting for a trainer" not in out and out.splitlines()[-2:] == ["no cycle evaluated yet", "running"], out


# -- the local cluster's folder --------------------------------------------------------------------------------

def cluster(folder):
    """A LocalCluster that starts nothing of its own (a broker given, no topics, no Prometheus)."""
    from pgkd_services.local import LocalCluster
    return LocalCluster(folder, quiet=True, broker_url="kafka://127.0.0.1:9", topics=False, prometheus=False)


def write_like_a_run(c) -> None:
    """What a cluster's processes write: a log, the artifact store, the cache."""
    assert c.spawn("job", [sys.executable, "-c", "print('working')"]).wait(60) == 0
    (c.folder / "artifacts" / "runs").mkdir(parents=True)
    (c.folder / "cache").mkdir()


def test_a_new_start_removes_what_the_cluster_wrote_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "demo"
    with cluster(folder) as c:
        write_like_a_run(c)
    (folder / "notes.txt").write_text("notes\n")
    (folder / "myanalysis").mkdir()
    (folder / "myanalysis" / "plot.py").write_text("print(1)\n")
    (folder / "mine.log").write_text("mine\n")
    with cluster(folder):
        assert sorted(p.name for p in folder.iterdir()) == [".pgkd-local-cluster", "mine.log", "myanalysis",
                                                            "notes.txt"]
    assert (folder / "notes.txt").read_text() == "notes\n" and (folder / "myanalysis" / "plot.py").is_file()


def test_a_name_the_cluster_writes_held_by_someone_else_is_refused(tmp_path):
    folder = tmp_path / "demo"
    with cluster(folder):
        pass
    (folder / "job.log").write_text("someone's\n")
    with cluster(folder) as c, pytest.raises(UserError, match="job.log: not written by the local cluster"):
        c.spawn("job", [sys.executable, "-c", "print('working')"])
    assert (folder / "job.log").read_text() == "someone's\n"


def test_a_folder_whose_marker_lists_nothing_is_refused_and_kept_whole(tmp_path):
    """An older pgkd's marker (a line of text), or a damaged one: nothing says what the cluster wrote."""
    folder = tmp_path / "demo"
    (folder / "artifacts" / "runs").mkdir(parents=True)
    (folder / ".pgkd-local-cluster").write_text("logs and artifacts of pgkd_services.local; emptied at each start\n")
    (folder / "notes.txt").write_text("notes\n")
    with pytest.raises(UserError, match="lists nothing the cluster wrote"):
        cluster(folder).open()
    assert sorted(p.name for p in folder.iterdir()) == [".pgkd-local-cluster", "artifacts", "notes.txt"]


def test_a_marker_naming_a_path_outside_the_folder_removes_nothing(tmp_path):
    folder = tmp_path / "demo"
    with cluster(folder):
        pass
    (tmp_path / "precious").write_text("keep\n")
    (folder / "notes.txt").write_text("notes\n")
    (folder / ".pgkd-local-cluster").write_text(json.dumps({"written_by": "pgkd", "written": ["notes.txt",
                                                                                             "../precious"]}))
    with pytest.raises(UserError, match="not a name"):
        cluster(folder).open()
    assert (tmp_path / "precious").is_file() and (folder / "notes.txt").is_file()
