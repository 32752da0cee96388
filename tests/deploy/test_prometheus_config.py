"""The monitoring files against the real tools: Prometheus' promtool and a real Prometheus server.

- deploy/prometheus/prometheus.yml: `promtool check config` (which loads the rule files it names, relative
  to its own folder, as Prometheus does in compose from /etc/prometheus).
- deploy/prometheus/rules/pgkd.rules.yml: `promtool check rules`, and `promtool test rules` on the unit
  tests beside it (pgkd.rules.test.yml), which must show every alert both firing and staying quiet.
- every PromQL expression of the rules and of the Grafana dashboard (deploy/grafana/dashboards/pgkd.json,
  template variables included, Grafana's $variables replaced by concrete values) is run against a real
  Prometheus started here on a loopback port: it must be accepted. The server also loads the rules and
  must evaluate every one of them without error.
- every metric those expressions name is one the code exports (pgkd.metrics, the served cascade's
  pgkd.serving.cascade.CascadeMetrics, FastStream's Prometheus middleware), `up`, or a recording rule of the rules file; every label they match on or group by is one
  those series carry.
- negative controls: a broken expression gets 400 from the server, promtool rejects a broken rule and a
  wrong test expectation, the name check flags a name nobody exports.

Nothing is skipped: without promtool or prometheus the tests fail, saying that `make setup` installs them.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from faststream.prometheus.container import MetricsContainer
from prometheus_client import CollectorRegistry

from pgkd import processes
from pgkd.distributed.metrics import LoopMetrics, exported_names
from pgkd.net import free_port
from pgkd.serving.cascade import CascadeMetrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "pgkd.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules" / "pgkd.rules.test.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pgkd.json"
DASHBOARD_PROVISIONING = GRAFANA / "provisioning" / "dashboards" / "pgkd.yml"
DASHBOARD_MOUNT = "/etc/grafana/dashboards"   # where docker-compose.yml mounts deploy/grafana/dashboards

ALERTS = {"PgkdRunStalled", "PgkdTeacherErrorRatioHigh", "PgkdDeadLettersGrowing", "PgkdNoImprovement",
          "PgkdServiceDown", "PgkdIngestRejecting", "PgkdPromotionFailed", "PgkdCascadeTeacherShareHigh",
          "PgkdCascadeLabelsDropped"}
# The pgkd services, as deploy/prometheus/prometheus.yml labels their targets (service=<name>).
SERVICES = ("trainer", "evaluator", "miner", "generator", "ingest")
SEVERITIES = {"info", "warning", "critical"}
# Labels every scraped series gets from deploy/prometheus/prometheus.yml.
TARGET_LABELS = {"job", "instance", "service"}
# What Grafana's variables become in the expressions sent to Prometheus.
VARIABLES = {"run": "example-run-20250101-000000-abcdef", "__rate_interval": "1m", "__interval": "15s",
             "__range": "6h", "__range_s": "21600", "__interval_ms": "15000"}
SETUP_HINT = "`make setup` installs Prometheus and promtool (apt packages prometheus, with promtool)"


# ---------------------------------------------------------------------------------------------- helpers

def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        pytest.fail(f"{name} is not installed: {SETUP_HINT}", pytrace=False)
    return path


def promtool(*args: str) -> tuple[int, str]:
    done = subprocess.run([tool("promtool"), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@cache
def rules() -> tuple[dict, ...]:
    (group,) = load_yaml(RULES)["groups"]
    assert group["name"] == "pgkd"
    return tuple(group["rules"])


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def alerting_rules() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))   # a collapsed row holds its panels
    return out


LABEL_VALUES = re.compile(r"label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)")


def variable_query(variable: dict) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def substitute(expr: str) -> str:
    """Grafana's $var / ${var} / ${var:format} replaced by concrete values; an unknown one is an error."""
    def value(match: re.Match) -> str:
        name = match["braced"] or match["bare"]
        assert name in VARIABLES, f"no test value for the dashboard variable ${name} in {expr!r}"
        return VARIABLES[name]
    return re.sub(r"\$(?:\{(?P<braced>\w+)(?::\w+)?\}|(?P<bare>\w+))", value, expr)


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every expression of the rules and the dashboard, variables substituted."""
    found = [(f"rule {rule.get('record') or rule.get('alert')}", rule["expr"]) for rule in rules()]
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            assert target.get("expr"), f"panel {panel['title']!r}: target {target.get('refId')} has no expr"
            found.append((f"panel {panel['title']!r} {target['refId']}", substitute(target["expr"])))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable_query(variable)
        match = LABEL_VALUES.fullmatch(query.strip())
        assert match and match["selector"], \
            f"variable ${variable['name']}: only label_values(selector, label) is checked here, got {query!r}"
        found.append((f"variable ${variable['name']}", substitute(match["selector"])))
    return found


# ------------------------------------------------------------------------- metric names in an expression

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:[a-zA-Z]+\d*)*)  # 0.2, 1e3, 10m, 1h30m
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|=~|!~|<=|>=|[-+*/%^<>=(){}\[\],@])
""", re.VERBOSE)
KEYWORDS = {"and", "or", "unless", "atan2", "bool", "offset", "start", "end", "inf", "nan"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        assert match, f"cannot read {expr[pos:pos + 20]!r} in {expr!r}"
        if match.lastgroup not in {"space", "comment"}:
            out.append((match.lastgroup, match.group()))
        pos = match.end()
    return out


def references(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: label names its selectors match on}, label names in by/without/on/ignoring/group_x
    lists). Function and aggregation names (an identifier before "(", or before by/without), keywords,
    label names, strings, numbers and durations are not metric names."""
    toks = tokens(expr)
    metrics: dict[str, set[str]] = {}
    grouping: set[str] = set()
    i, last_metric = 0, None
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if text == "{":   # a selector's matchers: label names, operators, strings
            end = next(j for j in range(i, len(toks)) if toks[j][1] == "}")
            matched = {t for k, t in toks[i + 1:end] if k == "ident"}
            assert "__name__" not in matched, f"match metric names by name, not __name__: {expr!r}"
            assert last_metric is not None, f"a selector without a metric name: {expr!r}"
            metrics[last_metric] |= matched
            i = end + 1
            continue
        if text == "[":   # a range or a subquery: durations only
            i = next(j for j in range(i, len(toks)) if toks[j][1] == "]") + 1
            continue
        if kind == "ident" and text.lower() in LABEL_LIST_KEYWORDS:
            if following == "(":
                end = next(j for j in range(i, len(toks)) if toks[j][1] == ")")
                grouping |= {t for k, t in toks[i + 2:end] if k == "ident"}
                i = end + 1
            else:
                i += 1
            continue
        # A function, or an aggregation written `sum by (x) (...)`: followed by "(" or by/without.
        call = following == "(" or (following or "").lower() in {"by", "without"}
        if kind == "ident" and not call and text.lower() not in KEYWORDS:
            metrics.setdefault(text, set())
            last_metric = text
        elif kind != "ident" or call:
            last_metric = None
        i += 1
    return metrics, grouping


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the services export -> its label names: pgkd.metrics, the served cascade's
    (`pgkd cascade serve`, on its own port) and FastStream's Prometheus middleware (its metrics container, as
    the middleware builds it, in a registry of its own)."""
    loop = LoopMetrics(CollectorRegistry())
    cascade = CascadeMetrics(CollectorRegistry())
    faststream = MetricsContainer(CollectorRegistry(), custom_label_names=())
    collectors = [v for v in vars(loop).values() if hasattr(v, "describe")]
    collectors += [v for v in vars(cascade).values() if hasattr(v, "describe")]
    collectors += [getattr(faststream, name) for name in MetricsContainer.__slots__
                   if hasattr(getattr(faststream, name, None), "describe")]
    assert len(collectors) >= 24 + 9, "fewer collectors than pgkd.metrics and faststream define"
    series: dict[str, frozenset[str]] = {}
    for collector in collectors:
        # pgkd.metrics.exported_names expands a family into its series (_total, _bucket, ...).
        for name in exported_names(SimpleNamespace(collector=collector)):
            labels = set(collector._labelnames) | ({"le"} if name.endswith("_bucket") else set())
            series[name] = frozenset(labels)
    assert exported_names(loop) <= series.keys()
    return series


def known_series() -> dict[str, frozenset[str]]:
    """Exported series, `up`, and the recording rules (with the labels their own expressions may carry)."""
    known = dict(exported_series())
    known["up"] = frozenset()
    for record, expr in recording_rules().items():
        metrics, grouping = references(expr)
        known[record] = frozenset(grouping | set().union(*(known.get(m, set()) for m in metrics)))
    return known


def reference_problems(expr: str) -> list[str]:
    known = known_series()
    metrics, grouping = references(expr)
    problems = [f"{name} is not exported by the services, nor up, nor a recording rule"
                for name in metrics if name not in known]
    carried = TARGET_LABELS | set().union(*(known.get(name, set()) for name in metrics))
    for name, matched in metrics.items():
        problems += [f"{name}{{{label}=...}}: {name} has no label {label}"
                     for label in sorted(matched - TARGET_LABELS - known.get(name, frozenset()))]
    problems += [f"groups by {label}, which none of {sorted(metrics)} carries" for label in sorted(grouping - carried)]
    return problems


# ---------------------------------------------------------------------------------------------- promtool

def test_promtool_check_config_accepts_the_config_and_loads_its_rule_files():
    config = load_yaml(CONFIG)
    # Relative to the config's folder: /etc/prometheus in compose, deploy/prometheus here.
    assert config["rule_files"] == ["rules/*.rules.yml"]
    matched = sorted(Path(p) for pattern in config["rule_files"] for p in glob.glob(str(CONFIG.parent / pattern)))
    assert matched == [RULES], "the rule glob must load the rules and not their unit tests"

    code, output = promtool("check", "config", str(CONFIG.relative_to(REPO)))
    assert code == 0, output
    assert f"SUCCESS: {CONFIG.relative_to(REPO)} is valid prometheus config file syntax" in output, output
    assert "SUCCESS: 1 rule files found" in output, output
    checked = re.search(rf"Checking {re.escape(str(RULES.relative_to(REPO)))}\s+SUCCESS: (\d+) rules found", output)
    assert checked, f"promtool did not load {RULES.relative_to(REPO)}:\n{output}"
    assert int(checked[1]) == len(rules())

    # The scrape configuration stays as it was, plus the optional Triton teacher, and the optional student
    # server's Triton and deployer and the cascade (profile `serving`), each a job of its own: up{job="pgkd"} is
    # the five services.
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"pgkd", "teacher", "student-server", "deployer", "cascade"}
    pgkd = {target: static["labels"]["service"] for static in jobs["pgkd"]["static_configs"]
            for target in static["targets"]}
    assert pgkd == {f"{name}:9100": name for name in SERVICES}
    assert [(static["targets"], static["labels"]) for static in jobs["teacher"]["static_configs"]] == \
        [(["teacher:8002"], {"service": "teacher"})]
    assert [(static["targets"], static["labels"]) for static in jobs["student-server"]["static_configs"]] == \
        [(["student-server:8002"], {"service": "student-server"})]
    assert [(static["targets"], static["labels"]) for static in jobs["deployer"]["static_configs"]] == \
        [(["deployer:9100"], {"service": "deployer"})]
    # The cascade's own metrics (pgkd_cascade_*, --cascade-metrics-port), which the rules and the Cascade row read.
    assert [(static["targets"], static["labels"]) for static in jobs["cascade"]["static_configs"]] == \
        [(["cascade:8023"], {"service": "cascade"})]


def test_promtool_check_rules_accepts_the_rules():
    code, output = promtool("check", "rules", str(RULES.relative_to(REPO)))
    assert code == 0, output
    assert f"SUCCESS: {len(rules())} rules found" in output, output

    assert set(alerting_rules()) == ALERTS
    for name, rule in alerting_rules().items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description"} <= rule["annotations"].keys(), name
    # Recording rule names follow level:metric:operations.
    for record in recording_rules():
        assert re.fullmatch(r"pgkd:[a-z0-9_]+:[a-z0-9_]+", record), record
    # The no-improvement threshold is stated where an operator reads it.
    assert "threshold: 3" in alerting_rules()["PgkdNoImprovement"]["annotations"]["description"]
    assert "patience is 5" in alerting_rules()["PgkdNoImprovement"]["annotations"]["description"]
    # More than half of the streamed samples rejected, held for 15 minutes.
    rejecting = alerting_rules()["PgkdIngestRejecting"]
    assert rejecting["for"] == "15m" and rejecting["labels"]["severity"] == "warning"
    assert "[15m]" in rejecting["expr"] and "> 0.5" in rejecting["expr"], rejecting["expr"]
    # The cascade's teacher share against the policy's own target, held for 15 minutes.
    share = alerting_rules()["PgkdCascadeTeacherShareHigh"]
    assert share["for"] == "15m" and "pgkd_cascade_teacher_share_target" in share["expr"], share["expr"]
    assert "[15m]" in recording_rules()["pgkd:cascade_teacher_share:rate15m"]


def test_promtool_test_rules_passes_and_covers_every_alert_firing_and_quiet():
    code, output = promtool("test", "rules", str(RULE_TESTS.relative_to(REPO)))
    assert code == 0, output
    assert "SUCCESS" in output and "FAILED" not in output, output

    suite = load_yaml(RULE_TESTS)
    assert [(RULE_TESTS.parent / f).resolve() for f in suite["rule_files"]] == [RULES]
    firing, quiet = set(), set()
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS, f"alerts never shown firing: {ALERTS - firing}"
    assert quiet == ALERTS, f"alerts never shown quiet: {ALERTS - quiet}"


def test_promtool_rejects_a_broken_rule_and_a_wrong_expectation(tmp_path):
    """The promtool checks above can fail."""
    broken = load_yaml(RULES)
    broken["groups"][0]["rules"][0]["expr"] = "sum(rate(pgkd_teacher_errors_total[10m])"
    (tmp_path / "broken.rules.yml").write_text(yaml.safe_dump(broken))
    code, output = promtool("check", "rules", str(tmp_path / "broken.rules.yml"))
    assert code != 0 and "FAILED" in output, output

    # The real rules, one expectation turned around: PgkdServiceDown said not to fire when it does.
    suite = load_yaml(RULE_TESTS)
    suite["rule_files"] = [str(RULES)]
    wrong = copy.deepcopy(suite)
    checks = [check for case in wrong["tests"] for check in case.get("alert_rule_test", [])
              if check["alertname"] == "PgkdServiceDown" and check.get("exp_alerts")]
    assert checks
    checks[0]["exp_alerts"] = []
    (tmp_path / "right.test.yml").write_text(yaml.safe_dump(suite))
    (tmp_path / "wrong.test.yml").write_text(yaml.safe_dump(wrong))
    code, output = promtool("test", "rules", str(tmp_path / "right.test.yml"))
    assert code == 0, output   # the copy itself is fine: only the changed expectation fails
    code, output = promtool("test", "rules", str(tmp_path / "wrong.test.yml"))
    assert code != 0 and "FAILED" in output and "PgkdServiceDown" in output, output


# ------------------------------------------------------------------------------ a real Prometheus server

def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A Prometheus on a free loopback port, with nothing to scrape and the rules loaded (evaluated every
    second); stopped at the end of the module. Yields the base URL."""
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"evaluation_interval": "1s"}, "rule_files": [str(RULES)]}))
    port = free_port()
    log = open(folder / "prometheus.log", "w+b")
    process = processes.spawn(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"prometheus not ready after 30 s:\n{log.read().decode(errors='replace')}")
            time.sleep(0.1)
        yield base
    finally:
        processes.stop(process, timeout=10)
        log.close()


def query(base: str, expr: str) -> tuple[int, dict]:
    return get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")


def test_prometheus_accepts_every_expression_of_the_rules_and_the_dashboard(prometheus):
    found = expressions()
    assert len(found) > len(rules()) + 20, "the dashboard's expressions were not all collected"
    rejected = []
    for where, expr in found:
        status, body = query(prometheus, expr)
        if status != 200 or body.get("status") != "success":
            rejected.append(f"{where}: {expr!r}: {status} {body.get('error')}")
    assert not rejected, "\n".join(rejected)


def test_prometheus_rejects_a_broken_expression(prometheus):
    """The check above can fail: a real parser answers, not a stub."""
    for broken in ('sum(rate(pgkd_dead_letters_total[15m])',          # unclosed
                   "rate(pgkd_dead_letters_total)",                    # a range vector function on an instant vector
                   'max by (run) (pgkd_best_score{run="$run"}) > > 1',  # a doubled operator
                   "histogram_quantile(0.9, pgkd_teacher_latency_seconds_bucket[5m])"):
        status, body = query(prometheus, broken)
        assert status == 400 and body["status"] == "error" and body["errorType"] == "bad_data", (broken, body)
    status, body = query(prometheus, "up")
    assert status == 200 and body["status"] == "success"


def test_the_run_variable_lists_label_values_from_prometheus(prometheus):
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "run"]
    match = LABEL_VALUES.fullmatch(variable_query(variable).strip())
    assert (match["selector"], match["label"]) == ("pgkd_last_cycle", "run")
    # What Grafana asks Prometheus for label_values(selector, label).
    status, body = get(f"{prometheus}/api/v1/label/run/values?"
                       f"{urllib.parse.urlencode({'match[]': match['selector']})}")
    assert status == 200 and body["status"] == "success", body


def test_prometheus_loads_and_evaluates_every_rule(prometheus):
    deadline = time.monotonic() + 20
    while True:
        status, body = get(f"{prometheus}/api/v1/rules")
        assert status == 200 and body["status"] == "success", body
        loaded = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        evaluated = [rule for rule in loaded if not rule["lastEvaluation"].startswith("0001-")]
        if len(evaluated) == len(rules()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(rule["name"] for rule in loaded) == sorted(r.get("record") or r.get("alert") for r in rules())
    assert len(evaluated) == len(rules()), "not every rule was evaluated within 20 s"
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
    assert not unhealthy


# ------------------------------------------------------------------------------------- names and labels

def test_every_metric_and_label_in_the_rules_and_the_dashboard_is_exported():
    names = set()
    problems = []
    for where, expr in expressions():
        metrics, _ = references(expr)
        names |= metrics.keys()
        problems += [f"{where}: {problem}" for problem in reference_problems(expr)]
    assert not problems, "\n".join(problems)
    # Not vacuous: the expressions do name the loop's, the teacher's and the services' metrics.
    assert {"pgkd_validation_score", "pgkd_last_cycle_timestamp_seconds", "pgkd_run_stopped",
            "pgkd_teacher_latency_seconds_bucket", "pgkd_dead_letters_total", "up",
            "faststream_received_processed_messages_total", "pgkd:teacher_error_ratio:rate10m"} <= names
    # and the stream's (ingest).
    assert {"pgkd_ingest_messages_total", "pgkd_ingest_rejected_total", "pgkd_stream_samples",
            "pgkd_stream_new_samples", "pgkd_stream_window_accuracy", "pgkd_stream_reference_accuracy",
            "pgkd_stream_runs_triggered_total", "pgkd_stream_decisions_total"} <= names
    # and the served cascade's.
    assert {"pgkd_cascade_texts_total", "pgkd_cascade_deferred_total", "pgkd_cascade_fallbacks_total",
            "pgkd_cascade_disagreements_total", "pgkd_cascade_teacher_calls_total",
            "pgkd_cascade_teacher_latency_seconds_bucket", "pgkd_cascade_request_latency_seconds_bucket",
            "pgkd_cascade_threshold", "pgkd_cascade_teacher_share_target", "pgkd_cascade_labels_total",
            "pgkd:cascade_teacher_share:rate15m"} <= names


def test_the_name_check_can_fail():
    assert references('sum by (run) (rate(pgkd_x_total{run="a", kind=~"b|c"}[5m] offset 1h30m)) '
                      '/ on(run) group_left(metric) pgkd_y * 1e3 > bool 0.2 unless foo:bar:rate5m') == (
        {"pgkd_x_total": {"run", "kind"}, "pgkd_y": set(), "foo:bar:rate5m": set()},
        {"run", "metric"})
    assert reference_problems("pgkd_not_exported_total") == [
        "pgkd_not_exported_total is not exported by the services, nor up, nor a recording rule"]
    assert reference_problems('pgkd_validation_score{runn="a"}') == [
        "pgkd_validation_score{runn=...}: pgkd_validation_score has no label runn"]
    assert reference_problems("sum by (reason) (pgkd_teacher_errors_total)") == [
        "groups by reason, which none of ['pgkd_teacher_errors_total'] carries"]
    assert reference_problems('sum by (kind) (rate(pgkd_teacher_errors_total{service="generator"}[5m]))') == []
    with pytest.raises(AssertionError, match="no test value"):
        substitute('pgkd_last_cycle{run="$nosuchvariable"}')


# --------------------------------------------------------------------------------------------- Grafana

def test_grafana_provisions_the_dashboard_folder():
    config = load_yaml(DASHBOARD_PROVISIONING)
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARD_MOUNT
    assert DASHBOARD.is_file()
    for path in DASHBOARD.parent.iterdir():   # the provider loads every file there
        assert path.suffix == ".json" and json.loads(path.read_text(encoding="utf-8"))["uid"], path.name


def test_dashboard_shows_a_run_with_the_prometheus_datasource():
    board = dashboard()
    assert board["title"] == "PGKD runs" and board["uid"]
    (variable,) = board["templating"]["list"]
    assert variable["name"] == "run" and variable["type"] == "query"
    assert variable["datasource"] == {"type": "prometheus", "uid": "prometheus"}
    assert variable_query(variable) == "label_values(pgkd_last_cycle, run)"

    panels = all_panels(board["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
    # The selected run's panels use it.
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    for metric in ("pgkd_validation_score", "pgkd_best_score", "pgkd_cycles_since_improvement", "pgkd_run_stopped",
                   "pgkd_run_teacher_tokens", "pgkd_train_loss", "pgkd_train_samples_per_second"):
        assert any(re.search(rf'{metric}\{{run="\$run"\}}', e) for e in exprs), metric
    # The stream's, serving's and the cascade's panels under rows of their own, not limited to the selected run.
    row_at = {panel["title"]: panel["gridPos"]["y"] for panel in panels if panel["type"] == "row"}
    assert list(row_at)[-3:] == ["Stream (ingest)", "Serving (student server, deployers)", "Cascade"], list(row_at)
    stream_panels = [panel for panel in panels if panel["type"] != "row" and row_at["Stream (ingest)"] <
                     panel["gridPos"]["y"] < row_at["Serving (student server, deployers)"]]
    serving_panels = [panel for panel in panels if panel["type"] != "row" and row_at[
                      "Serving (student server, deployers)"] < panel["gridPos"]["y"] < row_at["Cascade"]]
    cascade_panels = [panel for panel in panels if panel["gridPos"]["y"] > row_at["Cascade"]]
    assert len(stream_panels) == 5 and len(serving_panels) == 1 and len(cascade_panels) == 8 and all(
        "$run" not in target["expr"]
        for panel in stream_panels + serving_panels + cascade_panels for target in panel["targets"])
    assert "pgkd_serving_promotions_total" in str(serving_panels[0]["targets"])
    cascade_exprs = " ".join(target["expr"] for panel in cascade_panels for target in panel["targets"])
    for metric in ("pgkd_cascade_texts_total", "pgkd_cascade_teacher_calls_total",
                   "pgkd_cascade_teacher_latency_seconds_bucket", "pgkd_cascade_fallbacks_total",
                   "pgkd_cascade_disagreements_total", "pgkd_cascade_threshold", "pgkd_cascade_labels_total"):
        assert metric in cascade_exprs, metric
