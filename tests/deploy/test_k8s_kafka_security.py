"""The secured cluster on Kubernetes: a Strimzi KafkaUser per service whose ACLs are exactly what the
service consumes and publishes (read from the code, so they cannot drift apart), the TLS files mounted
where the ConfigMap's PGKD_KAFKA_* point, and the NetworkPolicies. The manifests themselves are validated
with the others (test_deploy.test_manifest_is_valid: the KafkaUsers against Strimzi's vendored CRD).
"""
from __future__ import annotations

import ast
import copy
import importlib
import inspect
import typing

import pytest
from pgkd.distributed import steps
from pgkd.distributed.messages import DeadLetter, LabeledSample, Message, RunCompleted, RunRequested
from pgkd.stream.stream import StreamStep
from pgkd_services import ALL, consumer_groups
from pgkd_services.kafka_security import VARIABLES, KafkaSecurity
from pgkd_services.runtime import Settings
from test_deploy import K8S_VERSIONS, SERVICES, TOPIC_PREFIX, containers, k8s_doc, k8s_docs, validate_manifest

CLUSTER = "pgkd"


def message_types(annotation) -> set[type[Message]]:
    """The Message classes named by a return annotation (`A | B`, `list[A]`)."""
    found = set()
    for part in (typing.get_args(annotation) or (annotation,)):
        if isinstance(part, type) and issubclass(part, Message):
            found.add(part)
        elif typing.get_args(part):
            found |= message_types(part)
    return found


def published_by(name: str) -> set[str]:
    """The topics a service publishes, read from its module: what the engine steps it calls return (their
    return annotations), what the stream steps it applies ask for (StreamStep.publish), RunCompleted when it
    consumes through Service.consume (a failed step ends its run), and the dead-letter topic (every
    service parks the messages it cannot take there)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(f"pgkd_services.{name}")))
    attributes = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    published: set[type] = set()
    for node in attributes:
        if isinstance(node.value, ast.Name) and node.value.id == "steps" and callable(getattr(steps, node.attr, None)):
            published |= message_types(typing.get_type_hints(getattr(steps, node.attr)).get("return"))
        if node.attr == "publish" and isinstance(node.value, ast.Name) and node.value.id == "step":
            published |= message_types(typing.get_type_hints(StreamStep)["publish"])
    if any(node.attr == "consume" for node in attributes):
        published.add(RunCompleted)
    if any(node.attr in ("consume", "dead_letter") for node in attributes):
        published.add(DeadLetter)
    return {TOPIC_PREFIX + message.topic for message in published}


def consumed_by(tmp_path) -> dict[str, set[str]]:
    """group -> the topics its service subscribes to, from the services as they are built."""
    settings = Settings(broker_url="kafka://127.0.0.1:9092", artifacts=f"file://{tmp_path}", topic_prefix=TOPIC_PREFIX)
    return {group: set(topics) for group, topics in consumer_groups(settings).items()}


def acls(user: dict) -> set[tuple[str, str, str]]:
    """(resource type, name, operation) of every rule of a KafkaUser; only literal allow rules are expected."""
    rules = set()
    for rule in user["spec"]["authorization"]["acls"]:
        resource = rule["resource"]
        assert rule.get("type", "allow") == "allow" and resource.get("patternType", "literal") == "literal", rule
        assert "host" not in rule and "operation" not in rule, rule
        rules |= {(resource["type"], resource["name"], operation) for operation in rule["operations"]}
    return rules


def test_the_derivation_reads_what_the_services_do():
    """An anchor for the two readers above: the loop as the README draws it."""
    assert published_by("trainer") == {"pgkd.model-trained", "pgkd.run-completed", "pgkd.dead-letter"}
    assert published_by("ingest") == {"pgkd.run-requested", "pgkd.dead-letter"}


def test_each_service_reads_only_what_it_consumes_and_writes_only_what_it_publishes(tmp_path):
    consumed = consumed_by(tmp_path)
    assert set(ALL) == set(SERVICES)
    for name in ALL:
        user = k8s_doc("KafkaUser", f"pgkd-{name}")
        group = f"{TOPIC_PREFIX}{name}"
        expected = ({("topic", topic, "Read") for topic in consumed[group]} | {("group", group, "Read")}
                    | {("topic", topic, "Write") for topic in published_by(name)})
        assert acls(user) == expected, name


def test_the_commands_user_may_publish_runs_and_labeled_samples_only():
    """pgkd submit (RunRequested) and pgkd send (LabeledSample); topics come from the Topic Operator."""
    assert acls(k8s_doc("KafkaUser", "pgkd-cli")) == {("topic", TOPIC_PREFIX + RunRequested.topic, "Write"),
                                                      ("topic", TOPIC_PREFIX + LabeledSample.topic, "Write")}


def test_every_user_is_a_tls_identity_of_the_cluster_with_simple_authorization():
    users = k8s_docs("KafkaUser")
    assert {u["metadata"]["name"] for u in users} == {f"pgkd-{name}" for name in (*SERVICES, "cli")}
    for user in users:
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == CLUSTER
        assert user["spec"]["authentication"] == {"type": "tls"}
        assert user["spec"]["authorization"]["type"] == "simple"
        for resource_type, name, operation in acls(user):      # no wildcard, no cluster rights
            assert resource_type in ("topic", "group") and name.startswith(TOPIC_PREFIX) and "*" not in name
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


@pytest.mark.parametrize("name", (*SERVICES, "cli"))
def test_each_pod_mounts_the_cluster_ca_and_its_own_certificate_where_the_configmap_points(name):
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    workload = k8s_doc("Job", "pgkd-submit") if name == "cli" else k8s_doc("Deployment", f"pgkd-{name}")
    pod = workload["spec"]["template"]["spec"]
    (container,) = containers(workload)
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


def test_only_prometheus_reaches_the_services_and_the_generator_the_teacher():
    policies = {p["metadata"]["name"]: p["spec"] for p in k8s_docs("NetworkPolicy")}
    assert set(policies) == {"pgkd-services", "pgkd-teacher"}
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
    assert teacher["ingress"] == [
        {"from": [generator], "ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]},
        {"from": [prometheus], "ports": [{"port": "metrics", "protocol": "TCP"}]}]


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
