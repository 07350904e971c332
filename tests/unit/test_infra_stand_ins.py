"""The infra scripts run with stand-ins for gcloud, docker, ray and git (small scripts on PATH that
record their arguments); every call is checked against FLAGS, a table of the real commands'
flags (from each command's reference page: gcloud's `gcloud ... --help`, `docker build --help`,
`ray up --help`), and what the scripts launch is checked: images tagged with the commit, CPU and
GPU workers apart, template parameters the template declares, GPUs asked for the documented way."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"

# command path -> the flags it has (only the commands the scripts use; a flag not listed here is
# an error, so a flag a command does not have fails the test instead of failing on the cloud)
GCLOUD_WIDE = {
    "--project",
    "--quiet",
    "--format",
    "--verbosity",
    "--account",
    "--impersonate-service-account",
}
SCHEDULER_HTTP_COMMON = {
    "--location", "--schedule", "--time-zone", "--uri", "--http-method", "--message-body",
    "--message-body-from-file", "--oauth-service-account-email", "--oauth-token-scope",
    "--oidc-service-account-email", "--oidc-token-audience", "--description", "--attempt-deadline",
    "--max-retry-attempts", "--max-retry-duration", "--max-doublings", "--min-backoff", "--max-backoff",
}  # fmt: skip
FLAGS: dict[str, set[str]] = {
    "docker build": {"-f", "--file", "-t", "--tag", "--build-arg", "--platform", "--pull", "--target"},
    "docker push": {"--quiet", "-q"},
    "ray up": {"-y", "--yes", "--no-restart", "--restart-only", "--min-workers", "--max-workers"},
    "ray exec": {"--start", "--stop", "--screen", "--tmux", "--port-forward", "--cluster-name"},
    "ray down": {"-y", "--yes", "--workers-only", "--keep-min-workers"},
    "gcloud storage cp": GCLOUD_WIDE | {"--recursive", "-r", "--content-type"},
    "gcloud dataflow flex-template run": GCLOUD_WIDE
    | {
        "--template-file-gcs-location",
        "--region",
        "--parameters",
        "--temp-location",
        "--staging-location",
        "--service-account-email",
        "--max-workers",
        "--num-workers",
        "--worker-machine-type",
        "--launcher-machine-type",
        "--additional-experiments",
        "--additional-pipeline-options",
        "--additional-user-labels",
        "--network",
        "--subnetwork",
        "--disable-public-ips",
        "--worker-region",
        "--worker-zone",
        "--dataflow-kms-key",
        "--enable-streaming-engine",
        "--flexrs-goal",
    },  # fmt: skip
    "gcloud scheduler jobs describe": GCLOUD_WIDE | {"--location"},
    "gcloud scheduler jobs create http": GCLOUD_WIDE | SCHEDULER_HTTP_COMMON | {"--headers"},
    # `update http` has no --headers: it has --update-headers, --remove-headers, --clear-headers
    "gcloud scheduler jobs update http": GCLOUD_WIDE
    | SCHEDULER_HTTP_COMMON
    | {"--update-headers", "--remove-headers", "--clear-headers", "--clear-message-body"},
}

STAND_IN = r"""#!/usr/bin/env bash
# records its arguments (NUL-separated, one record per call) for tests/unit/test_infra_stand_ins.py
{ printf '%s\0' "$(basename "$0")" "$@"; printf '\036'; } >> "$STANDIN_LOG"
case "$(basename "$0") $1 $2 $3" in
  "git status "*) exit 0 ;;
  "git rev-parse HEAD"*) echo "$STANDIN_SHA" ;;
  "gcloud storage cp "*) cat > "$STANDIN_DIR/uploaded-$(basename "$4")" ;;
  "gcloud scheduler jobs "*) [[ "$3" != describe ]] || exit "${STANDIN_JOB_EXISTS:-1}" ;;
esac
exit 0
"""


def run_script(tmp_path: Path, script: str, args: list[str], **env: str) -> list[list[str]]:
    """Run ``script`` with the stand-ins first on PATH; each call's argv, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("gcloud", "docker", "ray", "git"):
        path = bin_dir / name
        path.write_text(STAND_IN)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls"
    log.write_bytes(b"")
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STANDIN_LOG": str(log),
        "STANDIN_DIR": str(tmp_path),
        "STANDIN_SHA": SHA,
        **env,
    }
    environment.pop("IMAGE_TAG", None)
    result = subprocess.run(
        ["bash", str(REPO / script), *args], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    records = log.read_bytes().split(b"\x1e")
    return [[w.decode() for w in r.split(b"\0")[:-1]] for r in records if r]


def _command(argv: list[str]) -> tuple[str, list[str]]:
    """The longest leading words of ``argv`` that FLAGS knows, and the flags given to it."""
    words = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
    while words and " ".join(words) not in FLAGS:
        words.pop()
    assert words, f"no row in FLAGS for {argv[:4]}"
    flags = [a.split("=", 1)[0] for a in argv[len(words) :] if a.startswith("-") and a != "-"]
    return " ".join(words), flags


def _check_flags(calls: list[list[str]]) -> None:
    for argv in calls:
        if argv[0] == "git":
            continue
        name, flags = _command(argv)
        unknown = [f for f in flags if f not in FLAGS[name]]
        assert not unknown, f"`{name}` has no {unknown}"


def test_the_flag_check_catches_a_flag_a_command_lacks():
    call = ["gcloud", "scheduler", "jobs", "update", "http", "j", "--headers", "Content-Type=x"]
    with pytest.raises(AssertionError, match="--headers"):
        _check_flags([call])


@pytest.mark.parametrize("exists", ["1", "0"], ids=["create", "update"])
def test_schedule_rebuild_creates_then_updates(tmp_path, exists):
    calls = run_script(
        tmp_path,
        "infra/dataflow/schedule_rebuild.sh",
        ["p", "us-central1", "b", "sa@p.iam"],
        STANDIN_JOB_EXISTS=exists,
    )
    _check_flags(calls)
    verb = "create" if exists == "1" else "update"
    (job,) = [c for c in calls if c[:5] == ["gcloud", "scheduler", "jobs", verb, "http"]]
    body = json.loads(job[job.index("--message-body") + 1])
    worker = body["launchParameter"]["environment"]["sdkContainerImage"]
    assert worker.endswith(f"/worker-cpu:{SHA}")
    _check_images(calls)
    spec = json.loads((tmp_path / f"uploaded-faceaudit-rebuild-{SHA}.json").read_text())
    assert spec["defaultEnvironment"]["sdkContainerImage"] == worker


def _check_images(calls: list[list[str]]) -> None:
    """Every image built and pushed is tagged with the commit: no tag that moves."""
    tags = [c[c.index("-t") + 1] for c in calls if c[:2] == ["docker", "build"]]
    pushed = [c[2] for c in calls if c[:2] == ["docker", "push"]]
    assert tags and set(pushed) <= set(tags)
    for image in tags + pushed:
        assert image.rsplit(":", 1)[1] == SHA, image


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-workers", "t4-workers"])
def test_launch_runs_a_declared_template_with_tagged_images(tmp_path, gpu):
    args = ["p", "us-central1", "b", "infra/jobs/ingest-gpu.yaml" if gpu else "infra/jobs/ingest-cpu.yaml"]
    calls = run_script(tmp_path, "infra/dataflow/launch.sh", args + (["--gpu"] if gpu else []))
    _check_flags(calls)
    _check_images(calls)
    (run,) = [c for c in calls if c[:4] == ["gcloud", "dataflow", "flex-template", "run"]]
    spec = json.loads((tmp_path / f"uploaded-faceaudit-ingest-{SHA}.json").read_text())
    declared = {p["name"] for p in spec["metadata"]["parameters"]}
    passed = {run[i + 1].split("=", 1)[0] for i, a in enumerate(run) if a == "--parameters"}
    assert passed and passed <= declared, f"parameters the template does not declare: {passed - declared}"
    worker = spec["defaultEnvironment"]["sdkContainerImage"]
    assert worker.endswith(f"/worker-{'gpu' if gpu else 'cpu'}:{SHA}")
    options = [run[i + 1] for i, a in enumerate(run) if a == "--additional-pipeline-options"]
    experiments = [run[i + 1] for i, a in enumerate(run) if a == "--additional-experiments"]
    assert not any("worker_accelerator" in e for e in experiments)  # a service option now
    if gpu:
        assert any(
            o.startswith("dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;")
            for o in options
        )
        assert "no_use_multiple_sdk_containers" in experiments  # one SDK process: one model per GPU
        assert run[run.index("--worker-machine-type") + 1] == "n1-standard-8"
    else:
        assert not options and not experiments


def test_run_ingest_fills_in_the_image_tag(tmp_path):
    calls = run_script(tmp_path, "infra/ray/run_ingest.sh", ["infra/jobs/ingest-gpu.yaml"])
    _check_flags(calls)
    (up,) = [c for c in calls if c[:2] == ["ray", "up"]]
    cluster = Path(up[-1]).read_text()
    assert f"/gpu:{SHA}\n" in cluster and "GIT_SHA" not in cluster.split("docker:", 1)[1]
    (exec_,) = [c for c in calls if c[:2] == ["ray", "exec"]]
    assert exec_[2] == up[-1] and "faceaudit ingest --config /tmp/faceaudit/jobs/ingest-gpu.yaml" in exec_[3]


def test_a_script_refuses_a_dirty_tree_without_a_tag(tmp_path):
    bin_dir = tmp_path / "bin"
    run_script(tmp_path, "infra/ray/run_ingest.sh", [])  # writes the stand-ins
    (bin_dir / "git").write_text("#!/usr/bin/env bash\necho ' M pipelines/cli.py'\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STANDIN_LOG": str(tmp_path / "calls")}
    env.pop("IMAGE_TAG", None)
    result = subprocess.run(
        ["bash", str(REPO / "infra/ray/run_ingest.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "uncommitted" in result.stderr
