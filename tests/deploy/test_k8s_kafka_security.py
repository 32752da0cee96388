"""The secured cluster on Kubernetes: a Strimzi KafkaUser per service whose ACLs are exactly what the
service consumes and publishes (read from the code, so they cannot drift apart; the deployer's consumer
group, one per student server replica, as a prefix), one for the cascade (it publishes the teacher labels it
reads from its module, and consumes nothing), the TLS files mounted where the ConfigMap's PGKD_KAFKA_*
point (the deployer's and the cascade's in their containers of the student server pod), and the NetworkPolicies.
The manifests themselves are validated with the others (test_deploy.test_manifest_is_valid: the KafkaUsers against
Strimzi's vendored CRD).
"""
from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
import typing

import pytest
from pgkd.distributed import steps
from pgkd.distributed.messages import (
    MESSAGES,
    DeadLetter,
    LabeledSample,
    Message,
    RunCompleted,
    RunRequested,
)
from pgkd.stream.stream import StreamStep
from pgkd_services import ALL, consumer_groups
from pgkd_services.deployer import DeployerService, ServingSettings
from pgkd_services.kafka_security import VARIABLES, KafkaSecurity
from pgkd_services.runtime import Settings
from test_deploy import (
    CASCADE,
    K8S_VERSIONS,
    SERVICES,
    STUDENT_DEPLOYMENT,
    TEACHER_MODEL_NAME,
    TOPIC_PREFIX,
    cascade_options,
    container_named,
    containers,
    k8s_doc,
    k8s_docs,
    validate_manifest,
)

CLUSTER = "pgkd"
# The services that run as a sidecar in another Deployment: name -> (Deployment, container).
SIDECARS = {"deployer": (STUDENT_DEPLOYMENT, "deployer")}
# Kafka clients that are not services (pgkd_services.ALL) and run in another Deployment: the cascade
# (`pgkd cascade serve --publish-labels`, pgkd_services.cascade) in the student server's pods.
PUBLISHERS = {CASCADE: (STUDENT_DEPLOYMENT, CASCADE)}
# A consumer group the code names per replica: consumer_groups() builds it with this placeholder.
REPLICA = "REPLICA"


def workload_container(name: str) -> tuple[dict, dict]:
    """The workload a service (or the commands' Job, `cli`) runs in, and its container."""
    if name == "cli":
        workload = k8s_doc("Job", "pgkd-submit")
        (container,) = containers(workload)
    elif name in SIDECARS or name in PUBLISHERS:
        deployment, container_name = {**SIDECARS, **PUBLISHERS}[name]
        workload = k8s_doc("Deployment", deployment)
        container = container_named(workload, container_name)
    else:
        workload = k8s_doc("Deployment", f"pgkd-{name}")
        (container,) = containers(workload)
    return workload, container


def message_types(annotation) -> set[type[Message]]:
    """The Message classes named by a return annotation (`A | B`, `list[A]`)."""
    found = set()
    for part in (typing.get_args(annotation) or (annotation,)):
        if isinstance(part, type) and issubclass(part, Message):
            found.add(part)
        elif typing.get_args(part):
            found |= message_types(part)
    return found


def constructed_messages(function) -> set[type[Message]]:
    """The Message classes a function builds (`StudentPromoted(...)`), read from its source."""
    tree = ast.parse(inspect.getsource(function))
    by_name = {message.__name__: message for message in MESSAGES}
    return {by_name[node.func.id] for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in by_name}


def published_by(name: str) -> set[str]:
    """The topics a service publishes, read from its module: what the engine steps it calls return (their
    return annotations; for a step without one, which passes its argument
    through, the messages it builds), what the stream steps it applies ask for (StreamStep.publish),
    RunCompleted when it consumes through Service.consume (a failed step ends its run), and the dead-letter
    topic (every service parks there the messages it cannot take, decoded or not)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(f"pgkd_services.{name}")))
    attributes = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    published: set[type] = set()
    for node in attributes:
        if isinstance(node.value, ast.Name) and node.value.id == "steps" and callable(getattr(steps, node.attr, None)):
            step = getattr(steps, node.attr)
            returned = typing.get_type_hints(step).get("return")
            published |= message_types(returned) if returned is not None else constructed_messages(step)
        if node.attr == "publish" and isinstance(node.value, ast.Name) and node.value.id == "step":
            published |= message_types(typing.get_type_hints(StreamStep)["publish"])
    if any(node.attr == "consume" for node in attributes):
        published.add(RunCompleted)
    if any(node.attr in ("consume", "subscribe", "dead_letter", "park") for node in attributes):
        published.add(DeadLetter)
    return {TOPIC_PREFIX + message.topic for message in published}


def consumed_by(tmp_path) -> dict[str, set[str]]:
    """group -> the topics its service subscribes to, from the services as they are built."""
    settings = Settings(broker_url="kafka://127.0.0.1:9092", artifacts=f"file://{tmp_path}", topic_prefix=TOPIC_PREFIX)
    return {group: set(topics) for group, topics in consumer_groups(settings).items()}


def acls(user: dict) -> set[tuple[str, str, str]]:
    """(resource type, name, operation) of every rule of a KafkaUser; only allow rules are expected, literal
    ones, but for prefix rules on groups, given as the prefix followed by `*`."""
    rules = set()
    for rule in user["spec"]["authorization"]["acls"]:
        resource = rule["resource"]
        pattern = resource.get("patternType", "literal")
        assert rule.get("type", "allow") == "allow" and pattern in ("literal", "prefix"), rule
        assert pattern == "literal" or resource["type"] == "group", rule     # topics are always named in full
        assert "host" not in rule and "operation" not in rule, rule
        name = resource["name"] + ("*" if pattern == "prefix" else "")
        rules |= {(resource["type"], name, operation) for operation in rule["operations"]}
    return rules


def group_rule(group: str) -> str:
    """A service's consumer group as its KafkaUser names it: the group itself, or for a group named per
    replica (built with the placeholder REPLICA) the prefix before the replica's name, followed by `*`."""
    return group.removesuffix(REPLICA) + "*" if group.endswith(REPLICA) else group


def test_the_derivation_reads_what_the_services_do():
    """An anchor for the two readers above: the loop as the README draws it, and the promotions to serving."""
    assert published_by("trainer") == {"pgkd.model-trained", "pgkd.run-completed", "pgkd.dead-letter"}
    assert published_by("ingest") == {"pgkd.run-requested", "pgkd.student-promoted", "pgkd.dead-letter"}
    assert published_by("evaluator") == {"pgkd.cycle-evaluated", "pgkd.run-completed", "pgkd.dead-letter"}
    assert published_by("generator") == {"pgkd.samples-generated", "pgkd.teacher-stopped", "pgkd.run-completed",
                                         "pgkd.dead-letter"}
    assert published_by("deployer") == {"pgkd.dead-letter"}


def test_the_deployers_group_is_one_per_replica_under_one_prefix(tmp_path):
    """Every replica in a group of its own (each deploys every promotion), all under the prefix of its ACL."""
    settings = Settings(broker_url="kafka://127.0.0.1:9092", artifacts=f"file://{tmp_path}", topic_prefix=TOPIC_PREFIX)
    groups = {replica: DeployerService(ServingSettings(tmp_path / "models", replica=replica), settings=settings).group
              for replica in ("pgkd-student-server-7d9c5b-x2x4q", "pgkd-student-server-7d9c5b-k8r2n", "compose")}
    assert len(set(groups.values())) == len(groups)
    (rule,) = [name for kind, name, _ in acls(k8s_doc("KafkaUser", "pgkd-deployer")) if kind == "group"]
    assert rule.endswith("*")
    for replica, group in groups.items():
        assert group == rule.removesuffix("*") + replica


def test_each_service_reads_only_what_it_consumes_and_writes_only_what_it_publishes(tmp_path):
    consumed = consumed_by(tmp_path)
    assert set(ALL) == set(SERVICES) | set(SIDECARS)
    for name in ALL:
        user = k8s_doc("KafkaUser", f"pgkd-{name}")
        (group,) = [group for group in consumed if group.startswith(f"{TOPIC_PREFIX}{name}")
                    and group.removeprefix(f"{TOPIC_PREFIX}{name}") in ("", f".{REPLICA}")]
        expected = ({("topic", topic, "Read") for topic in consumed[group]} | {("group", group_rule(group), "Read")}
                    | {("topic", topic, "Write") for topic in published_by(name)})
        assert acls(user) == expected, name


def topics_named_by(module: str) -> set[str]:
    """The topics a module names: every `<Message>.topic` in its source (LabeledSample.topic)."""
    from pgkd.distributed import messages
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    # The bus's message classes, LabeledSample (the stream's input, not one of the loop's MESSAGES) included.
    by_name = {name: value for name, value in vars(messages).items()
               if isinstance(value, type) and isinstance(getattr(value, "topic", None), str)}
    assert {message.__name__ for message in (*MESSAGES, LabeledSample, DeadLetter)} <= set(by_name)
    return {TOPIC_PREFIX + by_name[node.value.id].topic for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "topic" and isinstance(node.value, ast.Name)
            and node.value.id in by_name}


def test_the_cascades_user_may_publish_the_teacher_labels_only():
    """`pgkd cascade serve --publish-labels` sends each teacher label to the stream's input topic (its
    LabelPublisher, kafka-python's producer as `pgkd send`), and consumes nothing."""
    named = topics_named_by("pgkd_services.cascade")
    assert named == {TOPIC_PREFIX + LabeledSample.topic}   # the anchor: what the cascade does
    _, container = workload_container(CASCADE)
    args = cascade_options(container["args"])
    assert args.publish_labels
    assert acls(k8s_doc("KafkaUser", f"pgkd-{CASCADE}")) == {("topic", topic, "Write") for topic in named}
    # The teacher it asks is the Service pgkd-teacher, which the NetworkPolicy pgkd-teacher must let it reach.
    assert args.teacher == f"triton://pgkd-teacher:8000/{TEACHER_MODEL_NAME}"


def test_the_commands_user_may_publish_runs_and_labeled_samples_only():
    """pgkd submit (RunRequested) and pgkd send (LabeledSample); topics come from the Topic Operator."""
    assert acls(k8s_doc("KafkaUser", "pgkd-cli")) == {("topic", TOPIC_PREFIX + RunRequested.topic, "Write"),
                                                      ("topic", TOPIC_PREFIX + LabeledSample.topic, "Write")}


def test_every_user_is_a_tls_identity_of_the_cluster_with_simple_authorization():
    users = k8s_docs("KafkaUser")
    assert {u["metadata"]["name"] for u in users} == \
        {f"pgkd-{name}" for name in (*SERVICES, *SIDECARS, *PUBLISHERS, "cli")}
    for user in users:
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == CLUSTER
        assert user["spec"]["authentication"] == {"type": "tls"}
        assert user["spec"]["authorization"]["type"] == "simple"
        for resource_type, name, operation in acls(user):      # no wildcard, no cluster rights
            assert resource_type in ("topic", "group") and name.startswith(TOPIC_PREFIX), name
            # A prefix only for groups, and never a bare pgkd. (all of pgkd's groups): pgkd.<service>.
            assert "*" not in name.removesuffix("*"), name
            if name.endswith("*"):
                assert resource_type == "group" and re.fullmatch(rf"{re.escape(TOPIC_PREFIX)}[a-z]+\.\*", name), name
            assert operation in ("Read", "Write")


def pod_files(pod: dict, container: dict) -> dict[str, tuple[str, str]]:
    """mounted file path -> (Secret, key), for the Secret volumes of a container."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            assert mount.get("readOnly") is True, mount
            for item in secret["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


@pytest.mark.parametrize("name", (*SERVICES, *SIDECARS, *PUBLISHERS, "cli"))
def test_each_pod_mounts_the_cluster_ca_and_its_own_certificate_where_the_configmap_points(name):
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    workload, container = workload_container(name)
    pod = workload["spec"]["template"]["spec"]
    assert {"configMapRef": {"name": "pgkd-config"}} in container["envFrom"]
    files = pod_files(pod, container)
    assert files[config["PGKD_KAFKA_CA_FILE"]] == (f"{CLUSTER}-cluster-ca-cert", "ca.crt")
    assert files[config["PGKD_KAFKA_CERT_FILE"]] == (f"pgkd-{name}", "user.crt")
    assert files[config["PGKD_KAFKA_KEY_FILE"]] == (f"pgkd-{name}", "user.key")
    # Allowed to the brokers by the listener's networkPolicyPeers (kafka-users.yaml).
    assert workload["spec"]["template"]["metadata"]["labels"]["pgkd.io/kafka-client"] == "true"


def test_the_configmap_sets_tls_with_client_certificates_for_the_tls_listener():
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    assert config["PGKD_BROKER_URL"] == f"kafka://{CLUSTER}-kafka-bootstrap:9093"
    settings = {k: v for k, v in config.items() if k.startswith("PGKD_KAFKA_")}
    assert set(settings) == {"PGKD_KAFKA_SECURITY_PROTOCOL", "PGKD_KAFKA_CA_FILE", "PGKD_KAFKA_CERT_FILE",
                             "PGKD_KAFKA_KEY_FILE"} and set(settings) <= set(VARIABLES)
    assert KafkaSecurity(protocol=settings["PGKD_KAFKA_SECURITY_PROTOCOL"]).uses_tls


def test_only_prometheus_reaches_the_services_and_the_generator_and_the_cascade_the_teacher():
    policies = {p["metadata"]["name"]: p["spec"] for p in k8s_docs("NetworkPolicy")}
    assert set(policies) == {"pgkd-services", "pgkd-teacher", STUDENT_DEPLOYMENT}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}

    services = policies["pgkd-services"]
    assert services["policyTypes"] == ["Ingress"]
    assert services["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pgkd"}
    (components,) = services["podSelector"]["matchExpressions"]
    assert (components["key"], components["operator"], set(components["values"])) == \
        ("app.kubernetes.io/component", "In", set(SERVICES))
    assert services["ingress"] == [{"from": [prometheus], "ports": [{"port": "metrics", "protocol": "TCP"}]}]
    for name in SERVICES:   # the named port is the one Prometheus scrapes
        (container,) = containers(k8s_doc("Deployment", f"pgkd-{name}"))
        assert {"name": "metrics", "containerPort": 9100} in container["ports"]

    teacher = policies["pgkd-teacher"]
    assert teacher["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pgkd",
                                                     "app.kubernetes.io/component": "teacher"}
    generator = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pgkd",
                                                 "app.kubernetes.io/component": "generator"}}}
    # The cascade asks the teacher from the student server's pods (a policy selects pods, not containers).
    student_server = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pgkd",
                                                      "app.kubernetes.io/component": "student-server"}}}
    assert student_server["podSelector"]["matchLabels"].items() <= \
        k8s_doc("Deployment", PUBLISHERS[CASCADE][0])["spec"]["template"]["metadata"]["labels"].items()
    assert teacher["ingress"] == [
        {"from": [generator, student_server],
         "ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]},
        {"from": [prometheus], "ports": [{"port": "metrics", "protocol": "TCP"}]}]


def test_clients_in_the_namespace_reach_the_student_server_and_the_cascade_and_only_prometheus_their_metrics():
    policy = k8s_doc("NetworkPolicy", STUDENT_DEPLOYMENT)["spec"]
    deployment = k8s_doc("Deployment", STUDENT_DEPLOYMENT)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "pgkd",
                                                     "app.kubernetes.io/component": "student-server"}}
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    # The other policies do not select these pods (a second policy would only add to this one).
    from test_k8s_monitoring import selects
    for other in k8s_docs("NetworkPolicy"):
        assert selects(other["spec"]["podSelector"], labels) == (other["metadata"]["name"] == STUDENT_DEPLOYMENT)
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    # Any pod of the namespace (no namespaceSelector: this one only) on HTTP and gRPC, Triton's and the
    # cascade's; Prometheus on the metrics ports of Triton, of the deployer and of the cascade.
    tcp = [{"port": port, "protocol": "TCP"} for port in ("http", "grpc", "cascade-http", "cascade-grpc")]
    assert policy["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": tcp},
        {"from": [prometheus], "ports": [{"port": port, "protocol": "TCP"}
                                         for port in ("metrics", "deploy-metrics", "cascade-metrics")]}]
    # The named ports are the pod's: Triton's 8000, 8001, 8002, the deployer's metrics port, and the cascade's
    # HTTP, gRPC and metrics ports (as `pgkd cascade serve` opens them).
    pod_ports = {port["name"]: port["containerPort"] for container in containers(deployment) for port in container["ports"]}
    cascade = cascade_options(container_named(deployment, CASCADE)["args"])
    assert pod_ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "deploy-metrics": 9100,
                         "cascade-http": cascade.http_port, "cascade-grpc": cascade.grpc_port,
                         "cascade-metrics": cascade.cascade_metrics_port}   # nothing left unlisted


def test_the_kafka_user_validator_rejects_broken_users():
    """The KafkaUser schema check can fail: an unknown authentication type, a misspelt field."""
    import jsonschema
    user = k8s_doc("KafkaUser", "pgkd-trainer")
    bad_type = copy.deepcopy(user)
    bad_type["spec"]["authentication"]["type"] = "scram-sha-256"     # Strimzi only has scram-sha-512
    misspelt = copy.deepcopy(user)
    misspelt["spec"]["authorization"]["acls"][0]["operatons"] = ["Read"]
    for broken in (bad_type, misspelt):
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(broken, K8S_VERSIONS[-1])
