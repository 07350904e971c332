"""insightface model packs: where they come from, that they are the files we expect, what they are.

A pack is a folder of .onnx files (buffalo_l: det_10g.onnx, w600k_r50.onnx and three models we do
not use). ``pack`` in the config is a folder, a ``gs://`` URI (copied once into a local cache
folder) or a name looked up in insightface's model root (``~/.insightface/models/<name>``).
Every .onnx file must match a sha256 list in ``sha256sum`` format (``<pack>/SHA256SUMS`` unless
``pack_sha256`` names another), so a pack changed after it was vetted is refused, never used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import storage
from ..config import ModelConfig
from ..errors import FatalError

SUMS_FILE = "SHA256SUMS"
LICENSE_FILES = ("MODEL.LICENSE", "LICENSE", "LICENSE.txt", "LICENSE.md")
DEFAULT_ROOT = "~/.insightface/models"
DEFAULT_CACHE = "~/.cache/faceaudit"


@dataclass
class PackInfo:
    """A verified pack: what the run manifest should say about the models that made its vectors."""

    name: str
    source: str  # as configured: a name, folder or URI
    folder: Path  # the local folder the models are read from
    license: str
    files: dict[str, str] = field(default_factory=dict)  # .onnx file name -> sha256
    license_file: str | None = None  # name and sha256 of a licence file shipped in the pack

    def manifest(self) -> dict:
        return {
            "pack": self.name,
            "source": self.source,
            "license": self.license,
            "license_file": self.license_file,
            "sha256": dict(sorted(self.files.items())),
        }


def cache_dir(config: ModelConfig) -> Path:
    return Path(os.path.expanduser(config.cache_dir or DEFAULT_CACHE))


def pack_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1]


def resolve_pack(config: ModelConfig) -> Path:
    """The local folder of the configured pack (copying a remote one into the cache first)."""
    source = config.pack or "buffalo_l"
    if "://" in source and not source.startswith("file://"):
        return fetch_pack(source, cache_dir(config) / "packs")
    local = Path(os.path.expanduser(source.removeprefix("file://")))
    if local.is_dir():
        return local
    if "/" in source or os.sep in source:
        raise FatalError(f"model pack folder {source} does not exist")
    named = Path(os.path.expanduser(config.pack_root or DEFAULT_ROOT)) / source
    if not named.is_dir():
        raise FatalError(
            f"model pack {source!r} is not in {named.parent}: place the unzipped pack there "
            f"(see docs/insightface.md), set model.pack_root, or give model.pack as a folder or gs:// URI"
        )
    return named


def fetch_pack(uri: str, cache: Path) -> Path:
    """Copy a remote pack's .onnx, sums and licence files into ``cache/<hash of uri>/`` once."""
    folder = cache / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n in storage.listdir(uri) if n.endswith(".onnx") or n in (SUMS_FILE, *LICENSE_FILES)]
    if not names:
        raise FatalError(f"model pack {uri} holds no .onnx file")
    for name in names:
        target = folder / name
        if not target.exists():  # a stale or tampered copy is caught by the sha256 check after
            storage.download(storage.join(uri, name), str(target))  # streamed: packs are large
    return folder


def read_sums(text: str) -> dict[str, str]:
    """File name -> sha256 from ``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>``)."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = os.path.basename(name.strip().lstrip("*"))
        if len(digest) != 64 or not name:
            raise FatalError(f"not a sha256sum line: {line[:80]!r}")
        sums[name] = digest.lower()
    return sums


def load_sums(config: ModelConfig, folder: Path) -> dict[str, str]:
    uri = config.pack_sha256 or str(folder / SUMS_FILE)
    if not storage.exists(uri):
        raise FatalError(
            f"no sha256 list for the model pack at {uri}: on a copy you trust, run "
            f"'sha256sum *.onnx > {SUMS_FILE}' in the pack folder, or point model.pack_sha256 at such a list"
        )
    return read_sums(storage.read_text(uri))


def verify_pack(folder: Path, sums: dict[str, str]) -> dict[str, str]:
    """Every .onnx file's sha256, each checked against ``sums``; any mismatch is fatal."""
    found = {p.name: storage.sha256_file(str(p)) for p in sorted(folder.glob("*.onnx"))}
    if not found:
        raise FatalError(f"model pack {folder} holds no .onnx file")
    unlisted = sorted(set(found) - set(sums))
    wrong = sorted(n for n in found if n in sums and sums[n] != found[n])
    if unlisted or wrong:
        raise FatalError(
            f"model pack {folder} does not match its sha256 list: "
            f"not listed {unlisted}, different content {wrong}; refusing to load it"
        )
    return found


def open_pack(config: ModelConfig) -> PackInfo:
    """Resolve and verify the configured pack."""
    source = config.pack or "buffalo_l"
    folder = resolve_pack(config)
    files = verify_pack(folder, load_sums(config, folder))
    license_file = next((folder / n for n in LICENSE_FILES if (folder / n).is_file()), None)
    return PackInfo(
        name=pack_name(source),
        source=source,
        folder=folder,
        license=config.pack_license or "unknown",
        files=files,
        license_file=f"{license_file.name} sha256:{storage.sha256_file(str(license_file))}"
        if license_file
        else None,
    )
