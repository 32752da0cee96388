"""Where a run's artifacts are (RunFiles), and ending a run as failed: what the commands and the
services' runtime need of a run without the engine's steps (which import torch)."""
from __future__ import annotations

from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import RunCompleted
from pgkd.names import check_name


class RunFiles:
    """Keys of a run's artifacts. The run id is checked as a name (pgkd.names): `..` or `a/b` is refused."""

    def __init__(self, run_id: str):
        self.base = f"runs/{check_name(run_id, 'run')}"
        self.request = f"{self.base}/request.json"
        self.not_submitted = f"{self.base}/not_submitted.json"     # the request was recorded, its publish failed
        self.report = f"{self.base}/report.json"
        self.plot = f"{self.base}/history.png"
        self.reliability = f"{self.base}/reliability.png"
        self.best = f"{self.base}/checkpoints/best.json"      # the kept student, calibrated
        self.completed = f"{self.base}/completed.json"
        self.states = f"{self.base}/state"

    def train_set(self, cycle: int) -> str:
        return f"{self.base}/train/v{cycle:04d}.jsonl"

    def checkpoint(self, cycle: int) -> str:
        return f"{self.base}/checkpoints/cycle-{cycle:04d}.json"

    def state(self, cycle: int, phase: str, sha256: str) -> str:
        """The run's state after `phase` of `cycle`, named by its content too: a step run twice (a
        message redelivered after its handler had published) writes a second file beside the first,
        never over the one the first message points to. The names sort in the order the run saved them."""
        from pgkd.loop.state import PHASES
        return f"{self.states}/{cycle:04d}-{PHASES.index(phase)}-{phase}-{sha256[:16]}.json"

    def validation_probs(self, cycle: int) -> str:
        return f"{self.base}/probs/{cycle:04d}.npy"



def fail_run(store: ArtifactStore, run_id: str, cycle: int, reason: str) -> RunCompleted:
    """A run that cannot go on ends as failed, with the reason, so nobody waits for it forever."""
    completed = RunCompleted(run_id=run_id, cycle=cycle, status="failed", reason=reason)
    store.put_json(RunFiles(run_id).completed, completed.model_dump(mode="json"))
    return completed
