"""Offline checks of the deployment files: nothing here needs docker, a cluster or the network.

- docker-compose.yml and deploy/compose.gpu.yml against the Compose Specification's JSON schema
  (vendored in tests/deploy/schemas/), then the facts the product relies on: one image, the commands, the
  shared volumes, the broker URL, Kafka in KRaft mode, Prometheus and Grafana wired to them, the Triton
  teacher (image, shared memory, Hugging Face cache, health check, profile), the student server and its
  deployer (profile `serving`: the student-server image, explicit model control, the shared model volume,
  the deployer's settings as the code parses them), the cascade in front of it (profile `serving`: its command
  as `pgkd cascade serve` parses it, the student server's model volume read-only, the policy file) and the GPU
  reservations.
- deploy/Dockerfile and its .dockerignore: the base image, user, environment, entry point, what the deployer
  imports, and a build context that holds what `pip install .` needs and nothing heavy; deploy/triton/Dockerfile:
  the Triton image, its model repository and command; deploy/triton/Dockerfile.student: the student server's
  Triton image, its packages, command and empty build context.
- every manifest under k8s/ against the Kubernetes OpenAPI schemas (kubernetes-validate, strict; the
  HorizontalPodAutoscaler too, a built-in kind), the Strimzi KafkaTopics and KafkaUsers against the vendored
  Strimzi CRD schemas, then the kustomization, the security settings, probes, resources, GPU placement,
  Services and topics, for the five pgkd services (ingest: one replica, and the PGKD_STREAM_* configuration)
  and, with their own expectations, the Triton teacher and the student server (Triton and the deployer
  sidecar in one pod, Triton's endpoints as probes, the autoscaler on Triton's CPU, the GPU Component
  k8s/student-gpu/ rendered with kustomize), and the cascade: a third container of the student server's pods
  (it reads the calibrations from their per-pod model repository), its Service, and its policy ConfigMap
  mounted as a folder (k8s/cascade.yaml); compose and Kubernetes run it alike. The opt-in monitoring component
  k8s/monitoring/ (Prometheus Operator kinds) is tests/deploy/test_k8s_monitoring.py's; the Kafka users and
  network policies are tests/deploy/test_k8s_kafka_security.py's.
- test_the_validators_reject_broken_documents: the validators above do fail on broken documents, so a
  passing run means something.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S = REPO / "k8s"
# A kustomize Component that users opt into, with the Prometheus Operator's kinds: tests/deploy/test_k8s_monitoring.py.
K8S_MONITORING = K8S / "monitoring"
# A kustomize Component that users opt into: the student server on GPU nodes (tested here).
K8S_STUDENT_GPU = K8S / "student-gpu"
K8S_COMPONENTS = (K8S_MONITORING, K8S_STUDENT_GPU)
COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "deploy" / "compose.gpu.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
TEACHER_DOCKERFILE = REPO / "deploy" / "triton" / "Dockerfile"
TEACHER_MODELS = REPO / "deploy" / "triton" / "models"
STUDENT_DOCKERFILE = REPO / "deploy" / "triton" / "Dockerfile.student"
STUDENT_DOCKERIGNORE = REPO / "deploy" / "triton" / "Dockerfile.student.dockerignore"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

SERVICES = ("trainer", "evaluator", "miner", "generator", "ingest")
TOPIC_PREFIX = "pgkd."
TOPICS = tuple(TOPIC_PREFIX + name for name in (
    "run-requested", "model-trained", "cycle-evaluated", "negatives-mined", "samples-generated", "teacher-stopped",
    "run-completed", "student-promoted", "labeled-samples", "dead-letter"))
# ingest's configuration (pgkd.stream.StreamSettings) and its defaults, as the deploy files spell them; the
# base run has none (it is set once, before a stream first starts).
STREAM_DEFAULTS = {
    "PGKD_STREAM": "default", "PGKD_STREAM_BASE_RUN": "", "PGKD_STREAM_TRIGGER_COUNT": "500",
    "PGKD_STREAM_DRIFT_WINDOW": "200", "PGKD_STREAM_DRIFT_MARGIN": "0.1", "PGKD_STREAM_VALIDATION_PERCENT": "20",
    "PGKD_STREAM_NEW_LABELS": "reject", "PGKD_STREAM_MIN_CHARS": "1", "PGKD_STREAM_MAX_CHARS": "2000",
    "PGKD_STREAM_SERVING_MODEL": "student", "PGKD_STREAM_DRIFT_REFERENCE_WINDOWS": "3", "PGKD_STREAM_RUN": "",
    "PGKD_STREAM_SETTINGS_FILE": "", "PGKD_STREAM_SEGMENT_SAMPLES": "10000", "PGKD_STREAM_BATCH_MAX": "500",
    "PGKD_STREAM_BATCH_SECONDS": "0.2", "PGKD_STREAM_MAX_TEACHER_LABEL_SHARE": "0.5",
}
# Where the deploy files differ from the code's defaults, on purpose: the stream's settings file they mount.
STREAM_MOUNTED = {"PGKD_STREAM_SETTINGS_FILE": "/etc/pgkd/stream/stream.yaml"}
# The stream's state has one writer: ingest runs as one container / pod, never two at once.
SINGLE_WRITERS = ("ingest",)
METRICS_PORT = 9100
UID = 10001
IMAGE = "pgkd"

# The teacher LLM: NVIDIA Triton (deploy/triton), its own image, run as the image's non-root user
# triton-server (uid 1000), reached by runs as triton://HOST:8000/teacher.
TEACHER_IMAGE = "pgkd-teacher"
TEACHER_UID = 1000
TEACHER_MODEL_NAME = "teacher"
TEACHER_DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TRITON_COMMAND = ["tritonserver", "--model-repository=/models"]
# The deployments that run on a GPU (one each), in compose (deploy/compose.gpu.yml) and Kubernetes. The student
# server runs on one only when asked: deploy/compose.gpu.yml in compose, the Component k8s/student-gpu/.
GPU_SERVICES = ("trainer", "teacher")
COMPOSE_GPU_SERVICES = GPU_SERVICES + ("student-server",)

# The student server: NVIDIA Triton (deploy/triton/Dockerfile.student) serving the model `student`
# (pgkd.serving.repository.MODEL_NAME) with explicit model control, and the deployer (`pgkd service deployer`,
# the one pgkd image) that writes its model repository and has it load each promoted student. In compose
# two services sharing the volume student-models; on Kubernetes one Deployment, the deployer a sidecar.
STUDENT_IMAGE = "pgkd-student-server"
STUDENT_SERVER = "student-server"             # the compose service, the k8s component label
STUDENT_DEPLOYMENT = "pgkd-student-server"
STUDENT_UID = 1000                            # the Triton image's triton-server, as the teacher
STUDENT_MODEL_REPOSITORY = "/models"
STUDENT_VOLUME = "student-models"
SERVING_PROFILE = "serving"

# The cascade (`pgkd cascade serve`, pgkd_services.cascade): the Triton model `cascade` (PyTriton, in the one pgkd
# image) in front of the student server, the student answering what it is sure of and the teacher LLM the rest.
# In compose a service of the profile `serving`, reading the student server's volume; on Kubernetes a third
# container of the student server's pods (their model repository is a per-pod emptyDir, which only containers
# of the pod can mount), with a Service and a policy ConfigMap of its own (k8s/cascade.yaml).
CASCADE = "cascade"                           # the compose service, the k8s container and component label
CASCADE_SERVICE = "pgkd-cascade"
CASCADE_POLICY = "pgkd-cascade-policy"        # the ConfigMap holding its --policy-file
CASCADE_POLICY_FILE = REPO / "deploy" / "cascade" / "policy.json"
# The variable of `docker compose`'s environment that names another teacher (a compose default, not a setting).
CASCADE_TEACHER_VARIABLE = "PGKD_CASCADE_TEACHER"

# kubernetes-validate takes the target Kubernetes version as a string such as "1.30.0" (a leading "v" is
# dropped) and validates against the newest schemas it bundles for a version not newer than that one
# (kubernetes-validate 1.37 bundles 1.25 to 1.37; an unknown newer version is an error). Two targets: the
# oldest Kubernetes these manifests are meant for, and the newest the installed package knows.
K8S_VERSIONS = tuple(dict.fromkeys(("1.30.0", kubernetes_validate.latest_version())))


# ---------------------------------------------------------------------------------------------- helpers

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@cache
def compose() -> dict:
    return load_yaml(COMPOSE)


# jsonschema recognises the drafts by their http://json-schema.org/... ids only; the compose schema names
# its draft as https://json-schema.org/draft-07/schema, which jsonschema would not recognise and would
# validate with the latest draft instead (with a DeprecationWarning). So the draft is read from the name.
DRAFTS = {
    "draft-04": jsonschema.Draft4Validator,
    "draft-06": jsonschema.Draft6Validator,
    "draft-07": jsonschema.Draft7Validator,
    "2019-09": jsonschema.Draft201909Validator,
    "2020-12": jsonschema.Draft202012Validator,
}


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    declared = [cls for draft, cls in DRAFTS.items() if draft in schema["$schema"]]
    assert len(declared) == 1, f"unknown draft {schema['$schema']!r}"
    declared[0].check_schema(schema)
    return declared[0](schema)


def schema_errors(validator: jsonschema.protocols.Validator, document) -> list[str]:
    return sorted(f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
                  for error in validator.iter_errors(document))


SHORT_VOLUME = re.compile(r"(?P<source>\$\{[^}]*\}[^:]*|[^:]+)(?::(?P<target>[^:]+))?(?::(?P<mode>[^:]+))?")


def compose_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from the short (SOURCE:TARGET[:MODE]) or the long volume syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only", False)))
            continue
        # The source may be ${VAR:-default}, which holds a colon itself.
        match = SHORT_VOLUME.fullmatch(volume)
        assert match, f"cannot parse volume {volume!r}"
        if match["target"] is None:  # anonymous volume: only a target
            mounts[match["source"]] = ("", False)
        else:
            mounts[match["target"]] = (match["source"], "ro" in (match["mode"] or "").split(","))
    return mounts


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def pgkd_image_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if svc.get("image", "").split(":")[0] == IMAGE}


def manifest_paths() -> list[Path]:
    """The base's manifests: not those of the components (monitoring, student-gpu)."""
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"} and p.name != "kustomization.yaml"
                  and not any(component in p.parents for component in K8S_COMPONENTS))


@cache
def k8s_documents() -> tuple[tuple[str, dict], ...]:
    return tuple((path.relative_to(K8S).as_posix(), doc) for path in manifest_paths() for doc in load_yaml_all(path))


def k8s_doc(kind: str, name: str) -> dict:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def k8s_docs(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


def containers(deployment: dict) -> list[dict]:
    pod = deployment["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def quantity(value) -> float:
    """A Kubernetes resource quantity as a number (cpu in cores, memory in bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * (units[unit] if unit else 1)


# Strimzi's KafkaTopic and KafkaUser are custom resources: kubernetes-validate bundles only the built-in kinds
# and raises SchemaNotFoundError for them. They are validated instead against the openAPIV3Schema of Strimzi's
# own CRDs (vendored, see tests/deploy/schemas/README.md), made strict the way kubernetes-validate's schemas are.
STRIMZI_CRDS = {"KafkaTopic": "strimzi-kafkatopic-crd.yaml", "KafkaUser": "strimzi-kafkauser-crd.yaml"}


@cache
def crd_schema(api_version: str, kind: str) -> dict:
    assert kind in STRIMZI_CRDS, f"no vendored CRD for {kind}"
    crd = load_yaml(SCHEMAS / STRIMZI_CRDS[kind])
    group, version = api_version.split("/")
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind), f"no vendored CRD for {kind}"
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    assert served, f"{kind} {api_version} is not a served version of the vendored CRD"
    return strict_schema(served[0]["schema"]["openAPIV3Schema"])


def strict_schema(schema: dict) -> dict:
    """Reject unknown fields, like the API server's strict field validation: every object schema that lists
    its properties gets additionalProperties: false, unless it keeps unknown fields on purpose
    (x-kubernetes-preserve-unknown-fields, e.g. the topic's free-form `config`)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(schema)
    return schema


def validate_manifest(doc: dict, version: str) -> None:
    """Raises jsonschema.ValidationError (kubernetes_validate.ValidationError is one) if doc is invalid."""
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    if group == "kafka.strimzi.io":
        # An OpenAPI 3.0 schema object: draft 4 is the closest JSON Schema draft. x-kubernetes-* are ignored.
        jsonschema.Draft4Validator(crd_schema(doc["apiVersion"], doc["kind"])).validate(doc)
        # The CRD says only `metadata: {type: object}`; the API server checks it as an ObjectMeta. Same
        # check here through a built-in kind that has nothing but metadata.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     version, strict=True)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    instructions, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_args(path: Path) -> dict[str, str]:
    """ARG name -> its default ("" when it has none)."""
    args = {}
    for keyword, arguments in dockerfile_instructions(path):
        if keyword == "ARG":
            name, _, default = shlex.split(arguments)[0].partition("=")
            args[name] = default
    return args


def dockerfile_resolved(path: Path) -> list[tuple[str, str]]:
    """The instructions with ${ARG} replaced by the ARG defaults, the way `docker build` without --build-arg
    sees the file."""
    args = dockerfile_args(path)
    return [(keyword, re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], arguments))
            for keyword, arguments in dockerfile_instructions(path)]


def duration_seconds(value: str) -> float:
    """A compose duration (`1m30s`, `30m`, `500ms`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"([0-9.]+)(ms|us|h|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def compose_bytes(value) -> int:
    """A compose byte size (`2gb`, `512m`, `1024k`, or a number of bytes) in bytes."""
    number, unit = re.fullmatch(r"([0-9]+)([bkmg]?)b?", str(value).lower()).groups()
    return int(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def env_vars(container: dict) -> dict[str, dict]:
    """name -> the container's `env` entry."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def container_named(deployment: dict, name: str) -> dict:
    (found,) = [c for c in containers(deployment) if c["name"] == name]
    return found


def compose_default(value) -> str:
    """A compose value with its `${NAME:-default}` parts replaced by their defaults (an environment of
    `docker compose` that sets none of them)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def student_command() -> list[str]:
    """The student server's command: Triton on the model repository, under the explicit model control that
    pgkd runs Triton with (pgkd.serving.server.explicit_control: load `student` at start, then through the
    repository API), kept up while the repository is still empty."""
    from pgkd.serving.repository import MODEL_NAME
    from pgkd.serving.server import explicit_control
    return ["tritonserver", f"--model-repository={STUDENT_MODEL_REPOSITORY}", *explicit_control(MODEL_NAME),
            "--exit-on-error=false"]


def student_model() -> str:
    from pgkd.serving.repository import MODEL_NAME
    return MODEL_NAME


def cascade_options(argv: list[str]):
    """`argv` (the pgkd image's arguments: `cascade serve ...`) as `pgkd cascade serve` parses them: an unknown
    option, a missing required one or a bad host is SystemExit, as it would be at start."""
    import argparse

    from pgkd_services.cascade import register
    parser = argparse.ArgumentParser(prog="pgkd")
    register(parser.add_subparsers(dest="command", required=True))
    options = parser.parse_args(argv)
    assert (options.command, options.cascade_command) == ("cascade", "serve"), argv
    return options


def cascade_model() -> str:
    from pgkd.serving.cascade_server import MODEL_NAME
    return MODEL_NAME


def read_policy(text: str, tmp_path: Path):
    """A policy file's text as the cascade reads it (pgkd.serving.cascade.read_policy_file)."""
    from pgkd.serving.cascade import read_policy_file
    path = tmp_path / "policy.json"
    path.write_text(text, encoding="utf-8")
    return read_policy_file(path)


class RecordingEnv(dict):
    """An environment that remembers which variables were read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def serving_settings(env: dict):
    """The deployer's settings (pgkd_services.deployer.ServingSettings) as it reads them from `env`."""
    from pgkd_services.deployer import ServingSettings
    return ServingSettings.from_env(env)


@cache
def serving_variables() -> frozenset[str]:
    """Every PGKD_SERVING_* variable the deployer reads: those ServingSettings.from_env asks for."""
    env = RecordingEnv({"PGKD_SERVING_REPOSITORY": STUDENT_MODEL_REPOSITORY})
    serving_settings(env)
    return frozenset(env.read)


def dockerignore_excludes(path: str, dockerignore: Path = DOCKERIGNORE) -> bool:
    """Whether the build context leaves `path` out: the part of .dockerignore semantics used here (the last
    matching pattern wins, `!` re-includes, a pattern matching a parent folder matches what is inside it)."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    excluded = False
    for line in dockerignore.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = regex(line.lstrip("!").strip("/"))
        if any(pattern.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------------------- docker compose

def test_compose_file_matches_the_compose_specification():
    assert "version" not in compose(), "the top-level version key is obsolete"
    assert schema_errors(compose_validator(), compose()) == []


def test_gpu_override_matches_the_specification_and_reserves_one_gpu_for_the_trainer_teacher_and_student():
    override = load_yaml(GPU_OVERRIDE)
    assert schema_errors(compose_validator(), override) == []
    assert set(override["services"]) == set(COMPOSE_GPU_SERVICES) | {"deployer"}
    reservation = {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
    for name in override["services"]:
        assert name in compose()["services"], f"the override names {name}, which the base file lacks"
    for name in GPU_SERVICES:
        # Only the reservation: everything else comes from the base file.
        assert override["services"][name] == {"deploy": reservation}, name
    # The student server: the reservation, and its image built with ONNX Runtime's CUDA provider (an ARG of
    # Dockerfile.student, merged into the base file's build); its deployer writes a GPU instance.
    assert override["services"][STUDENT_SERVER] == {"deploy": reservation,
                                                     "build": {"args": {"ONNXRUNTIME": "onnxruntime-gpu"}}}
    assert "ONNXRUNTIME" in dockerfile_args(STUDENT_DOCKERFILE)
    assert override["services"]["deployer"] == {"environment": {"PGKD_SERVING_GPU": "1"}}
    assert "PGKD_SERVING_GPU" not in compose()["services"]["deployer"]["environment"]
    gpu_env = {**compose()["services"]["deployer"]["environment"], **override["services"]["deployer"]["environment"]}
    assert serving_settings({k: compose_default(v) for k, v in gpu_env.items()}).gpu is True
    # The base file must run without a GPU: no device reservation or gpus anywhere in it.
    for name, service in compose()["services"].items():
        assert "gpus" not in service and "devices" not in str(service.get("deploy", {})), name


@pytest.mark.parametrize("name", SERVICES)
def test_compose_runs_each_service_from_the_one_image(name):
    service = compose()["services"][name]
    assert service["image"] == f"{IMAGE}:latest"
    assert service["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert service["command"] == ["service", name]
    assert "entrypoint" not in service  # the image's ENTRYPOINT ["pgkd"]
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"] == {"topics": {"condition": "service_completed_successfully"}}

    env = {key: str(value) for key, value in service["environment"].items()}
    assert env["PGKD_BROKER_URL"].startswith("kafka://")
    assert env["PGKD_ARTIFACTS"] == "file:///artifacts"
    assert env["PGKD_TOPIC_PREFIX"] == TOPIC_PREFIX
    assert env["PGKD_METRICS_PORT"] == str(METRICS_PORT)
    assert env["PGKD_HTTP_HOST"] == "0.0.0.0"   # reachable by Prometheus and the health check

    mounts = compose_mounts(service)
    assert mounts["/artifacts"] == ("artifacts", False)
    assert mounts["/data"] == ("${PGKD_DATA_DIR:-./data}", True)

    # Metrics reachable by Prometheus on the compose network, not published on the host.
    assert str(METRICS_PORT) in map(str, service["expose"])
    assert "ports" not in service
    assert any("/healthz" in part and str(METRICS_PORT) in part for part in service["healthcheck"]["test"])


def test_compose_ingest_has_the_stream_configuration():
    env = {key: str(value) for key, value in compose()["services"]["ingest"]["environment"].items()}
    stream = {key: value for key, value in env.items() if key.startswith("PGKD_STREAM")}
    assert set(stream) == set(STREAM_DEFAULTS)
    for key, default in {**STREAM_DEFAULTS, **STREAM_MOUNTED}.items():
        # Passed through from the environment of `docker compose`, with the code's default otherwise.
        assert stream[key] == "${%s:-%s}" % (key, default), key
    # The settings file's folder is mounted (a file's bind mount would miss an editor's replace).
    assert "./deploy/stream:/etc/pgkd/stream:ro" in compose()["services"]["ingest"]["volumes"]
    from pgkd.stream import StreamSettings
    settings, read = StreamSettings(settings_file="deploy/stream/stream.yaml").with_file()
    assert settings == StreamSettings(settings_file="deploy/stream/stream.yaml") and read.values == {}
    # One container: no replicas, no scaling.
    assert "scale" not in compose()["services"]["ingest"]
    assert compose()["services"]["ingest"].get("deploy", {}).get("replicas", 1) == 1


def test_the_stream_defaults_are_the_codes():
    """STREAM_DEFAULTS (and so compose and the ConfigMap) name every setting ingest reads, with its default."""
    from pgkd.stream import StreamSettings
    variables = {field: StreamSettings.variable(field) for field in StreamSettings.model_fields}
    assert set(variables.values()) == set(STREAM_DEFAULTS)
    for field, name in variables.items():
        default = StreamSettings.model_fields[field].default
        assert STREAM_DEFAULTS[name] == ("" if default in (None, {}) else str(default)), name
    # Every default parses back to the same settings (an empty value means "not set").
    assert StreamSettings.from_env(STREAM_DEFAULTS) == StreamSettings()


def test_compose_teacher_is_triton_built_from_deploy_triton():
    teacher = compose()["services"]["teacher"]
    assert teacher["image"] == f"{TEACHER_IMAGE}:latest"
    assert teacher["build"] == {"context": "deploy/triton", "dockerfile": "Dockerfile"}
    assert (REPO / teacher["build"]["context"] / teacher["build"]["dockerfile"]).resolve() == TEACHER_DOCKERFILE
    # The image's command, spelled out; the NGC entry point is kept.
    assert teacher["command"] == TRITON_COMMAND
    assert json.loads(dict(dockerfile_instructions(TEACHER_DOCKERFILE))["CMD"]) == TRITON_COMMAND
    assert "entrypoint" not in teacher
    assert teacher["restart"] == "unless-stopped"
    # Opt-in: a large image and a model download, not part of the default `up`.
    assert teacher["profiles"] == ["teacher"]

    env = teacher["environment"]
    assert env["PGKD_TEACHER_MODEL"] == "${PGKD_TEACHER_MODEL:-%s}" % TEACHER_DEFAULT_MODEL
    assert "HF_TOKEN" in env and env["HF_TOKEN"] is None  # passed through from the host, never a value here

    # The Python backend's shared memory: well above Docker's 64 MB.
    assert compose_bytes(teacher["shm_size"]) >= 2**30
    # The Hugging Face cache (the image runs as root) in a named volume: the weights download once.
    source, read_only = compose_mounts(teacher)["/root/.cache/huggingface"]
    assert source == "hf-cache" and not read_only and "hf-cache" in compose()["volumes"]

    # HTTP and gRPC published on the loopback interface only; metrics on the compose network.
    published = [TRITON_PORTS["http"], TRITON_PORTS["grpc"]]
    assert sorted(teacher["ports"]) == [f"127.0.0.1:{port}:{port}" for port in published]
    assert str(TRITON_PORTS["metrics"]) in map(str, teacher["expose"])

    healthcheck = teacher["healthcheck"]
    assert healthcheck["test"][:2] == ["CMD", "curl"]
    assert urlsplit(healthcheck["test"][-1])[1:3] == (f"localhost:{TRITON_PORTS['http']}", "/v2/health/ready")
    # The first start downloads the weights: a long grace period before failures count.
    assert duration_seconds(healthcheck["start_period"]) >= 15 * 60
    assert "gpus" not in teacher and "deploy" not in teacher  # the GPU comes from deploy/compose.gpu.yml


def test_compose_no_service_depends_on_the_teacher():
    """Runs may use simulated teachers: the teacher is a run option (--teacher triton://teacher:8000/teacher),
    not a dependency of the services."""
    for name, service in compose()["services"].items():
        assert "teacher" not in service.get("depends_on", {}), name
    # Nor is it in their configuration: the teacher is chosen per run.
    for name, service in pgkd_image_services().items():
        assert not any("triton" in str(value).lower() for value in service["environment"].values()), name
    assert "depends_on" not in compose()["services"]["teacher"]


def test_compose_student_server_is_triton_built_from_dockerfile_student():
    server = compose()["services"][STUDENT_SERVER]
    assert server["image"] == f"{STUDENT_IMAGE}:latest"
    assert server["build"] == {"context": "deploy/triton", "dockerfile": "Dockerfile.student"}
    assert (REPO / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == STUDENT_DOCKERFILE
    # The image's command, spelled out, and the one pgkd runs Triton with; the NGC entry point is kept.
    assert server["command"] == student_command()
    assert json.loads(dict(dockerfile_instructions(STUDENT_DOCKERFILE))["CMD"]) == student_command()
    assert "entrypoint" not in server and "environment" not in server
    assert server["restart"] == "unless-stopped"
    # Opt-in with its deployer: the NGC image is large.
    assert server["profiles"] == [SERVING_PROFILE]

    # The model repository: the volume the deployer writes, read-only here.
    assert compose_mounts(server) == {STUDENT_MODEL_REPOSITORY: (STUDENT_VOLUME, True)}
    assert STUDENT_VOLUME in compose()["volumes"]
    # HTTP and gRPC published on the loopback interface only, on host ports the teacher does not take;
    # metrics on the compose network.
    published = {int(port.split(":")[2]): int(port.split(":")[1]) for port in server["ports"]}
    assert all(port.startswith("127.0.0.1:") for port in server["ports"])
    assert set(published) == {TRITON_PORTS["http"], TRITON_PORTS["grpc"]}
    teacher_host_ports = {int(port.split(":")[1]) for port in compose()["services"]["teacher"]["ports"]}
    all_host_ports = [int(str(port).split(":")[-2]) for svc in compose()["services"].values()
                      for port in svc.get("ports", [])]
    assert not set(published.values()) & teacher_host_ports
    assert len(all_host_ports) == len(set(all_host_ports)), "two services publish the same host port"
    assert str(TRITON_PORTS["metrics"]) in map(str, server["expose"])
    # The Python backend's shared memory: above Docker's 64 MB.
    assert compose_bytes(server["shm_size"]) > 64 * 2**20

    # Healthy once the student is loaded (not once Triton is up: the repository may still be empty).
    healthcheck = server["healthcheck"]
    assert healthcheck["test"][:2] == ["CMD", "curl"]
    assert urlsplit(healthcheck["test"][-1])[1:3] == (f"localhost:{TRITON_PORTS['http']}",
                                                      f"/v2/models/{student_model()}/ready")
    assert "gpus" not in server and "deploy" not in server  # the GPU comes from deploy/compose.gpu.yml
    # Nothing waits for it to be healthy: that needs a promotion, which may never come.
    for name, service in compose()["services"].items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, dict):   # the short form (a list) waits for no health
            assert depends_on.get(STUDENT_SERVER, {}).get("condition") != "service_healthy", name


def test_compose_deployer_runs_the_one_image_beside_the_student_server():
    deployer, server = compose()["services"]["deployer"], compose()["services"][STUDENT_SERVER]
    assert deployer["image"] == f"{IMAGE}:latest"
    assert deployer["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert deployer["command"] == ["service", "deployer"]
    assert "entrypoint" not in deployer  # the image's ENTRYPOINT ["pgkd"]
    assert deployer["restart"] == "unless-stopped"
    assert deployer["profiles"] == server["profiles"]
    # Kafka first (it consumes student-promoted), and the server started, not healthy: the server becomes
    # healthy only once the deployer has loaded a student into it.
    assert deployer["depends_on"] == {"topics": {"condition": "service_completed_successfully"},
                                      STUDENT_SERVER: {"condition": "service_started"}}
    assert "depends_on" not in server

    # Its settings, as the deployer parses them (compose's defaults taken).
    env = {key: compose_default(value) for key, value in deployer["environment"].items()}
    settings = serving_settings(env)
    mounts = compose_mounts(deployer)
    assert mounts[str(settings.repository)] == (STUDENT_VOLUME, False)   # writes what the server reads
    assert compose_mounts(server)[str(settings.repository)][0] == STUDENT_VOLUME
    assert mounts["/artifacts"] == ("artifacts", False)                   # the promoted checkpoints
    assert settings.http_address == f"{STUDENT_SERVER}:{TRITON_PORTS['http']}"
    assert settings.model == student_model() == env["PGKD_STREAM_SERVING_MODEL"]
    assert (settings.format, settings.int8, settings.gpu) == ("onnx", False, False)
    assert settings.replica == "compose"
    assert env["PGKD_HTTP_HOST"] == "0.0.0.0"   # reachable by Prometheus and the health check

    assert str(METRICS_PORT) in map(str, deployer["expose"]) and "ports" not in deployer
    assert any("/healthz" in part and str(METRICS_PORT) in part for part in deployer["healthcheck"]["test"])


def test_compose_cascade_serves_in_front_of_the_student_server_from_its_volume(tmp_path):
    from pgkd.teachers.transports import TeacherURL
    cascade, server, deployer = (compose()["services"][name] for name in (CASCADE, STUDENT_SERVER, "deployer"))
    assert cascade["image"] == f"{IMAGE}:latest"
    assert cascade["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert "entrypoint" not in cascade  # the image's ENTRYPOINT ["pgkd"]
    assert cascade["restart"] == "unless-stopped"
    assert cascade["profiles"] == server["profiles"] == [SERVING_PROFILE]

    # The command, as `pgkd cascade serve` parses it (compose's defaults taken).
    options = cascade_options([compose_default(part) for part in cascade["command"]])
    assert options.host == "0.0.0.0"   # reachable from the other containers, the host and Prometheus
    student = urlsplit(options.student)
    assert (student.scheme, student.hostname, student.port) == ("http", STUDENT_SERVER, TRITON_PORTS["http"])
    assert options.student_model == student_model()
    # The teacher: the compose service `teacher` by default, another one from the environment of `docker compose`.
    (teacher,) = [part for part in cascade["command"] if CASCADE_TEACHER_VARIABLE in part]
    teacher_url = TeacherURL.parse(options.teacher)
    assert teacher == "${%s:-%s}" % (CASCADE_TEACHER_VARIABLE, options.teacher)
    assert (teacher_url.scheme, teacher_url.host, teacher_url.port, teacher_url.model) == \
        ("triton", "teacher", TRITON_PORTS["http"], TEACHER_MODEL_NAME)
    assert teacher_url.host in compose()["services"]
    assert options.publish_labels   # to the stream's input topic (PGKD_BROKER_URL, PGKD_TOPIC_PREFIX)

    # The calibrations: the served model's folder in the student server's repository, mounted read-only from the
    # volume the deployer writes.
    mounts = compose_mounts(cascade)
    repository = str(serving_settings({k: compose_default(v) for k, v in deployer["environment"].items()}).repository)
    assert Path(options.calibration) == Path(repository) / student_model()
    assert mounts[repository] == (STUDENT_VOLUME, True)
    assert compose_mounts(deployer)[repository] == (STUDENT_VOLUME, False)
    assert "/artifacts" not in mounts   # it reads no artifacts
    # The policy: a file in a mounted folder of the repository (a file's bind mount would miss an editor's
    # replace), a policy the cascade reads.
    policy = Path(options.policy_file)
    source, read_only = mounts[str(policy.parent)]
    assert read_only and (REPO / source).resolve() == CASCADE_POLICY_FILE.parent
    assert read_policy((REPO / source / policy.name).read_text(encoding="utf-8"), tmp_path).max_teacher_share == 0.2

    # HTTP and gRPC published on the loopback interface only, on host ports no other service takes; the
    # metrics (Triton's, the cascade's) on the compose network.
    assert sorted(cascade["ports"]) == [f"127.0.0.1:{port}:{port}" for port in (options.http_port, options.grpc_port)]
    assert {str(options.metrics_port), str(options.cascade_metrics_port)} <= set(map(str, cascade["expose"]))
    # PyTriton's Python backend exchanges tensors through /dev/shm: above Docker's 64 MB.
    assert compose_bytes(cascade["shm_size"]) > 64 * 2**20

    # Healthy once the model `cascade` is ready (the image has python, no curl).
    test = cascade["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    (url,) = re.findall(r"'(http://[^']+)'", test[-1])
    assert urlsplit(url)[1:3] == (f"localhost:{options.http_port}", f"/v2/models/{cascade_model()}/ready")
    # The topics first (it publishes), and the student server started, not healthy (that needs a promotion).
    assert cascade["depends_on"] == {"topics": {"condition": "service_completed_successfully"},
                                     STUDENT_SERVER: {"condition": "service_started"}}


def test_compose_broker_url_is_the_internal_kafka_listener():
    kafka_env = {key: str(value) for key, value in compose()["services"]["kafka"]["environment"].items()}
    advertised = dict(listener.split("://") for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    internal = advertised[kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    for name, service in pgkd_image_services().items():
        url = urlsplit(str(service["environment"]["PGKD_BROKER_URL"]))
        assert (url.scheme, url.netloc) == ("kafka", internal), name
        assert url.hostname in compose()["services"], name


def test_compose_kafka_is_a_pinned_single_node_kraft_broker():
    kafka = compose()["services"]["kafka"]
    repository, _, tag = kafka["image"].partition(":")
    assert repository == "apache/kafka"
    assert re.fullmatch(r"3\.9\.\d+|4\.\d+\.\d+", tag), f"pin a 3.9.x or 4.x tag, not {tag!r}"

    env = {key: str(value) for key, value in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any(key.startswith("KAFKA_ZOOKEEPER") for key in env)
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["CLUSTER_ID"]

    listeners = dict(listener.split("://") for listener in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    advertised = dict(listener.split("://") for listener in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert set(listeners) == set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    assert set(advertised.values()) == {"kafka:9092", "localhost:9094"}
    # The host-side listener is published on the port it advertises.
    assert any(str(port).endswith("9094:9094") for port in kafka["ports"])

    # A single broker cannot hold more than one replica of the internal topics.
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1", key

    test = kafka["healthcheck"]["test"]
    assert test[0] == "CMD" and re.fullmatch(
        r"/opt/kafka/bin/(kafka-topics|kafka-broker-api-versions)\.sh", test[1]), test
    assert "kafka-data" in compose()["volumes"]
    assert compose_mounts(kafka)["/var/lib/kafka/data"][0] == "kafka-data"


def test_compose_topics_job_creates_the_topics_once_kafka_is_healthy():
    topics = compose()["services"]["topics"]
    assert topics["image"] == f"{IMAGE}:latest"
    assert topics["command"][:2] == ["topics", "create"]
    assert topics["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert topics["restart"] == "no"
    assert "profiles" not in topics  # started by `up`, since the services wait for it


def test_compose_cli_is_an_on_demand_tool():
    cli = compose()["services"]["cli"]
    assert cli["profiles"] == ["tools"]
    assert cli["entrypoint"] == ["pgkd"]
    assert "restart" not in cli
    mounts = compose_mounts(cli)
    assert mounts["/data"][1] and mounts["/artifacts"][0] == "artifacts"


def test_compose_every_pgkd_container_shares_one_image_build_and_configuration():
    services = pgkd_image_services()
    assert set(SERVICES) | {"topics", "cli", "deployer", CASCADE} <= set(services)
    assert len({json.dumps(svc["build"], sort_keys=True) for svc in services.values()}) == 1
    # One configuration, the deployer's adding the settings of its own server (and nothing else) to it.
    shared = services["trainer"]["environment"]
    for name, service in services.items():
        env = service["environment"]
        if name == "deployer":
            assert env.items() >= shared.items()
            assert set(env) - set(shared) == {"PGKD_SERVING_REPOSITORY", "PGKD_SERVING_URL", "PGKD_SERVING_REPLICA"}
        else:
            assert env == shared, name
    build = next(iter(services.values()))["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    # Every PGKD_* setting there is one the code reads (a misspelt one would silently do nothing).
    unread = {key for env in (svc["environment"] for svc in services.values()) for key in env} - settings_the_code_reads()
    assert not unread, f"compose sets {sorted(unread)}, which no service reads"


def test_compose_references_resolve():
    """What the schema cannot see but `docker compose up` refuses: undefined services or named volumes,
    bind-mounted files that are not in the repository, a service started by default that depends on one
    only started with a profile."""
    services = compose()["services"]
    declared_volumes = set(compose().get("volumes", {}))
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if "profiles" not in service:
                assert "profiles" not in services[dependency], f"{name} needs {dependency}, which has a profile"
        for source, _ in compose_mounts(service).values():
            if is_named_volume(source):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
            elif source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"


def test_compose_prometheus_and_grafana_use_the_files_in_deploy():
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:") and not prometheus["image"].endswith(":latest")
    config = compose_mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert (REPO / config[0]).resolve() == PROMETHEUS and config[1]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert any(str(port).endswith("9090:9090") for port in prometheus["ports"])

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:") and not grafana["image"].endswith(":latest")
    provisioning = compose_mounts(grafana)["/etc/grafana/provisioning"]
    assert (REPO / provisioning[0]).resolve() == GRAFANA_DATASOURCES.parents[1]
    assert any(str(port).endswith("3000:3000") for port in grafana["ports"])
    assert str(grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == "Viewer"


def test_prometheus_config_scrapes_the_services():
    # promtool is not installed yet: this checks the structure and the targets, not every field.
    config = load_yaml(PROMETHEUS)
    assert config["global"]["scrape_interval"] == "5s"
    seconds = {key: int(config["global"][key].removesuffix("s")) for key in ("scrape_interval", "scrape_timeout")}
    assert seconds["scrape_timeout"] <= seconds["scrape_interval"]  # Prometheus refuses the config otherwise

    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert len(jobs) == len(set(jobs))
    targets = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            for target in static["targets"]:
                targets[target] = static.get("labels", {}).get("service")
    assert {f"{name}:{METRICS_PORT}": name for name in SERVICES}.items() <= targets.items()
    # The student server's Triton and its deployer, each a job of its own (optional, like the teacher).
    assert {f"{STUDENT_SERVER}:{TRITON_PORTS['metrics']}": STUDENT_SERVER,
            f"deployer:{METRICS_PORT}": "deployer"}.items() <= targets.items()
    # The cascade's own metrics port (pgkd_cascade_*, not its Triton's), a job of its own too.
    cascade_metrics = cascade_options([compose_default(part) for part in compose()["services"][CASCADE]["command"]]
                                      ).cascade_metrics_port
    assert {f"{CASCADE}:{cascade_metrics}": CASCADE}.items() <= targets.items()
    jobs = {target: job["job_name"] for job in config["scrape_configs"] for static in job["static_configs"]
            for target in static["targets"]}
    assert jobs[f"{STUDENT_SERVER}:{TRITON_PORTS['metrics']}"] == STUDENT_SERVER
    assert jobs[f"deployer:{METRICS_PORT}"] == "deployer"
    assert jobs[f"{CASCADE}:{cascade_metrics}"] == CASCADE
    for target in targets:
        assert target.split(":")[0] in compose()["services"], f"{target} is not a compose service"


def test_grafana_provisions_the_prometheus_datasource():
    config = load_yaml(GRAFANA_DATASOURCES)
    assert config["apiVersion"] == 1
    (datasource,) = [ds for ds in config["datasources"] if ds["type"] == "prometheus"]
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert urlsplit(datasource["url"]).hostname in compose()["services"]


# ------------------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_builds_the_one_image():
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert [args for keyword, args in instructions if keyword == "FROM"] == ["python:3.11-slim"]

    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    assert {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}.items() <= env.items()

    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch = next(i for i, run in enumerate(runs) if re.search(r"pip install .*torch", run))
    project = next(i for i, run in enumerate(runs) if re.search(r"pip install \.(\s|$)", run))
    assert torch < project, "torch must be installed before the project"
    assert any(f"--uid {UID}" in run and f"--gid {UID}" in run for run in runs)

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users[-1] in {str(UID), f"{UID}:{UID}"}
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert [args for keyword, args in instructions if keyword == "WORKDIR"][-1] in {"/home/pgkd", "/app"}
    assert [args for keyword, args in instructions if keyword == "EXPOSE"] == [str(METRICS_PORT)]
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["pgkd"]
    assert json.loads(dict(instructions)["CMD"]) == ["service", "trainer"]


def test_the_one_image_has_what_the_deployer_imports():
    """The deployer exports each promoted student to ONNX (pgkd/serving/graph.py: torch's TorchScript exporter
    imports onnx, --int8 onnxruntime.quantization): the image's `pip install .` must bring them, and the
    packages it installs must hold every service `pgkd service NAME` starts."""
    import ast
    import sys
    import tomllib
    tree = ast.parse((REPO / "shared" / "pgkd" / "serving" / "graph.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    third_party = imported - set(sys.stdlib_module_names) - {"pgkd", "__future__"}
    assert {"torch", "numpy", "onnxruntime"} <= third_party
    third_party.add("onnx")     # not imported by name: torch.onnx.export needs it
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    base = {re.match(r"[A-Za-z0-9_.-]+", spec)[0].lower() for spec in project["project"]["dependencies"]}
    # And what the Dockerfile installs besides (torch from its index), ARG defaults substituted.
    runs = [args for keyword, args in dockerfile_resolved(DOCKERFILE) if keyword == "RUN" and "pip install" in args]
    specs = [re.fullmatch(r"([A-Za-z0-9_.-]+)(?:[<>=!~].*)?", word) for run in runs
             for command in re.findall(r"pip install (.*?)(?:&&|$)", run) for word in shlex.split(command)
             if not word.startswith("-")]
    installed = {spec[1].lower() for spec in specs if spec}
    for module in sorted(third_party):
        assert module in base or module in installed, f"the deployer imports {module}, which the image lacks"

    from pgkd_services import ALL
    packages = set(project["tool"]["setuptools"]["packages"])
    assert {f"pgkd_services.{name}" for name in ALL} <= packages, "a service the image would not have"
    assert {"pgkd.serving", "pgkd.distributed"} <= packages


def test_student_server_dockerfile_is_triton_with_what_the_student_model_imports():
    instructions = dockerfile_resolved(STUDENT_DOCKERFILE)
    (base,) = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    (teacher_base,) = [arguments for keyword, arguments in dockerfile_resolved(TEACHER_DOCKERFILE) if keyword == "FROM"]
    # The teacher's Triton release: the two images share its layers.
    assert base == teacher_base
    assert dockerfile_args(STUDENT_DOCKERFILE)["TRITON_VERSION"] == dockerfile_args(TEACHER_DOCKERFILE)["TRITON_VERSION"]

    # What model.py (pgkd/serving/triton_model.py) imports, installed into the image's Python: numpy below 2
    # (the Python backend of these releases), tokenizers, onnxruntime by default (an ARG for onnxruntime-gpu).
    (install,) = [run for keyword, run in instructions if keyword == "RUN" and "pip install" in run]
    packages = shlex.split(install.split("pip install", 1)[1])
    assert {"numpy<2", "tokenizers", "onnxruntime"} <= set(packages)
    assert dockerfile_args(STUDENT_DOCKERFILE)["ONNXRUNTIME"] == "onnxruntime"
    model_py = (REPO / "shared" / "pgkd" / "serving" / "triton_model.py").read_text(encoding="utf-8")
    for module in ("numpy", "tokenizers", "onnxruntime"):
        assert re.search(rf"^\s*(import|from) {module}\b", model_py, re.MULTILINE), module

    # Nothing copied in: the repository is a volume, and the build context is empty.
    assert not [keyword for keyword, _ in instructions if keyword in ("COPY", "ADD")]
    for path in ("models/teacher/config.pbtxt", "Dockerfile", "README.md"):
        assert dockerignore_excludes(path, STUDENT_DOCKERIGNORE), path
    # /models belongs to the deployer's user, so that a fresh volume mounted there is writable by it.
    assert any(re.search(rf"install -d -o {UID} -g {UID} .*{STUDENT_MODEL_REPOSITORY}\b", run)
               for keyword, run in instructions if keyword == "RUN")
    assert any(re.search(rf"install -d -o pgkd -g pgkd .*{STUDENT_MODEL_REPOSITORY}\b", run)
               for keyword, run in dockerfile_instructions() if keyword == "RUN")
    exposed = {int(port) for keyword, ports in instructions if keyword == "EXPOSE" for port in ports.split()}
    assert exposed == set(TRITON_PORTS.values())
    assert json.loads(dict(instructions)["CMD"]) == student_command()
    assert "ENTRYPOINT" not in dict(instructions)   # NGC's entry point runs the command


@pytest.mark.parametrize("path, excluded", [
    ("pyproject.toml", False),
    ("README.md", False),
    ("shared/pgkd/cli.py", False),
    ("services/trainer/app.py", False),
    (".venv/bin/python", True),
    (".git/HEAD", True),
    ("runs/demo/report.json", True),
    ("data/banking77/train.jsonl", True),
    ("tests/test_cli.py", True),
    ("BENCHMARKS.md", True),
    ("shared/pgkd/__pycache__/cli.cpython-311.pyc", True),
    ("shared/pgkd.egg-info/PKG-INFO", True),
])
def test_build_context_holds_the_sources_and_nothing_heavy(path, excluded):
    assert dockerignore_excludes(path) is excluded


def test_build_context_has_what_pip_install_needs():
    # The files `pip install .` reads, and the readme pyproject.toml names.
    assert (REPO / "pyproject.toml").is_file() and (REPO / "README.md").is_file()
    assert (REPO / "shared" / "pgkd" / "__init__.py").is_file()
    assert 'readme = "README.md"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_teacher_dockerfile_is_triton_with_the_model_repository():
    instructions = dockerfile_instructions(TEACHER_DOCKERFILE)
    # ARG defaults substituted, the way `docker build` without --build-arg sees the file.
    args = dict(shlex.split(arguments)[0].split("=", 1)
                for keyword, arguments in instructions if keyword == "ARG" and "=" in arguments)
    instructions = [(keyword, re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], arguments))
                    for keyword, arguments in instructions]
    (base,) = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    repository, _, tag = base.partition(":")
    assert repository == "nvcr.io/nvidia/tritonserver"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"pin a release with the Python backend, not {tag!r}"
    assert ("COPY", "models /models") in instructions
    assert any(re.search(r"pip install .*torch", run) for keyword, run in instructions if keyword == "RUN")
    exposed = {int(port) for keyword, ports in instructions if keyword == "EXPOSE" for port in ports.split()}
    assert exposed == set(TRITON_PORTS.values())
    assert json.loads(dict(instructions)["CMD"]) == TRITON_COMMAND
    # The model that runs name in their URL (triton://HOST:8000/teacher).
    config = (TEACHER_MODELS / TEACHER_MODEL_NAME / "config.pbtxt").read_text(encoding="utf-8")
    assert re.search(r'^name:\s*"%s"' % TEACHER_MODEL_NAME, config, re.MULTILINE)
    assert f'string_value: "{TEACHER_DEFAULT_MODEL}"' in config


# ------------------------------------------------------------------------------------------ Kubernetes

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("source, doc", k8s_documents(),
                         ids=[f"{source}:{doc['kind']}/{doc['metadata']['name']}" for source, doc in k8s_documents()])
def test_manifest_is_valid(source, doc, version):
    validate_manifest(doc, version)


def test_kustomization_lists_every_manifest_and_nothing_else():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for resource in listed:
        assert (K8S / resource).is_file(), f"{resource} is listed but does not exist"
    # Flat layout, so that the comparison below sees every manifest; the folders are the opt-in components.
    assert all(path.parent == K8S for path in manifest_paths())
    assert sorted(path for path in K8S.iterdir() if path.is_dir()) == sorted(K8S_COMPONENTS)
    for component in K8S_COMPONENTS:
        kind = load_yaml(component / "kustomization.yaml")
        assert (kind["apiVersion"], kind["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component"), component
    assert "components" not in kustomization   # off by default
    # *.example.yaml are templates to fill in (empty credentials), never applied as they are.
    on_disk = {path.name for path in manifest_paths() if not path.name.endswith(".example.yaml")}
    assert set(listed) == on_disk

    assert kustomization["namespace"] == "pgkd"
    labels = dict(kustomization.get("commonLabels", {}))
    for entry in kustomization.get("labels", []):
        labels.update(entry["pairs"])
    assert labels.get("app.kubernetes.io/part-of") == "pgkd"
    assert {"teacher.yaml", "student-server.yaml", "cascade.yaml"} <= set(listed)
    # `images:` retags the images everywhere; it matches containers by image name.
    images = {image["name"]: image for image in kustomization["images"]}
    assert list(images) == [IMAGE, TEACHER_IMAGE, STUDENT_IMAGE]
    assert all(image["newName"] == name and image["newTag"] == "latest" for name, image in images.items())
    # Every container runs the one pgkd image, but the teacher's and the student server's Triton.
    special = {("pgkd-teacher", "teacher"): TEACHER_IMAGE, (STUDENT_DEPLOYMENT, "triton"): STUDENT_IMAGE}
    for deployment in k8s_docs("Deployment"):
        for container in containers(deployment):
            expected = special.get((deployment["metadata"]["name"], container["name"]), IMAGE)
            assert container["image"] == f"{expected}:latest", (deployment["metadata"]["name"], container["name"])


def settings_the_code_reads() -> set[str]:
    """Every PGKD_* variable pgkd reads: those of the one settings model (pgkd.settings, `pgkd settings`)."""
    from pgkd.settings import known_variables
    return set(known_variables())


def env_names(node) -> set[str]:
    """The names of every container `env` entry in a manifest (a Deployment, a kustomize patch)."""
    if isinstance(node, dict):
        found = {entry["name"] for entry in node.get("env", []) if isinstance(entry, dict) and "name" in entry}
        return found.union(*(env_names(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(env_names(value) for value in node))
    return set()


def test_the_configmap_sets_only_what_the_code_reads_and_in_the_one_namespace():
    """A key the services never read is a setting that silently does nothing."""
    data = k8s_doc("ConfigMap", "pgkd-config")["data"]
    unread = set(data) - settings_the_code_reads()
    assert not unread, f"the ConfigMap sets {sorted(unread)}, which no service reads"
    # and so does every container's env, in every manifest
    from pgkd.settings import Settings
    set_in_manifests = {name for path in K8S.rglob("*.yaml") for doc in load_yaml_all(path) for name in env_names(doc)
                        if name.startswith("PGKD_")}
    assert set_in_manifests >= {"PGKD_SERVING_REPOSITORY", "PGKD_SERVING_THREADS", "PGKD_TEACHER_MODEL"}
    unknown = set_in_manifests - settings_the_code_reads()
    assert not unknown, f"the manifests set {sorted(unknown)}, which are not settings (pgkd settings)"
    # and the ConfigMap's values are valid settings
    Settings.from_env({key: str(value) for key, value in data.items()})
    assert {"PGKD_BROKER_URL", "PGKD_ARTIFACTS"} <= set(data)
    # the code's defaults, said once
    assert {key: data[key] for key in STREAM_DEFAULTS} == {**STREAM_DEFAULTS, **STREAM_MOUNTED}
    settings = yaml.safe_load(k8s_doc("ConfigMap", "pgkd-stream-settings")["data"]["stream.yaml"])
    assert settings is None      # every setting commented out: the file says what may go in it
    assert k8s_doc("Namespace", "pgkd")
    for source, doc in k8s_documents():
        assert doc["metadata"].get("namespace", "pgkd") == "pgkd", source


def test_everything_a_pod_refers_to_exists_so_it_would_schedule():
    """A pod whose claim, ConfigMap or required Secret is missing, or whose probe names a port it does
    not open, never becomes ready; a claim several pods share across nodes must be ReadWriteMany."""
    claims = {doc["metadata"]["name"]: doc for doc in k8s_docs("PersistentVolumeClaim")}
    configmaps = {doc["metadata"]["name"] for doc in k8s_docs("ConfigMap")}
    secrets = {doc["metadata"]["name"] for doc in k8s_docs("Secret")}
    claimed_by: dict[str, int] = {}
    for deployment in k8s_docs("Deployment"):
        name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{name}: no PersistentVolumeClaim {claim}"
                claimed_by[claim] = claimed_by.get(claim, 0) + 1
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps or volume["configMap"].get("optional"), name
        for container in containers(deployment):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, f"{name}: {source}"
                if "secretRef" in source:
                    ref = source["secretRef"]
                    assert ref.get("optional") or ref["name"] in secrets, f"{name}: a required Secret {ref['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: the mount {mount['mountPath']} names no volume"
            ports = {port.get("name") for port in container.get("ports", [])} | \
                    {port["containerPort"] for port in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in container and "httpGet" in container[probe]:
                    assert container[probe]["httpGet"]["port"] in ports, f"{name}: {probe} on a port it does not open"
    for claim, pods in claimed_by.items():
        if pods > 1:
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{claim} is mounted by {pods} pods"
    # The S3 credentials are a template to fill in: it must hold no secret of its own.
    secret = k8s_doc("Secret", "pgkd-s3")
    assert "data" not in secret and not any(secret["stringData"].values())


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_is_a_deployment_with_its_command_configuration_and_volumes(name):
    deployment = k8s_doc("Deployment", f"pgkd-{name}")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert container["args"] == ["service", name]
    assert "command" not in container  # the image's ENTRYPOINT ["pgkd"]
    assert {"configMapRef": {"name": "pgkd-config"}} in container["envFrom"]
    assert {"secretRef": {"name": "pgkd-s3", "optional": True}} in container["envFrom"]
    assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"]
    # Service env vars would be named PGKD_* too (Services pgkd-*) and mix with the configuration.
    assert pod["enableServiceLinks"] is False

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), "a volumeMount names no volume"
    assert volumes[mounts["/artifacts"]]["persistentVolumeClaim"]["claimName"] == "pgkd-artifacts"
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_every_service_listens_on_the_containers_address_in_compose_and_kubernetes():
    """The services' HTTP side listens on loopback unless PGKD_HTTP_HOST says otherwise (pgkd.net):
    Prometheus and the probes reach a container or a pod only if compose and the manifests say 0.0.0.0."""
    from pgkd.settings import host_from_env
    in_compose = {name: svc for name, svc in compose()["services"].items() if svc.get("command", [])[:1] == ["service"]}
    assert set(in_compose) == set(SERVICES) | {"deployer"}
    for name, service in in_compose.items():
        assert host_from_env({k: compose_default(v) for k, v in service["environment"].items()}) == "0.0.0.0", name
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    in_k8s = [(deployment["metadata"]["name"], container) for deployment in k8s_docs("Deployment")
              for container in containers(deployment) if container.get("args", [])[:1] == ["service"]]
    assert {container["args"][1] for _, container in in_k8s} == set(SERVICES) | {"deployer"}
    for name, container in in_k8s:
        from_config = {"configMapRef": {"name": "pgkd-config"}} in container.get("envFrom", [])
        env = {**(config if from_config else {}), **{e["name"]: e.get("value") for e in container.get("env", [])}}
        assert host_from_env(env) == "0.0.0.0", name


def test_the_deployments_are_the_services_the_teacher_and_the_student_server():
    assert {d["metadata"]["name"] for d in k8s_docs("Deployment")} == \
        {f"pgkd-{name}" for name in SERVICES} | {"pgkd-teacher", STUDENT_DEPLOYMENT}


def test_every_pgkd_container_runs_as_non_root_with_probes_and_resources():
    """The pgkd services; the teacher (another image) has its own test below."""
    for deployment in (k8s_doc("Deployment", f"pgkd-{name}") for name in SERVICES):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, name
        for container in containers(deployment):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"], name
            assert security.get("runAsNonRoot", True) and security.get("runAsUser", UID) != 0, name
            assert not security.get("privileged", False), name
            # The root filesystem is read-only: /tmp must be a volume.
            assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}, name

            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request, limit = resources["requests"][resource], resources["limits"][resource]
                assert quantity(request) <= quantity(limit), f"{name}: {resource} request above limit"


def test_ingest_runs_as_one_replica_that_stops_before_the_next_starts():
    for name in SINGLE_WRITERS:
        deployment = k8s_doc("Deployment", f"pgkd-{name}")
        assert deployment["spec"]["replicas"] == 1, name
        # RollingUpdate (the default) would run the new pod beside the old one: two writers for a while.
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name
    # Nothing scales it: the one autoscaler is the student server's.
    targets = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in k8s_docs("HorizontalPodAutoscaler")}
    assert targets == {STUDENT_DEPLOYMENT}
    assert not targets & {f"pgkd-{name}" for name in SINGLE_WRITERS}


def test_trainer_and_teacher_run_on_a_gpu_node_and_the_others_do_not():
    for name in SERVICES + ("teacher",):
        deployment = k8s_doc("Deployment", f"pgkd-{name}")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if name in GPU_SERVICES:
            assert str(gpus) == "1", name
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
            # One GPU per pod: a rolling update would need a second GPU for the new pod before the old one stops.
            assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name
        else:
            assert gpus is None and "nodeSelector" not in pod and "tolerations" not in pod, name


@pytest.mark.parametrize("name", SERVICES)
def test_each_deployment_has_a_metrics_service_for_prometheus(name):
    service = k8s_doc("Service", f"pgkd-{name}")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == METRICS_PORT
    assert port["targetPort"] in {"metrics", METRICS_PORT}
    # The selector picks this service's pods and no other deployment's.
    selector = service["spec"]["selector"].items()
    for deployment in k8s_docs("Deployment"):
        picks = selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert picks == (deployment["metadata"]["name"] == f"pgkd-{name}"), deployment["metadata"]["name"]


def teacher_pod() -> tuple[dict, dict]:
    pod = k8s_doc("Deployment", "pgkd-teacher")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_teacher_deployment_runs_triton_with_the_model_and_its_caches():
    deployment = k8s_doc("Deployment", "pgkd-teacher")
    pod, container = teacher_pod()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert container["image"] == f"{TEACHER_IMAGE}:latest"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == TRITON_COMMAND and "command" not in container  # the NGC entry point runs it
    # Not the pgkd services' configuration: nothing from pgkd-config or pgkd-s3.
    assert "envFrom" not in container
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False

    env = env_vars(container)
    assert env["PGKD_TEACHER_MODEL"]["value"] == TEACHER_DEFAULT_MODEL
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "pgkd-hf", "key": "HF_TOKEN", "optional": True}
    assert "value" not in env["HF_TOKEN"]  # never a token in the manifests

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == TRITON_PORTS

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), "a volumeMount names no volume"
    # The Python backend's shared memory: a memory-backed volume, bounded, within the memory limit.
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert quantity(shm["sizeLimit"]) < quantity(container["resources"]["limits"]["memory"])
    assert quantity(shm["sizeLimit"]) >= 2**30
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # uid 1000 has no home in the image: HOME and the Hugging Face cache must be on writable volumes, the
    # cache on one that outlives the pod.
    def volume_of(path: str) -> dict:
        owner = max((mount for mount in mounts if path == mount or path.startswith(mount.rstrip("/") + "/")),
                    key=len, default=None)
        assert owner, f"{path} is on no volume"
        return volumes[mounts[owner]]
    assert "emptyDir" in volume_of(env["HOME"]["value"])
    claim = volume_of(env["HF_HOME"]["value"])["persistentVolumeClaim"]["claimName"]
    pvc = k8s_doc("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) >= 10 * 2**30


def test_teacher_probes_wait_for_the_model_and_use_triton_health_endpoints():
    _, container = teacher_pod()
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["port"] == "http"
    assert startup["httpGet"]["path"] in {"/v2/health/live", "/v2/health/ready"}
    # Triton opens its ports only after loading the model, and the first start downloads it: the startup
    # probe must allow half an hour before the liveness probe may restart the pod.
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup["failureThreshold"]
    assert budget >= 30 * 60
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe].get("initialDelaySeconds", 0) == 0, probe  # the startup probe does the waiting


def test_teacher_runs_as_the_images_non_root_user_with_resources():
    pod, container = teacher_pod()
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": TEACHER_UID, "runAsGroup": TEACHER_UID, "fsGroup": TEACHER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not security.get("privileged", False)
    assert security.get("runAsNonRoot", True) and security.get("runAsUser", TEACHER_UID) != 0
    # The one deliberate difference from the pgkd services: the Triton image is not known to work on a
    # read-only root filesystem (see the comment in k8s/teacher.yaml). Explicitly false, so that turning
    # it on is a decision made here too.
    assert security["readOnlyRootFilesystem"] is False

    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert quantity(request) <= quantity(limit), f"{resource} request above limit"
    # Room for a 1.5B model loaded in host memory before it moves to the GPU.
    assert quantity(resources["limits"]["memory"]) >= 8 * 2**30


def test_teacher_service_exposes_http_grpc_and_metrics_for_prometheus():
    service = k8s_doc("Service", "pgkd-teacher")
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(TRITON_PORTS["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {name: port["port"] for name, port in ports.items()} == TRITON_PORTS
    assert all(port["targetPort"] in {name, TRITON_PORTS[name]} for name, port in ports.items())
    # The selector picks the teacher's pods and no other deployment's.
    selector = service["spec"]["selector"].items()
    for deployment in k8s_docs("Deployment"):
        picks = selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert picks == (deployment["metadata"]["name"] == "pgkd-teacher"), deployment["metadata"]["name"]


def test_compose_and_kubernetes_agree_on_the_teacher():
    compose_teacher = compose()["services"]["teacher"]
    _, container = teacher_pod()
    assert compose_teacher["command"] == container["args"]
    assert compose_teacher["image"] == container["image"]
    assert compose_teacher["environment"]["PGKD_TEACHER_MODEL"].endswith(
        f":-{env_vars(container)['PGKD_TEACHER_MODEL']['value']}}}")
    published = {int(port.rsplit(":", 1)[1]) for port in compose_teacher["ports"]}
    assert published <= {port["containerPort"] for port in container["ports"]}


def student_pod() -> tuple[dict, dict, dict]:
    """The student server's pod spec, its Triton container and its deployer sidecar."""
    deployment = k8s_doc("Deployment", STUDENT_DEPLOYMENT)
    pod = deployment["spec"]["template"]["spec"]
    return pod, container_named(deployment, "triton"), container_named(deployment, "deployer")


def cascade_container() -> dict:
    """The cascade's container, in the student server's pods."""
    return container_named(k8s_doc("Deployment", STUDENT_DEPLOYMENT), CASCADE)


def test_student_server_runs_triton_and_the_deployer_sidecar_on_one_model_repository():
    deployment = k8s_doc("Deployment", STUDENT_DEPLOYMENT)
    pod, triton, deployer = student_pod()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == STUDENT_SERVER
    assert labels["pgkd.io/kafka-client"] == "true"   # the deployer consumes student-promoted
    # The autoscaler owns the replica count: a `replicas` here would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    # A new pod serves beside the old one until it is ready, never fewer ready pods than wanted.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Triton first: the kubelet starts the deployer (and the cascade, tested below) once Triton's postStart hook
    # has returned.
    assert [c["name"] for c in pod["containers"]] == ["triton", "deployer", CASCADE] and "initContainers" not in pod
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False

    assert triton["image"] == f"{STUDENT_IMAGE}:latest" and triton["imagePullPolicy"] == "IfNotPresent"
    assert triton["args"] == student_command() and "command" not in triton   # the NGC entry point runs it
    assert "envFrom" not in triton                                            # not the pgkd configuration
    # only the thread count of the student's runtime, from the container's own CPU limit (model.py reads it)
    assert triton["env"] == [{"name": "PGKD_SERVING_THREADS", "valueFrom": {"resourceFieldRef": {
        "containerName": "triton", "resource": "limits.cpu", "divisor": "1"}}}]
    assert "PGKD_SERVING_THREADS" in (REPO / "shared" / "pgkd" / "serving" / "triton_model.py").read_text()
    assert "cpu" in triton["resources"]["limits"]
    assert {port["name"]: port["containerPort"] for port in triton["ports"]} == TRITON_PORTS

    assert deployer["image"] == f"{IMAGE}:latest" and deployer["imagePullPolicy"] == "IfNotPresent"
    assert deployer["args"] == ["service", "deployer"] and "command" not in deployer
    assert {"configMapRef": {"name": "pgkd-config"}} in deployer["envFrom"]
    assert {"secretRef": {"name": "pgkd-s3", "optional": True}} in deployer["envFrom"]
    (metrics_port,) = deployer["ports"]
    assert metrics_port["containerPort"] == METRICS_PORT
    # Port names are unique within a pod: `metrics` is Triton's.
    names = [port["name"] for container in pod["containers"] for port in container["ports"]]
    assert len(names) == len(set(names)) and all(len(name) <= 15 for name in names)

    env = env_vars(deployer)
    assert env["PGKD_SERVING_REPLICA"] == {"name": "PGKD_SERVING_REPLICA",
                                           "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    # Its settings, as the deployer parses them from the ConfigMap and its own env (the pod's name as the replica).
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    settings = serving_settings({**config, **{name: entry["value"] for name, entry in env.items() if "value" in entry},
                                 "PGKD_SERVING_REPLICA": "pgkd-student-server-7d9c5b-x2x4q"})
    assert settings.http_address == f"127.0.0.1:{TRITON_PORTS['http']}"   # the same pod
    assert settings.model == student_model() == config["PGKD_STREAM_SERVING_MODEL"]
    assert (settings.format, settings.int8, settings.gpu) == ("onnx", False, False)
    assert set(env) <= serving_variables(), "the deployer's env sets a variable it does not read"

    # One model repository per pod, the deployer writing it and Triton reading it.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    triton_mounts = {mount["mountPath"]: mount for mount in triton["volumeMounts"]}
    deployer_mounts = {mount["mountPath"]: mount for mount in deployer["volumeMounts"]}
    repository = str(settings.repository)
    assert repository == STUDENT_MODEL_REPOSITORY == triton["args"][1].split("=", 1)[1]
    assert triton_mounts[repository]["name"] == deployer_mounts[repository]["name"]
    assert "emptyDir" in volumes[deployer_mounts[repository]["name"]]
    assert triton_mounts[repository].get("readOnly") is True and not deployer_mounts[repository].get("readOnly")
    assert volumes[deployer_mounts["/artifacts"]["name"]]["persistentVolumeClaim"]["claimName"] == "pgkd-artifacts"
    # The Python backend's shared memory: a memory volume, bounded, within Triton's memory limit.
    shm = volumes[triton_mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert 64 * 2**20 < quantity(shm["sizeLimit"]) < quantity(triton["resources"]["limits"]["memory"])
    for container in (triton, deployer):
        assert "emptyDir" in volumes[{m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"]]


def test_student_server_probes_are_tritons_endpoints_and_the_deployers():
    _, triton, deployer = student_pod()
    model = student_model()
    assert triton["readinessProbe"]["httpGet"] == {"path": f"/v2/models/{model}/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup["failureThreshold"]
    assert budget >= 5 * 60
    for probe in ("livenessProbe", "readinessProbe"):
        assert triton[probe].get("initialDelaySeconds", 0) == 0, probe  # the startup probe does the waiting
    # The postStart hook holds the deployer back until Triton is live, for a bounded time.
    hook = " ".join(triton["lifecycle"]["postStart"]["exec"]["command"])
    assert f"curl -sf http://127.0.0.1:{TRITON_PORTS['http']}/v2/health/live" in hook
    assert re.search(r"seq (\d+)", hook) and int(re.search(r"seq (\d+)", hook)[1]) <= startup["failureThreshold"] * 5
    assert hook.rstrip().endswith("exit 1")

    # The deployer: the services' startup and liveness probes on its own port; no readiness probe (its
    # /readyz is the broker's reachability, and a Kafka outage must not take the servers out of the Service).
    port = deployer["ports"][0]["name"]
    assert deployer["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert deployer["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert "readinessProbe" not in deployer


def test_student_server_runs_as_the_images_non_root_users_with_resources():
    pod, triton, deployer = student_pod()
    cascade = cascade_container()
    # Two images, two users: fsGroup the pgkd one (the artifacts volume), each container its image's user.
    assert pod["securityContext"] == {"runAsNonRoot": True, "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}}
    for container, uid in ((triton, STUDENT_UID), (deployer, UID), (cascade, UID)):
        security = container["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, uid), container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert not security.get("privileged", False), container["name"]
        for resource in ("cpu", "memory"):
            request, limit = container["resources"]["requests"][resource], container["resources"]["limits"][resource]
            assert quantity(request) <= quantity(limit), f"{container['name']}: {resource} request above limit"
    # As the pgkd services, the deployer's and the cascade's root filesystems are read-only; Triton's is not, as
    # the teacher's.
    assert deployer["securityContext"]["readOnlyRootFilesystem"] is True
    assert cascade["securityContext"]["readOnlyRootFilesystem"] is True
    assert triton["securityContext"]["readOnlyRootFilesystem"] is False
    # On CPU by default: no GPU, no GPU node (the Component student-gpu/ adds both).
    assert "nvidia.com/gpu" not in triton["resources"]["limits"]
    assert "nvidia.com/gpu" not in cascade["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_student_server_service_exposes_http_grpc_and_both_metrics_ports():
    service = k8s_doc("Service", STUDENT_DEPLOYMENT)
    _, triton, deployer = student_pod()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    container_ports = {port["name"]: port["containerPort"] for c in (triton, deployer) for port in c["ports"]}
    assert set(ports) == set(container_ports)
    for name, port in ports.items():
        assert port["targetPort"] in {name, container_ports[name]} and port["port"] == container_ports[name], name
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(TRITON_PORTS["metrics"])
    # Not selected by the ServiceMonitor `pgkd`, which keeps one series per Service: this one has replicas.
    assert "pgkd.io/metrics" not in service["metadata"]["labels"]
    selector = service["spec"]["selector"].items()
    for deployment in k8s_docs("Deployment"):
        picks = selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert picks == (deployment["metadata"]["name"] == STUDENT_DEPLOYMENT), deployment["metadata"]["name"]


def test_the_autoscaler_scales_the_student_server_on_tritons_cpu():
    (hpa,) = k8s_docs("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = k8s_doc(target["kind"], target["name"])
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", STUDENT_DEPLOYMENT)
    assert deployment["apiVersion"] == target["apiVersion"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    # Triton's CPU alone: the deployer's (an ONNX export per promotion) must not add servers.
    assert metric["type"] == "ContainerResource"
    resource = metric["containerResource"]
    assert (resource["name"], resource["container"]) == ("cpu", "triton")
    container = container_named(deployment, resource["container"])
    assert quantity(container["resources"]["requests"]["cpu"]) > 0   # utilization is against the request
    assert resource["target"]["type"] == "Utilization" and 0 < resource["target"]["averageUtilization"] < 100
    # The way to Triton's queue time is written down beside it.
    assert "nv_inference_queue_duration_us" in (K8S / "student-server.yaml").read_text(encoding="utf-8")


def test_the_student_gpu_component_adds_a_gpu_and_nothing_else(tmp_path):
    """Only where kustomize or kubectl is installed: the base with the Component, rendered from an overlay."""
    import os

    from test_k8s_monitoring import kustomize, write_yaml
    write_yaml(tmp_path / "kustomization.yaml", {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, tmp_path)], "components": [os.path.relpath(K8S_STUDENT_GPU, tmp_path)]})
    base, gpu = kustomize(K8S), kustomize(tmp_path)

    def key(doc):
        return doc["kind"], doc["metadata"]["name"]
    assert [key(doc) for doc in gpu] == [key(doc) for doc in base]
    changed = [key(doc) for doc, before in zip(gpu, base) if doc != before]
    assert changed == [("Deployment", STUDENT_DEPLOYMENT)]
    (deployment,) = [doc for doc in gpu if key(doc) == changed[0]]
    validate_manifest(deployment, K8S_VERSIONS[-1])
    pod = deployment["spec"]["template"]["spec"]
    triton, deployer = container_named(deployment, "triton"), container_named(deployment, "deployer")
    # The GPU placement of the trainer and the teacher.
    trainer = k8s_doc("Deployment", "pgkd-trainer")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == trainer["nodeSelector"] and pod["tolerations"] == trainer["tolerations"]
    assert str(triton["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in deployer["resources"]["limits"]
    env = env_vars(deployer)
    assert env["PGKD_SERVING_GPU"] == {"name": "PGKD_SERVING_GPU", "value": "1"}
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    settings = serving_settings({**config, **{name: entry["value"] for name, entry in env.items() if "value" in entry}})
    assert settings.gpu is True
    # Everything else of the Deployment as in the base.
    (before,) = [doc for doc in base if key(doc) == changed[0]]
    assert container_named(before, "deployer")["env"] == [e for e in deployer["env"] if e["name"] != "PGKD_SERVING_GPU"]


def test_compose_and_kubernetes_agree_on_the_student_server():
    server, deployer = compose()["services"][STUDENT_SERVER], compose()["services"]["deployer"]
    _, triton, sidecar = student_pod()
    assert server["command"] == triton["args"]
    assert server["image"] == triton["image"] and deployer["image"] == sidecar["image"]
    assert deployer["command"] == sidecar["args"]
    # The health check is the readiness probe.
    assert urlsplit(server["healthcheck"]["test"][-1]).path == triton["readinessProbe"]["httpGet"]["path"]
    published = {int(port.rsplit(":", 1)[1]) for port in server["ports"]}
    assert published <= {port["containerPort"] for port in triton["ports"]}
    assert compose_default(deployer["environment"]["PGKD_SERVING_REPOSITORY"]) == \
        env_vars(sidecar)["PGKD_SERVING_REPOSITORY"]["value"]
    # The shared settings: compose's default is the ConfigMap's value.
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    for key in ("PGKD_SERVING_MODEL", "PGKD_SERVING_FORMAT", "PGKD_SERVING_INT8", "PGKD_STREAM_SERVING_MODEL"):
        assert compose_default(deployer["environment"][key]) == config[key], key


def test_the_cascade_runs_in_the_student_server_pods_on_their_model_repository(tmp_path):
    """The cascade's container: `pgkd cascade serve` in front of its own pod's Triton, reading the calibrations
    from the pod's repository (an emptyDir: only a container of the pod can), its policy from a ConfigMap."""
    from pgkd.teachers.transports import TeacherURL
    pod, triton, deployer = student_pod()
    cascade = cascade_container()
    assert cascade["image"] == f"{IMAGE}:latest" and cascade["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in cascade   # the image's ENTRYPOINT ["pgkd"]
    options = cascade_options(cascade["args"])
    assert options.host == "0.0.0.0"   # reached through the Service pgkd-cascade, and by the probes
    # The student: this pod's Triton, on loopback.
    student = urlsplit(options.student)
    triton_ports = {port["name"]: port["containerPort"] for port in triton["ports"]}
    assert (student.scheme, student.hostname, student.port) == ("http", "127.0.0.1", triton_ports["http"])
    assert options.student_model == student_model()
    # The teacher: the Service pgkd-teacher, its HTTP port, the model `teacher`.
    teacher = TeacherURL.parse(options.teacher)
    teacher_ports = {port["name"]: port["port"] for port in k8s_doc("Service", "pgkd-teacher")["spec"]["ports"]}
    assert (teacher.scheme, teacher.host, teacher.port, teacher.model) == \
        ("triton", "pgkd-teacher", teacher_ports["http"], TEACHER_MODEL_NAME)
    assert options.publish_labels
    # PGKD_BROKER_URL, PGKD_TOPIC_PREFIX and PGKD_KAFKA_* from the ConfigMap; the TLS files are
    # test_k8s_kafka_security.py's. It reads no artifacts: no S3 credentials.
    assert cascade["envFrom"] == [{"configMapRef": {"name": "pgkd-config"}}]
    assert "env" not in cascade

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in cascade["volumeMounts"]}
    # The calibrations: the served model's folder in the repository the deployer writes, read-only.
    repository = env_vars(deployer)["PGKD_SERVING_REPOSITORY"]["value"]
    assert Path(options.calibration) == Path(repository) / student_model()
    deployer_mounts = {mount["mountPath"]: mount["name"] for mount in deployer["volumeMounts"]}
    assert mounts[repository]["name"] == deployer_mounts[repository] and mounts[repository].get("readOnly") is True
    assert "emptyDir" in volumes[mounts[repository]["name"]]
    # The policy: a key of the ConfigMap pgkd-cascade-policy, its folder mounted (a subPath mount would never see
    # an edit of the ConfigMap), a policy the cascade reads.
    policy = Path(options.policy_file)
    mount = mounts[str(policy.parent)]
    assert "subPath" not in mount and "subPathExpr" not in mount and mount.get("readOnly") is True
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == CASCADE_POLICY and "items" not in source and not source.get("optional")
    data = k8s_doc("ConfigMap", CASCADE_POLICY)["data"]
    assert set(data) == {policy.name}
    assert read_policy(data[policy.name], tmp_path).max_teacher_share == 0.2
    # The root filesystem is read-only: /tmp, PyTriton's workspace (~/.cache/pytriton) and the shared memory
    # of its Python backend are volumes of the cascade's own, the shared memory bounded within the memory limit.
    for path in ("/tmp", "/home/pgkd/.cache", "/dev/shm"):
        volume = volumes[mounts[path]["name"]]
        assert "emptyDir" in volume, path
        assert not any(mounts[path]["name"] == m["name"] for c in (triton, deployer) for m in c["volumeMounts"]), path
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert 64 * 2**20 < quantity(shm["sizeLimit"]) < quantity(cascade["resources"]["limits"]["memory"])

    # Its ports, as it opens them; Triton's own metrics port of the cascade (--metrics-port) is not scraped.
    assert {port["name"]: port["containerPort"] for port in cascade["ports"]} == {
        "cascade-http": options.http_port, "cascade-grpc": options.grpc_port,
        "cascade-metrics": options.cascade_metrics_port}
    # Ready once the model `cascade` is; live while its Triton answers; PyTriton's start given time.
    assert cascade["readinessProbe"]["httpGet"] == {"path": f"/v2/models/{cascade_model()}/ready",
                                                    "port": "cascade-http"}
    assert cascade["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "cascade-http"}
    startup = cascade["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": "cascade-http"}
    assert startup.get("periodSeconds", 10) * startup["failureThreshold"] >= 60
    for probe in ("livenessProbe", "readinessProbe"):
        assert cascade[probe].get("initialDelaySeconds", 0) == 0, probe  # the startup probe does the waiting
    assert cascade["resources"]["requests"]["cpu"] and cascade["resources"]["requests"]["memory"]


def test_the_cascade_service_reaches_the_cascades_of_the_student_server_pods():
    service = k8s_doc("Service", CASCADE_SERVICE)
    cascade = cascade_container()
    container_ports = {port["name"]: port["containerPort"] for port in cascade["ports"]}
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == set(container_ports)
    for name, port in ports.items():
        assert port["targetPort"] in {name, container_ports[name]} and port["port"] == container_ports[name], name
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(container_ports["cascade-metrics"])
    # Its own component label: not selected by the ServiceMonitors of the five services or the student server.
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == CASCADE
    assert "pgkd.io/metrics" not in service["metadata"]["labels"]
    # The student server's pods, and no other deployment's.
    selector = service["spec"]["selector"].items()
    for deployment in k8s_docs("Deployment"):
        picks = selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert picks == (deployment["metadata"]["name"] == STUDENT_DEPLOYMENT), deployment["metadata"]["name"]
    # The student server's Service does not take the cascade's ports: clients choose which they ask.
    assert not {port["name"] for port in k8s_doc("Service", STUDENT_DEPLOYMENT)["spec"]["ports"]} & set(ports)


def test_compose_and_kubernetes_agree_on_the_cascade(tmp_path):
    in_compose = compose()["services"][CASCADE]
    container = cascade_container()
    # The same command but for the addresses of the student and the teacher (compose's services, the pod's
    # loopback and the Service pgkd-teacher); the same image.
    assert in_compose["image"] == container["image"]
    options = vars(cascade_options([compose_default(part) for part in in_compose["command"]]))
    k8s_options = vars(cascade_options(container["args"]))
    addresses = {"student", "teacher"}
    assert {k: v for k, v in options.items() if k not in addresses} == \
        {k: v for k, v in k8s_options.items() if k not in addresses}
    # The same policy.
    data = k8s_doc("ConfigMap", CASCADE_POLICY)["data"][CASCADE_POLICY_FILE.name]
    assert read_policy(data, tmp_path) == read_policy(CASCADE_POLICY_FILE.read_text(encoding="utf-8"), tmp_path)
    assert json.loads(data) == json.loads(CASCADE_POLICY_FILE.read_text(encoding="utf-8"))
    # The health check is the readiness probe; the published ports are the container's.
    (url,) = re.findall(r"'(http://[^']+)'", in_compose["healthcheck"]["test"][-1])
    assert urlsplit(url).path == container["readinessProbe"]["httpGet"]["path"]
    published = {int(port.rsplit(":", 1)[1]) for port in in_compose["ports"]}
    assert published <= {port["containerPort"] for port in container["ports"]}


def test_kafka_topics_match_the_configuration():
    from pgkd.distributed.messages import TOPICS as CODE_TOPICS
    assert sorted(TOPICS) == sorted(TOPIC_PREFIX + topic for topic in CODE_TOPICS)   # the code's topics
    topics = k8s_docs("KafkaTopic")
    assert sorted(topic["spec"]["topicName"] for topic in topics) == sorted(TOPICS)
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    bootstrap = urlsplit(config["PGKD_BROKER_URL"]).hostname
    for topic in topics:
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        cluster = topic["metadata"]["labels"]["strimzi.io/cluster"]
        assert cluster == "pgkd"
        assert bootstrap == f"{cluster}-kafka-bootstrap"  # Strimzi's name for the cluster's bootstrap Service
        assert topic["spec"]["topicName"].startswith(config["PGKD_TOPIC_PREFIX"])
        spec = topic["spec"]
        assert spec["partitions"] >= 1 and spec["replicas"] >= 1
        assert int(spec["config"].get("min.insync.replicas", 1)) <= spec["replicas"]


def test_compose_and_kubernetes_agree_on_the_configuration():
    config = k8s_doc("ConfigMap", "pgkd-config")["data"]
    compose_env = {key: str(value) for key, value in compose()["services"]["trainer"]["environment"].items()}
    for key in ("PGKD_ARTIFACTS", "PGKD_TOPIC_PREFIX", "PGKD_METRICS_PORT", "PGKD_SERVING_MODEL"):
        assert compose_env[key] == config[key], key
    # The same keys, but for the broker's TLS files (compose runs PLAINTEXT) and where Prometheus is.
    assert set(config) - set(compose_env) <= {"PGKD_KAFKA_SECURITY_PROTOCOL", "PGKD_KAFKA_CA_FILE",
                                              "PGKD_KAFKA_CERT_FILE", "PGKD_KAFKA_KEY_FILE"}
    assert set(compose_env) == set(config) - {"PGKD_KAFKA_SECURITY_PROTOCOL", "PGKD_KAFKA_CA_FILE",
                                              "PGKD_KAFKA_CERT_FILE", "PGKD_KAFKA_KEY_FILE"}
    # ingest's settings: compose's default (`${NAME:-default}`) is the ConfigMap's value.
    ingest_env = {key: str(value) for key, value in compose()["services"]["ingest"]["environment"].items()}
    for key in STREAM_DEFAULTS:
        assert ingest_env[key] == "${%s:-%s}" % (key, config[key]), key
    assert urlsplit(compose_env["PGKD_BROKER_URL"]).scheme == urlsplit(config["PGKD_BROKER_URL"]).scheme


def test_kustomize_build_renders_valid_labelled_manifests():
    """Only where kustomize or kubectl is installed: the rendered output, with namespace and labels applied."""
    from test_k8s_monitoring import kustomize
    rendered = kustomize(K8S)
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert len(rendered) == sum(len(load_yaml_all(K8S / resource)) for resource in listed)
    for doc in rendered:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        validate_manifest(doc, K8S_VERSIONS[-1])
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pgkd", where
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "pgkd", where
        if doc["kind"] == "Deployment":
            assert doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pgkd", where
            assert "app.kubernetes.io/part-of" not in doc["spec"]["selector"]["matchLabels"], where


# ------------------------------------------------------------------------------------ negative controls

def test_the_validators_reject_broken_documents():
    """Every check above must be able to fail: one broken copy of a real document per kind of mistake."""
    trainer = k8s_doc("Deployment", "pgkd-trainer")

    misspelt = copy.deepcopy(trainer)
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    wrong_type = copy.deepcopy(trainer)
    wrong_type["spec"]["replicas"] = "one"
    missing = copy.deepcopy(trainer)
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    topic = k8s_docs("KafkaTopic")[0]
    topic_misspelt = copy.deepcopy(topic)
    topic_misspelt["spec"]["partition"] = 3
    topic_zero = copy.deepcopy(topic)
    topic_zero["spec"]["partitions"] = 0
    topic_bad_label = copy.deepcopy(topic)
    topic_bad_label["metadata"]["labels"]["strimzi.io/cluster"] = 1
    teacher = k8s_doc("Deployment", "pgkd-teacher")
    teacher_misspelt = copy.deepcopy(teacher)
    teacher_misspelt["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGet"]["paht"] = "/v2/health/live"
    teacher_bad_port = copy.deepcopy(k8s_doc("Service", "pgkd-teacher"))
    teacher_bad_port["spec"]["ports"][0]["port"] = "http"
    hpa = k8s_doc("HorizontalPodAutoscaler", STUDENT_DEPLOYMENT)
    hpa_misspelt = copy.deepcopy(hpa)
    hpa_misspelt["spec"]["metrics"][0]["containerResource"]["containr"] = "triton"
    hpa_bad_type = copy.deepcopy(hpa)
    hpa_bad_type["spec"]["maxReplicas"] = "four"
    student = k8s_doc("Deployment", STUDENT_DEPLOYMENT)
    student_bad_hook = copy.deepcopy(student)
    student_bad_hook["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"] = "curl"
    student_bad_env = copy.deepcopy(student)
    student_bad_env["spec"]["template"]["spec"]["containers"][1]["env"][2]["valueFrom"]["fieldRef"]["path"] = "x"
    cascade_bad_mount = copy.deepcopy(student)
    cascade_bad_mount["spec"]["template"]["spec"]["containers"][2]["volumeMounts"][0]["readOnly"] = "yes"
    cascade_bad_policy = copy.deepcopy(k8s_doc("ConfigMap", CASCADE_POLICY))
    cascade_bad_policy["data"]["policy.json"] = {"max_teacher_share": 0.2}    # data values are strings
    for broken in (misspelt, wrong_type, missing, topic_misspelt, topic_zero, topic_bad_label, teacher_misspelt,
                   teacher_bad_port, hpa_misspelt, hpa_bad_type, student_bad_hook, student_bad_env, cascade_bad_mount,
                   cascade_bad_policy):
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(broken, K8S_VERSIONS[-1])
    # A kind nobody has a schema for is an error, not a pass.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_manifest({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                          K8S_VERSIONS[-1])

    unknown_key = copy.deepcopy(compose())
    unknown_key["services"]["trainer"]["comand"] = ["service", "trainer"]
    bad_condition = copy.deepcopy(compose())
    bad_condition["services"]["trainer"]["depends_on"]["topics"]["condition"] = "service_done"
    bad_volume = copy.deepcopy(compose())
    bad_volume["volumes"]["artifacts"] = {"drivr": "local"}
    bad_shm = copy.deepcopy(compose())
    bad_shm["services"]["teacher"]["shm_size"] = ["2gb"]
    bad_gpu = copy.deepcopy(load_yaml(GPU_OVERRIDE))
    bad_gpu["services"]["teacher"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    bad_healthcheck = copy.deepcopy(compose())
    bad_healthcheck["services"][STUDENT_SERVER]["healthcheck"]["start_perod"] = "2m"
    bad_build_args = copy.deepcopy(load_yaml(GPU_OVERRIDE))
    bad_build_args["services"][STUDENT_SERVER]["build"]["args"] = "ONNXRUNTIME=onnxruntime-gpu"
    for broken in (unknown_key, bad_condition, bad_volume, bad_shm, bad_gpu, bad_healthcheck, bad_build_args):
        assert schema_errors(compose_validator(), broken)

    # The deployer's settings parser rejects what the deploy files could get wrong.
    from pgkd.errors import UserError
    for env in ({"PGKD_SERVING_REPOSITORY": "/models", "PGKD_SERVING_URL": "http://student-server"},
                {"PGKD_SERVING_REPOSITORY": "/models", "PGKD_SERVING_GPU": "true"},
                {"PGKD_SERVING_URL": "student-server:8000"}):
        with pytest.raises(UserError):
            serving_settings(env)

    # `pgkd cascade serve` rejects what the cascade's command could get wrong: a misspelt option, a missing
    # one, a bad host, two policies at once; its policy file reader a policy that is not one.
    args = cascade_container()["args"]
    for argv in ([part.replace("--policy-file", "--polcy-file") for part in args],
                 [part for part in args if part not in ("--teacher", "triton://pgkd-teacher:8000/teacher")],
                 [part.replace("0.0.0.0", "0.0.0.0:8020") for part in args],
                 args + ["--threshold", "0.8", "--max-teacher-share", "0.2"]):
        assert argv != args
        with pytest.raises(SystemExit):
            cascade_options(argv)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        for text in ('{"max_teacher_share": 2}', '{"max_teacher_shar": 0.2}',
                     '{"threshold": 0.8, "target_accuracy": 0.9}', "max_teacher_share: 0.2"):
            with pytest.raises(UserError):
                read_policy(text, Path(folder))
