"""The catalogue of known data sets (configs/datasets/catalog/): every file validates as a registry
entry, carries every catalogue key and its sources, and the README's table is what it renders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.core import catalog
from pipelines.core.config import DatasetSpec, load_job, load_registry, validate_job
from pipelines.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "configs" / "datasets" / "catalog"
FILES = sorted(CATALOG.glob("*.yaml"))
KEYS = {
    "name",
    "version",
    "source",
    "license",
    "description",
    "removed",
    "format",
    "contact",
    "status",
    "citation",
    "facts",
}
# The data sets the catalogue must describe (the list).
REQUIRED = {
    "ms-celeb-1m",
    "megaface",
    "vggface",
    "vggface2",
    "celeba",
    "lfw",
    "casia-webface",
    "umdfaces",
    "ijb-a",
    "ijb-b",
    "ijb-c",
    "facescrub",
    "pubfig",
    "youtube-faces",
    "brainwash",
    "duke-mtmc",
    "uccs",
    "ibm-dif",
    "diveface",
    "pipa",
    "wider-face",
    "laion-face",
    "ffhq",
}


def test_the_catalogue_loads_as_a_registry():
    specs = load_registry(CATALOG)
    assert len(specs) >= 20 and REQUIRED <= set(specs)
    assert len(FILES) == len(specs)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_entry_has_every_key_and_its_sources(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == KEYS, f"{path.name}: keys {sorted(set(raw) ^ KEYS)}"
    spec = DatasetSpec.model_validate(raw)
    assert path.stem == spec.name
    assert spec.facts and len(set(spec.facts)) == len(spec.facts)
    # no personal home pages (a person's name in a URL): sources are organisations' and publications'
    assert not any("~" in url for url in spec.facts)
    for key in ("license", "contact", "citation", "version"):
        assert str(raw[key]).strip(), f"{path.name}: {key} is empty (write unknown)"
    if spec.status == "withdrawn":
        assert catalog.withdrawn_on(spec), f"{path.name}: say 'Withdrawn: <date or date unknown>'"
    if spec.source is None:
        assert "No source" in spec.description, f"{path.name}: say why there is no source"


def test_a_broken_catalogue_file_fails_as_any_data_set_file(tmp_path):
    broken = yaml.safe_load((CATALOG / "ms-celeb-1m.yaml").read_text())
    broken.update(status="gone", format="zip", facts=["ftp://example.org/x"])
    errors = []
    for kind in ("catalog", "registry"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "ms-celeb-1m.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError) as exc:
            load_registry(folder)
        errors.append(str(exc.value).replace(str(folder), "FOLDER"))
    assert errors[0] == errors[1]
    assert "ms-celeb-1m.yaml: invalid data set" in errors[0]
    assert all(word in errors[0] for word in ("status", "format", "facts"))
    # and layered under a registry, the same error
    with pytest.raises(ConfigError) as layered:
        catalog.load_layers([str(tmp_path / "catalog"), str(REPO / "configs" / "datasets")])
    assert str(layered.value).replace(str(tmp_path / "catalog"), "FOLDER") == errors[0]


def test_no_source_needs_a_reason_and_is_never_ingested(tmp_path):
    with pytest.raises(ValueError, match="description must say why"):
        DatasetSpec(name="x", source=None)
    spec = DatasetSpec(name="x", source=None, description="withdrawn in 2019", status="withdrawn")
    with pytest.raises(ConfigError, match="'x' has no source and cannot be ingested .withdrawn in 2019."):
        validate_job({"datasets": [spec.model_dump()]})
    # a job naming a catalogue entry without a source
    (tmp_path / "datasets").mkdir()
    (tmp_path / "jobs").mkdir()
    shutil.copy(CATALOG / "brainwash.yaml", tmp_path / "datasets")
    (tmp_path / "jobs" / "j.yaml").write_text("datasets: [brainwash]\n")
    with pytest.raises(ConfigError, match="'brainwash' has no source and cannot be ingested"):
        load_job(tmp_path / "jobs" / "j.yaml")


def test_the_shipped_registries_still_load():
    registry = load_registry(REPO / "configs" / "datasets")
    assert registry["deepface-tests"].source == "tests/data/faces"
    assert registry["deepface-tests"].format == "auto" and registry["deepface-tests"].status == "available"


def test_layers_later_folders_win_and_what_is_skipped(tmp_path):
    cat, ops = tmp_path / "cat", tmp_path / "ops"
    cat.mkdir()
    ops.mkdir()
    for name, extra in {
        "gone": {"source": None, "status": "withdrawn"},
        "pulled": {"source": str(tmp_path), "status": "withdrawn"},
        "open": {"source": str(tmp_path)},
    }.items():
        (cat / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "description": "d", **extra}))
    (ops / "gone.yaml").write_text(
        yaml.safe_dump({"name": "gone", "source": str(tmp_path), "status": "withdrawn"})
    )
    entries = catalog.load_layers(f"{cat},{ops}")
    assert entries["gone"].operator and entries["gone"].overrides == str(cat)
    assert catalog.skip_reason(entries["gone"]) is None  # the operator's copy of a withdrawn set
    assert "withdrawn" in catalog.skip_reason(entries["pulled"])  # never the catalogue's own source
    assert catalog.skip_reason(entries["open"]) is None
    only_catalog = catalog.load_layers([str(cat), str(tmp_path / "empty-ops")], lambda f: {})
    assert only_catalog == {}
    alone = catalog.load_layers([str(cat)])
    assert catalog.skip_reason(alone["gone"]) == "status withdrawn, no source (d)"
    assert catalog.skip_reason(alone["pulled"]) is None  # a single folder is the operator's own
    with pytest.raises(ConfigError, match="does not exist"):
        catalog.load_layers([str(tmp_path / "nowhere")])


def test_the_readme_table_is_what_the_catalogue_renders():
    import importlib.util

    spec = importlib.util.spec_from_file_location("catalog_table", REPO / "bench" / "catalog_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render(CATALOG)
    readme = (REPO / "README.md").read_text()
    assert catalog.table_in(readme) == rendered, "run: .venv/bin/python bench/catalog_table.py --write"
    assert rendered.count("\n") == len(FILES) + 2
    assert "| ms-celeb-1m | 2016 | withdrawn (2019-06) |" in rendered
