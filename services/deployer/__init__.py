"""deployer: keeps a student server serving the newest promoted student. Run one beside each server
(a sidecar in its pod): each has a consumer group of its own, so every server gets every promotion.

StudentPromoted (student-promoted) -> the checkpoint written as the next version of the model
repository, which the server (Triton, explicit model control) loads without a restart. A promotion
that cannot be deployed (a checkpoint that does not match its sha256, a version the server fails to
load) leaves the served version as it is: a dead letter with the reason, a log line, and
pgkd_serving_promotions{outcome="failed"}. On start, before it connects to the broker, it deploys the
model's latest promotion from the artifact store if the server has not got it (a new replica).

Settings: PGKD_SERVING_REPOSITORY (the model repository the server reads), PGKD_SERVING_URL (the
server's HTTP host:port, default 127.0.0.1:8000), PGKD_SERVING_MODEL (student),
PGKD_SERVING_FORMAT (onnx | torch), PGKD_SERVING_INT8 (0 | 1), PGKD_SERVING_GPU (0 | 1: a GPU
instance in the config.pbtxt it writes first), PGKD_SERVING_REPLICA (this server's name in the
consumer group; default: the host name)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from pgkd.artifacts import ArtifactError
from pgkd.distributed.messages import RunCompleted, StudentPromoted
from pgkd.distributed.steps import latest_promotion
from pgkd.errors import UserError
from pgkd.net import parse_address, url_host
from pgkd.serving.deploy import DeployFailed, deploy_promotion
from pgkd.settings import read
from pgkd.settings import ServingSettings as ServingVariables

from pgkd_services.runtime import Service

log = logging.getLogger("pgkd.service")


@dataclass(frozen=True)
class ServingSettings:
    repository: Path
    http_address: str = "127.0.0.1:8000"
    model: str = "student"
    format: str = "onnx"
    int8: bool = False
    replica: str = "local"
    gpu: bool = False

    @classmethod
    def from_env(cls, env=None) -> "ServingSettings":
        """PGKD_SERVING_* (os.environ, or `env`): pgkd.settings.ServingSettings; UserError naming the variable."""
        serving = read(ServingVariables, env)
        if not serving.repository:
            raise UserError("PGKD_SERVING_REPOSITORY: not set (the model repository the student server reads)")
        host, port = parse_address(serving.url.removeprefix("http://").rstrip("/"), f"PGKD_SERVING_URL={serving.url}")
        return cls(Path(serving.repository), f"{url_host(host)}:{port}", serving.model, serving.format, serving.int8,
                   serving.replica_name(), serving.gpu)


class DeployerService(Service):
    def __init__(self, serving: ServingSettings | None = None, **options):
        super().__init__("deployer", **options)
        self.serving = serving or ServingSettings.from_env()
        self.group = f"{self.settings.topic_prefix}deployer.{self.serving.replica}"
        self.subscribe(StudentPromoted, self.on_promoted)
        self.subscribe(RunCompleted, self.on_completed)

    def prepare(self) -> None:
        """Before the broker: the repository, and the model's latest promotion if the server lacks it (a
        new replica gets its student from the artifact store, even while Kafka is away)."""
        try:
            self.serving.repository.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"PGKD_SERVING_REPOSITORY={self.serving.repository}: {e.strerror}") from None
        self.metrics.serving_promotions.labels(self.serving.model, "failed")
        latest = latest_promotion(self.store, self.serving.model)
        if latest is not None:
            self._deploy(latest)

    async def on_promoted(self, promoted: StudentPromoted) -> None:
        if promoted.model != self.serving.model:
            return   # another server's model
        async with self._busy:
            failure = await asyncio.to_thread(self._deploy, promoted)
        if failure is not None:
            await self.park(failure, promoted)

    async def on_completed(self, completed: RunCompleted) -> None:
        """A run submitted with --promote carries its promotion in its RunCompleted."""
        if completed.promotion is not None:
            await self.on_promoted(completed.promotion)

    def _deploy(self, promoted: StudentPromoted) -> str | None:
        """Deploy one promotion: None, or why it failed (logged and counted here)."""
        s = self.serving
        log.info("deployer: run %s cycle %d: %s received for model %s (%s)", promoted.run_id, promoted.cycle,
                 promoted.kind, s.model, promoted.decision)
        try:
            version = deploy_promotion(self.store, promoted, s.repository, s.http_address, s.format, s.int8, s.gpu)
        except (DeployFailed, ArtifactError, UserError) as e:
            reason = f"model {s.model}: run {promoted.run_id}'s student not deployed: {e}"
            log.error("deployer: %s", reason)
            self.metrics.serving_promotions.labels(s.model, "failed").inc()
            return reason
        if version is None:
            log.info("deployer: run %s: model %s already serves this promotion or a later one", promoted.run_id,
                     s.model)
            self.metrics.serving_promotions.labels(s.model, "skipped").inc()
            return None
        self.metrics.serving_promotions.labels(s.model, "deployed").inc()
        self.metrics.serving_version.labels(s.model).set(version.number)
        log.info("deployer: run %s cycle %d: model %s serves version %d", promoted.run_id, promoted.cycle, s.model,
                 version.number)
        return None


def build(**options) -> DeployerService:
    return DeployerService(**options)
