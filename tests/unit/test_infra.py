"""infra/ names only files and commands that exist: every YAML and JSON parses, every repository
path it mentions exists, every `faceaudit` command and flag is one the CLI has."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main
import yaml

from pipelines.cli import app
from pipelines.core.config import load_job

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".sh", ".py", ".md"}


def _is_text(path: Path) -> bool:
    return path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name.startswith("Dockerfile"))


TEXT_FILES = sorted(p for p in INFRA.rglob("*") if _is_text(p))
# A repository path, also inside an image (/app/infra/..., /template/infra/...) or as ./infra/...
REPO_PATH = re.compile(r"(?<![\w-])((?:infra|configs|pipelines|indexing|bench|tests)/[\w./-]*\w)")
# `faceaudit <words> <rest of the line>`, but not inside a path or URL (gs://BUCKET/faceaudit and ...)
COMMAND = re.compile(r"(?<![\w./:-])faceaudit ((?:[a-z][\w-]* ?)+)([^\n|]*)")
# Words that may follow "faceaudit" in prose. Any other word there must be a command: a mistyped
# command name fails the test instead of being taken for prose.
PROSE = frozenset(
    {
        "itself",  # "... then faceaudit itself" (the package, in the Dockerfiles)
        "with",  # "installs faceaudit with its test tools" (a comment in the README's code)
    }
)


def _cli_commands() -> dict[str, set[str]]:
    """Each command path ("ingest", "index build") -> its option names."""
    found: dict[str, set[str]] = {}

    def walk(command, prefix: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            path = f"{prefix} {name}".strip()
            found[path] = {opt for param in sub.params for opt in getattr(param, "opts", [])}
            found[path] |= {opt for param in sub.params for opt in getattr(param, "secondary_opts", [])}
            found[path].add("--help")
            walk(sub, path)

    walk(typer.main.get_command(app), "")
    return found


def test_infra_has_the_issue_files():
    for rel in (
        "docker/Dockerfile.cpu",
        "docker/Dockerfile.gpu",
        "ray/gcp-gpu.yaml",
        "kuberay/rayjob.yaml",
        "dataflow/flex-template.json",
        "dataflow/launch.sh",
    ):
        assert (INFRA / rel).is_file(), rel


@pytest.mark.parametrize("path", [p for p in TEXT_FILES if p.suffix in {".yaml", ".yml"}], ids=str)
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", [p for p in TEXT_FILES if p.suffix == ".json"], ids=str)
def test_every_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", sorted((INFRA / "jobs").glob("*.yaml")), ids=str)
def test_job_files_are_valid_jobs(path):
    job = load_job(path)
    assert job.datasets and job.engine in ("ray", "beam")


@pytest.mark.parametrize("path", TEXT_FILES, ids=str)
def test_paths_named_in_infra_exist(path):
    for rel in REPO_PATH.findall(path.read_text()):
        assert (REPO / rel).exists(), f"{path.name} names {rel}, which is not in the repository"


@pytest.mark.parametrize("path", [p for p in TEXT_FILES if p.name.startswith("Dockerfile")], ids=str)
def test_dockerfiles_copy_what_exists(path):
    for line in path.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                assert (REPO / source).exists(), f"{path.name} copies {source}"


def _command_named(words: list[str], commands: dict[str, set[str]]) -> str:
    """The command that ``faceaudit <words>`` runs; AssertionError if the words name none.

    The longest leading run of words that is a command wins ("ingest on the head" -> "ingest");
    words after a command group must start with one of its sub-commands.
    """
    if words[0] in PROSE:
        return ""
    matched = list(words)
    while matched and " ".join(matched) not in commands:
        matched.pop()
    assert matched, f"'faceaudit {words[0]}' is no command: {sorted(c for c in commands if ' ' not in c)}"
    name = " ".join(matched)
    subcommands = sorted(c.rsplit(" ", 1)[1] for c in commands if c.startswith(name + " "))
    if subcommands and len(words) > len(matched):
        raise AssertionError(f"'faceaudit {name} {words[len(matched)]}': {name} has only {subcommands}")
    return name


def test_command_names_are_checked():
    """The check itself: a typo in a command or sub-command name is an error, not prose."""
    commands = _cli_commands()
    assert _command_named(["ingest", "on", "the", "head"], commands) == "ingest"
    assert _command_named(["index", "build"], commands) == "index build"
    assert _command_named(["itself"], commands) == ""
    for typo in (["ingset"], ["index", "biuld"], ["rebuidl", "the", "index"]):
        with pytest.raises(AssertionError):
            _command_named(typo, commands)
    found = COMMAND.findall("runs under gs://B/faceaudit and the index; `faceaudit ingset --config x`")
    assert found == [("ingset ", "--config x`")]


@pytest.mark.parametrize("path", TEXT_FILES, ids=str)
def test_faceaudit_commands_and_flags_exist(path):
    commands = _cli_commands()
    for words, rest in COMMAND.findall(path.read_text()):
        try:
            name = _command_named(words.split(), commands)
        except AssertionError as exc:
            raise AssertionError(f"{path.name}: {exc}") from None
        if not name:
            continue  # prose
        options = commands[name]
        if name in ("ingest", "rebuild") and "--engine beam" in rest:
            options = options | _beam_options()  # the rest are Beam pipeline options
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            assert flag in options, f"{path.name}: faceaudit {name} has no {flag}"


def _beam_options() -> set[str]:
    """Every flag that Beam's PipelineOptions (all of its views) accepts."""
    pipeline_options = pytest.importorskip("apache_beam.options.pipeline_options")
    parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)
    todo = [pipeline_options.PipelineOptions]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        cls._add_argparse_args(parser)
    return set(parser._option_string_actions)


def test_the_entry_points_are_real_commands():
    commands = _cli_commands()
    rayjob = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    entry = shlex.split(rayjob["spec"]["entrypoint"])
    assert entry[:2] == ["faceaudit", "ingest"]
    assert {w for w in entry if w.startswith("--")} <= commands["ingest"]
    spec = importlib.util.spec_from_file_location("ingest_main", INFRA / "dataflow" / "ingest_main.py")
    ingest_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ingest_main)
    args = ingest_main.ingest_args(["--config=infra/jobs/ingest-cpu.yaml", "--run_id=r1", "--project=p"])
    assert args[0] == "ingest" and "--run-id" in args and "--runner=DataflowRunner" in args
    assert {a for a in args if a.startswith("--") and "=" not in a} <= commands["ingest"]
    template = json.loads((INFRA / "dataflow" / "flex-template.json").read_text())
    launcher = (INFRA / "dataflow" / "Dockerfile.launcher").read_text()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/infra/dataflow/ingest_main.py" in launcher
    names = {p["name"] for p in template["metadata"]["parameters"]}
    assert names <= set(ingest_main.FLAGS)


def test_the_rebuild_schedules_run_real_commands():
    commands = _cli_commands()
    cron = yaml.safe_load((INFRA / "k8s" / "rebuild-cronjob.yaml").read_text())
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[0] == "rebuild" and {a for a in args if a.startswith("--")} <= commands["rebuild"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and pod["restartPolicy"] == "Never"
    spec = importlib.util.spec_from_file_location("rebuild_main", INFRA / "dataflow" / "rebuild_main.py")
    rebuild_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rebuild_main)
    args = rebuild_main.rebuild_args(
        ["--registry=gs://b/r", "--work=gs://b/w", "--index=gs://b/i", "--project=p"]
    )
    assert args[0] == "rebuild" and "--runner=DataflowRunner" in args and "--project=p" in args
    assert {a for a in args if a.startswith("--") and "=" not in a} <= commands["rebuild"]
    template = json.loads((INFRA / "dataflow" / "rebuild-template.json").read_text())
    assert {p["name"] for p in template["metadata"]["parameters"]} <= set(rebuild_main.FLAGS)
    launcher = (INFRA / "dataflow" / "Dockerfile.rebuild-launcher").read_text()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/infra/dataflow/rebuild_main.py" in launcher


def test_clusters_ask_for_gpu_workers():
    launcher = yaml.safe_load((INFRA / "ray" / "gcp-gpu.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any(t.get("resources", {}).get("GPU") for t in launcher["available_node_types"].values())
    rayjob = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = [c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert any("nvidia.com/gpu" in lim for lim in limits)


@pytest.mark.parametrize("path", [p for p in TEXT_FILES if p.suffix == ".sh"], ids=str)
def test_scripts_are_valid_bash(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert path.stat().st_mode & 0o111, f"{path.name} is not executable"


# --- the prose: every `faceaudit` command and flag named in the README and docs/ ---------------

# flags of other tools that the prose names in a code span of their own, with the tool
OTHER_TOOLS_FLAGS = {
    "--no-deps": "pip",
    "--require-hashes": "pip",
    "--pack": "bench/gpu.py",
    "--budget": "bench/gpu.py",
    "--n": "bench/index.py",
    "--wheels": "bench/gpu.py",
    "--additional-pipeline-options": "gcloud dataflow flex-template run",
    "--additional-experiments": "gcloud dataflow flex-template run",
}
PROSE_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _code_in(markdown: str) -> str:
    """The code of a Markdown text: its fenced blocks and inline code spans, one per line. Prose
    outside them says "faceaudit" as the project's name ("faceaudit reads ..."), not a command."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.M | re.S)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return "\n".join(blocks + spans)


@pytest.mark.parametrize("path", PROSE_FILES, ids=lambda p: p.name)
def test_faceaudit_commands_and_flags_in_prose_exist(path, tmp_path):
    code = tmp_path / path.name
    code.write_text(_code_in(path.read_text()))
    test_faceaudit_commands_and_flags_exist(code)
    # a code span that is a flag alone (`--keep-versions N`) names a flag of some command
    every = set().union(*_cli_commands().values()) | _beam_options() | set(OTHER_TOOLS_FLAGS)
    for span in re.findall(r"`(--[a-z][\w-]*)[^`]*`", path.read_text()):
        assert span in every, f"{path.name}: no faceaudit command has {span}"


def test_the_prose_check_catches_a_flag_no_command_has(tmp_path):
    doc = tmp_path / "ops.md"
    doc.write_text("faceaudit reads versions older than `--gc-grace-s`: `faceaudit prune --gc-grace-s 60`\n")
    with pytest.raises(AssertionError, match="--gc-grace-s"):
        (tmp_path / "out").mkdir()
        test_faceaudit_commands_and_flags_in_prose_exist(doc, tmp_path / "out")


# --- the recipes would really run (each a check of an error the first recipes had) --------------

LOCKS = INFRA / "requirements"


def _pin(lock: str, package: str) -> str:
    (version,) = re.findall(rf"^{re.escape(package)}(?:\[[\w,]+\])?==(\S+)", (LOCKS / lock).read_text(), re.M)
    return version


def test_gpu_jobs_name_a_pack_the_workers_can_read():
    """No image or mount holds ~/.insightface/models: a GPU job's pack is a gs:// URI with its
    SHA256SUMS, and it asks only for providers the GPU image has (no TensorRT there)."""
    for path in sorted((INFRA / "jobs").glob("*.yaml")):
        model = load_job(path).model
        if model.backend != "insightface":
            continue
        assert model.pack and model.pack.startswith("gs://"), f"{path.name}: pack {model.pack}"
        assert (model.pack_sha256 or f"{model.pack}/SHA256SUMS").startswith("gs://")
        assert "tensorrt" not in model.providers and "cuda" in model.providers, path.name


def test_the_readme_suggests_no_provider_the_gpu_image_lacks():
    section = (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    for providers in re.findall(r"providers: \[([^\]]*)\]", section):
        assert "tensorrt" not in providers, providers
    assert "tensorrt" not in (INFRA / "docker" / "Dockerfile.gpu").read_text().lower()


def test_the_cronjob_rebuilds_from_a_real_registry_with_sized_workers():
    cron = yaml.safe_load((INFRA / "k8s" / "rebuild-cronjob.yaml").read_text())
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    registries = args[args.index("--registry") + 1].split(",")
    # the catalogue baked into the image (/app = the repository root there), then the operator's
    assert registries[0] == "/app/configs/datasets/catalog" and (REPO / "configs/datasets/catalog").is_dir()
    assert registries[-1] == "/registry"
    text = (INFRA / "k8s" / "rebuild-cronjob.yaml").read_text()
    assert "--from-file=configs/datasets/" not in text, "configs/datasets/ is the test photos' entry"
    workers = int(args[args.index("--workers") + 1])
    resources = container["resources"]
    assert workers == int(resources["requests"]["cpu"]), "one worker per requested CPU, not per node core"
    limit_gib = int(resources["limits"]["memory"].removesuffix("Gi"))
    assert workers * 3 + 4 <= limit_gib, "3 GiB per dlib worker and 4 GiB for the index build"


def test_image_tags_never_move():
    """No recipe names a moving tag (latest, cpu, gpu): images are tagged with the commit."""
    for path in TEXT_FILES:
        text = path.read_text()
        assert ":latest" not in text, path.name
        for image in re.findall(r"(?:docker\.pkg\.dev|REGISTRY)/\S+", text):
            image = image.strip("\"'`,)")
            if image.startswith("REGISTRY/") or "docker.pkg.dev/" in image:
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                assert tag in ("", "GIT_SHA", "$IMAGE_TAG", '"$(git'), f"{path.name}: {image}"
    for rel in ("ray/gcp-gpu.yaml", "kuberay/rayjob.yaml", "k8s/rebuild-cronjob.yaml"):
        images = re.findall(r"image: (\S+)", (INFRA / rel).read_text())
        assert images and all(i.endswith(":GIT_SHA") for i in images), rel


def test_images_run_as_a_numeric_non_root_user():
    for rel in ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu"):
        users = re.findall(r"^USER (\S+)", (INFRA / rel).read_text(), re.M)
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), rel
    cron = yaml.safe_load((INFRA / "k8s" / "rebuild-cronjob.yaml").read_text())
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def test_the_build_context_leaves_out_the_venv():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "**/__pycache__"} <= set(ignored)
    for copied in ("pipelines", "indexing", "configs", "infra", "pyproject.toml", "README.md"):
        assert copied not in ignored


def test_one_ray_and_one_beam_across_the_images():
    rayjob = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == _pin("gpu.txt", "ray") == _pin("cpu.txt", "ray")
    beams = {lock: _pin(lock, "apache-beam") for lock in ("cpu.txt", "gpu.txt", "dataflow.txt")}
    assert len(set(beams.values())) == 1, beams
    for dockerfile in ("Dockerfile.worker", "Dockerfile.worker-gpu"):
        (arg,) = re.findall(r"ARG BEAM_VERSION=(\S+)", (INFRA / "dataflow" / dockerfile).read_text())
        assert arg == beams["dataflow.txt"], dockerfile
