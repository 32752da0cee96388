"""Where the stop policy reads the loop's figures: Prometheus (HTTP API, PromQL) when the services
run, the process's own metrics registry when `pgkd distill` runs embedded. Both read the same metric
names (metrics.py), so both paths decide the same way.

A reader returns the validation history of the policy's metric (cycle 0 to the current one) and the
run's teacher spend. `PrometheusReader` waits, up to a bound, until Prometheus has scraped the
current cycle; when it cannot be reached or stays behind it raises MetricsUnavailable, and the
caller decides on the run's own records and says so.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from pgkd.loop.stopping import MetricsUnavailable  # noqa: F401 -- raised here, declared with the stop policy


@dataclass
class LoopFigures:
    history: list[float]          # the policy metric by cycle, 0 .. current
    tokens: int                   # the run's teacher tokens so far
    cost: float                   # the run's teacher cost so far
    source: str


def _history(values: dict[int, float], cycle: int, where: str) -> list[float]:
    missing = [c for c in range(cycle + 1) if c not in values]
    if missing:
        raise MetricsUnavailable(f"{where} has no value for cycle(s) {missing[:5]}")
    return [values[c] for c in range(cycle + 1)]


class RegistryReader:
    source = "metrics registry"

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def _samples(self, name: str, **labels):
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    yield sample

    def read(self, run: str, metric: str, cycle: int) -> LoopFigures:
        values = {int(s.labels["cycle"]): s.value for s in self._samples("pgkd_selection_score", run=run,
                                                                          metric=metric)}
        return LoopFigures(history=_history(values, cycle, "the metrics registry"),
                           tokens=int(sum(s.value for s in self._samples("pgkd_run_teacher_tokens", run=run))),
                           cost=sum(s.value for s in self._samples("pgkd_run_teacher_cost", run=run)),
                           source=self.source)


class PrometheusReader:
    source = "prometheus"

    def __init__(self, url: str, wait: float = 30.0, poll: float = 0.5, timeout: float = 5.0):
        self.url, self.wait, self.poll, self.timeout = url.rstrip("/"), wait, poll, timeout

    def query(self, promql: str) -> list[dict]:
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(address, timeout=self.timeout) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise MetricsUnavailable(f"Prometheus at {self.url} cannot be queried: {e}") from None
        if body.get("status") != "success":
            raise MetricsUnavailable(f"Prometheus at {self.url} refused {promql!r}: {body.get('error')}")
        return body["data"]["result"]

    def read(self, run: str, metric: str, cycle: int) -> LoopFigures:
        # last_over_time: series a restarted service no longer exports still count
        scores = f'last_over_time(pgkd_selection_score{{run="{run}",metric="{metric}"}}[7d])'
        deadline = time.monotonic() + self.wait
        while True:
            values = {int(r["metric"]["cycle"]): float(r["value"][1]) for r in self.query(scores)}
            if cycle in values:
                break
            if time.monotonic() > deadline:
                raise MetricsUnavailable(f"Prometheus at {self.url} has not scraped cycle {cycle} of run {run} "
                                         f"within {self.wait:g} s")
            time.sleep(self.poll)

        def total(promql: str) -> float:
            return sum(float(r["value"][1]) for r in self.query(promql))
        # max: two series of one gauge (a restarted or a second generator) are the same run total seen
        # twice, not two spends.
        tokens = f'max by (kind) (last_over_time(pgkd_run_teacher_tokens{{run="{run}"}}[7d]))'
        cost = f'max(last_over_time(pgkd_run_teacher_cost{{run="{run}"}}[7d]))'
        return LoopFigures(history=_history(values, cycle, f"Prometheus at {self.url}"), tokens=int(total(tokens)),
                           cost=total(cost),
                           source=self.source)
