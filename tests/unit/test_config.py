import pytest

from pipelines.core.config import DatasetSpec, load_job, load_registry, validate_job
from pipelines.core.errors import ConfigError
from tests.helpers import REPO


def test_every_shipped_config_loads():
    registry = load_registry(REPO / "configs" / "datasets")
    assert registry, "configs/datasets holds at least one data set"
    for job in sorted((REPO / "configs" / "jobs").glob("*.yaml")):
        load_job(job)


def test_job_names_registry_entries(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "jobs").mkdir()
    (tmp_path / "datasets" / "a.yaml").write_text("name: a\nsource: /data/a\nversion: 2014\n")
    (tmp_path / "jobs" / "j.yaml").write_text(
        "datasets: [a, {name: b, source: /data/b}]\nout: /tmp/out\nmodel: {detect_max_side: 640}\n"
    )
    job = load_job(tmp_path / "jobs" / "j.yaml")
    assert [d.name for d in job.datasets] == ["a", "b"]
    assert job.datasets[0].version == "2014"
    assert job.model.detect_max_side == 640


def test_unknown_registry_name_is_a_clear_error(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text("datasets: [nope]\n")
    with pytest.raises(ConfigError, match="nope"):
        load_job(tmp_path / "jobs" / "j.yaml")


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"datasets": []}, "no data set"),
        ({"datasets": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}, "twice"),
        ({"datasets": [{"name": "A B", "source": "x"}]}, "a-z0-9"),
        ({"datasets": [{"name": "a", "source": "x"}], "typo": 1}, "typo"),
        ({"datasets": [{"name": "a", "source": "x"}], "model": {"detector": "yolo"}}, "detector"),
    ],
)
def test_bad_jobs_are_refused(raw, match):
    with pytest.raises(ConfigError, match=match):
        validate_job(raw)


def test_dataset_spec_defaults():
    spec = DatasetSpec(name="x", source="/d")
    assert (spec.version, spec.license, spec.removed) == ("", "unknown", False)
