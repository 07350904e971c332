"""The KubeRay recipe keeps the Ray head's unauthenticated Jobs API inside the cluster: a ClusterIP
head Service and a NetworkPolicy that admits only the job's submitter and the Ray pods."""

import yaml

from tests.helpers import REPO

INFRA = REPO / "infra" / "kuberay"


def test_the_head_service_is_cluster_internal():
    head = yaml.safe_load((INFRA / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP"


def test_a_network_policy_admits_only_the_submitter_and_ray_pods():
    rayjob = yaml.safe_load((INFRA / "rayjob.yaml").read_text())
    policy = yaml.safe_load((INFRA / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    sources = [
        peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]
    ]
    assert sources == [{"ray.io/is-ray-node": "yes"}, {"job-name": rayjob["metadata"]["name"]}]
    (submitter,) = [
        r for r in policy["spec"]["ingress"] if "job-name" in r["from"][0]["podSelector"]["matchLabels"]
    ]
    assert submitter["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert "networkpolicy.yaml" in (INFRA / "rayjob.yaml").read_text()  # the apply line names it


DOCKERFILES = {
    "infra/docker/Dockerfile.cpu": "cpu.txt",
    "infra/docker/Dockerfile.gpu": "gpu.txt",
    "infra/dataflow/Dockerfile.launcher": "dataflow.txt",
    "infra/dataflow/Dockerfile.rebuild-launcher": "dataflow.txt",
    "infra/dataflow/Dockerfile.worker": "dataflow.txt",
}


def test_every_image_installs_from_a_hashed_lock():
    for dockerfile, lock in DOCKERFILES.items():
        text = (REPO / dockerfile).read_text()
        installs = [
            line for line in text.splitlines() if "pip install" in line and "--upgrade pip" not in line
        ]
        assert f"--require-hashes -r infra/requirements/{lock}" in text, dockerfile
        assert all("--no-deps" in line for line in installs), (dockerfile, installs)
        pins = [
            line for line in (REPO / "infra" / "requirements" / lock).read_text().splitlines() if "==" in line
        ]
        assert pins and all(line.rstrip(" \\").split("==")[1] for line in pins)
        assert "--hash=sha256:" in (REPO / "infra" / "requirements" / lock).read_text()


def test_the_dataflow_worker_runs_the_launchers_beam():
    import re

    worker = (REPO / "infra" / "dataflow" / "Dockerfile.worker").read_text()
    lock = (REPO / "infra" / "requirements" / "dataflow.txt").read_text()
    (version,) = re.findall(r"ARG BEAM_VERSION=(\S+)", worker)
    assert f"apache-beam=={version} " in lock or f"apache-beam[gcp]=={version} " in lock
