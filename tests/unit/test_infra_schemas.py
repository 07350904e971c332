"""infra/ checked against the real schemas, offline: the Ray cluster launcher YAML against the
ray-schema.json that the ray wheel ships; the Kubernetes manifests with kubernetes-validate
--strict for every Kubernetes minor in K8S_VERSIONS; the RayJob against KubeRay's CRD schema
(tests/data/kuberay/); the GCE node configs, the flex template specs and the Scheduler's request
body against the discovery documents bundled in google-api-python-client; every shell script
through shellcheck and every Dockerfile through hadolint."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = REPO / "tests" / "data" / "kuberay"
# timeZone (GA 1.27) and podFailurePolicy (GA 1.31, beta and on by default from 1.26) need 1.29+
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _filled(text: str) -> str:
    """A recipe with its placeholders filled in as the scripts fill them."""
    return (
        text.replace(":GIT_SHA", f":{SHA}")
        .replace("${LAUNCHER_IMAGE}", f"us-central1-docker.pkg.dev/p/faceaudit/launcher:{SHA}")
        .replace("${WORKER_IMAGE}", f"us-central1-docker.pkg.dev/p/faceaudit/worker-cpu:{SHA}")
    )


def _discovery(api: str) -> dict:
    documents = pytest.importorskip("googleapiclient").__file__
    path = Path(documents).parent / "discovery_cache" / "documents" / f"{api}.json"
    return json.loads(path.read_text())


def _json_schema(document: dict, name: str) -> dict:
    """A discovery document's schema ``name`` as a strict JSON Schema: no property that the API does
    not declare, every $ref resolved within the document, enums kept."""

    def convert(node):
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref":
                out["$ref"] = f"#/definitions/{value}"
            elif key in ("properties",):
                out[key] = {k: convert(v) for k, v in value.items()}
            elif key in ("items", "additionalProperties"):
                out[key] = convert(value)
            elif key in ("type", "enum"):
                if key == "type" and value == "any":
                    continue
                out[key] = value
        if node.get("format") in ("int64", "uint64"):  # JSON carries 64-bit integers either way
            out["type"] = ["string", "integer"]
        if out.get("type") == "object" and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out

    definitions = {k: convert(v) for k, v in document["schemas"].items()}
    return {"$ref": f"#/definitions/{name}", "definitions": definitions}


def _errors(schema: dict, instance) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


# --- Ray cluster launcher ---------------------------------------------------------------------


def test_the_ray_cluster_yaml_matches_the_ray_wheels_schema():
    ray = pytest.importorskip("ray")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(_filled((INFRA / "ray" / "gcp-gpu.yaml").read_text()))
    assert not _errors(schema, config)


def test_the_ray_node_configs_are_compute_engine_instances():
    """GCE's own schema: scheduling is an object (a list is rejected), every GPU node terminates on
    host maintenance (GPU VMs cannot live-migrate)."""
    schema = _json_schema(_discovery("compute.v1"), "Instance")
    config = yaml.safe_load(_filled((INFRA / "ray" / "gcp-gpu.yaml").read_text()))
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert not _errors(schema, node), name
        if node.get("guestAccelerators"):
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", name


def test_the_schema_check_catches_a_list_for_scheduling():
    schema = _json_schema(_discovery("compute.v1"), "Instance")
    assert _errors(
        schema, {"machineType": "n1-standard-8", "scheduling": [{"onHostMaintenance": "TERMINATE"}]}
    )
    assert _errors(schema, {"scheduling": {"onHostMaintenance": "LATER"}})
    assert _errors(schema, {"schedulng": {}})


# --- Kubernetes -------------------------------------------------------------------------------

MANIFESTS = [INFRA / "k8s" / "rebuild-cronjob.yaml", INFRA / "kuberay" / "networkpolicy.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in yaml.safe_load_all(_filled(path.read_text())):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)  # raises on any error


def test_strict_kubernetes_validation_rejects_an_unknown_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cron = yaml.safe_load(_filled(MANIFESTS[0].read_text()))
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSIONS[-1], strict=True)


def _kuberay_schema() -> dict:
    schema = json.loads((KUBERAY / "rayjob-v1.schema.json").read_text())

    def strict(node):  # structural schema: an object with properties allows nothing else
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return schema


def test_the_rayjob_matches_kuberays_crd():
    rayjob = yaml.safe_load(_filled((INFRA / "kuberay" / "rayjob.yaml").read_text()))
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    schema = _kuberay_schema()
    body = copy.deepcopy(rayjob)
    body["metadata"] = {}  # ObjectMeta is not part of a CRD's schema
    assert not _errors(schema, body)
    broken = copy.deepcopy(body)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    assert _errors(schema, broken), "the CRD schema must reject an unknown field"


def test_the_rayjob_pods_are_valid_kubernetes_pod_specs():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    rayjob = yaml.safe_load(_filled((INFRA / "kuberay" / "rayjob.yaml").read_text()))
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


# --- Dataflow and Cloud Scheduler -------------------------------------------------------------


@pytest.mark.parametrize("name", ["flex-template.json", "rebuild-template.json"])
def test_flex_template_specs_are_container_specs(name):
    """The spec file Dataflow reads is a ContainerSpec: image, sdkInfo, metadata, defaultEnvironment."""
    schema = _json_schema(_discovery("dataflow.v1b3"), "ContainerSpec")
    spec = json.loads(_filled((INFRA / "dataflow" / name).read_text()))
    assert not _errors(schema, spec)
    assert spec["defaultEnvironment"]["sdkContainerImage"].endswith(f":{SHA}")


def test_the_schedulers_request_body_is_a_flex_template_launch(tmp_path):
    """The body the Scheduler job posts, as schedule_rebuild.sh writes it (run with stand-ins)."""
    from tests.unit.test_infra_stand_ins import run_script

    calls = run_script(tmp_path, "infra/dataflow/schedule_rebuild.sh", ["p", "us-central1", "b", "sa@p.iam"])
    (create,) = [c for c in calls if c[:5] == ["gcloud", "scheduler", "jobs", "create", "http"]]
    body = json.loads(create[create.index("--message-body") + 1])
    schema = _json_schema(_discovery("dataflow.v1b3"), "LaunchFlexTemplateRequest")
    assert not _errors(schema, body)
    template = json.loads((INFRA / "dataflow" / "rebuild-template.json").read_text())
    declared = {p["name"] for p in template["metadata"]["parameters"]}
    assert set(body["launchParameter"]["parameters"]) <= declared
    job = {
        "schedule": "17 3 * * *",
        "timeZone": "Etc/UTC",
        "httpTarget": {"uri": "https://x", "body": "e30="},
    }
    assert not _errors(_json_schema(_discovery("cloudscheduler.v1"), "Job"), job)


# --- linters ----------------------------------------------------------------------------------

SCRIPTS = sorted(INFRA.rglob("*.sh"))
DOCKERFILES = sorted(p for p in INFRA.rglob("Dockerfile*") if p.is_file())


def _tool(name: str) -> str:
    venv = Path(__import__("sys").executable).parent / name
    found = str(venv) if venv.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (the dev extra installs it)")
    return found


def test_shellcheck_finds_nothing():
    result = subprocess.run([_tool("shellcheck"), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_nothing():
    """Every exception is a `# hadolint ignore=...` with its reason on the lines above it."""
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"#\s*hadolint ignore=", line):
                assert i and lines[i - 1].startswith("#"), f"{path.name}:{i + 1}: an ignore without a reason"
