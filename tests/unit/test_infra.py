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
PROSE = frozenset({"itself"})  # "... then faceaudit itself" (the package, in the Dockerfiles)


def _cli_commands() -> dict[str, set[str]]:
    """Each command path ("ingest", "index build") -> its option names."""
    found: dict[str, set[str]] = {}

    def walk(command, prefix: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            path = f"{prefix} {name}".strip()
            found[path] = {opt for param in sub.params for opt in getattr(param, "opts", [])}
            found[path] |= {opt for param in sub.params for opt in getattr(param, "secondary_opts", [])}
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
