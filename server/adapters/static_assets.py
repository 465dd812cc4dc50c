"""The built storefront assets (`static/dist`, made by `scripts/build-assets`), held in memory.

The asset build writes fingerprinted files (`app.1a2b3c4d.js`), two unfingerprinted ones
(`sw.js`, `manifest.webmanifest`), a `.br` and a `.gz` beside every text file, and
`manifest.json` mapping logical names to file names (storefront spec, section 1). The node
reads all of it once, at start-up: the files are small, and a request then costs a dict lookup
(no disk read, no path ever built from a URL, so no traversal).

Only names the manifest lists (plus `sw.js` and `manifest.webmanifest`) are served. A missing
or unreadable manifest does not stop the node (the API works without the storefront), but
every page render and asset request fails loudly with `AssetsMissing`, whose message says to
run `scripts/build-assets`; the node logs the same at start-up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
UNFINGERPRINTED = ("sw.js", "manifest.webmanifest")

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
_CODING_SUFFIXES = {"br": ".br", "gzip": ".gz"}


class AssetsMissing(RuntimeError):
    """The asset build output is missing or malformed (run `scripts/build-assets`)."""


@dataclass(frozen=True, slots=True)
class Asset:
    """One servable file: its bytes per content coding (`identity` always), type and ETag."""

    name: str
    content_type: str
    bodies: dict[str, bytes]
    etag: str  # strong, quoted; of the identity bytes (coded forms add a suffix)

    @property
    def codings(self) -> tuple[str, ...]:
        """The content codings this asset exists in, in the server's order of preference."""
        return tuple(coding for coding in ("br", "gzip", "identity") if coding in self.bodies)


@dataclass(frozen=True, slots=True)
class AssetBundle:
    """The asset build held in memory: logical names to URLs, and the files by name."""

    directory: Path
    logical: dict[str, str]  # "app.js" -> "app.1a2b3c4d.js"
    files: dict[str, Asset]  # every servable file by its dist name
    sw_version: str = ""

    def url(self, logical_name: str) -> str:
        """`/static/<fingerprinted name>` of a logical asset (`app.css`); AssetsMissing when
        the build did not produce it."""
        name = self.logical.get(logical_name)
        if name is None:
            raise AssetsMissing(
                f"{self.directory / 'manifest.json'} names no {logical_name!r}: "
                "run scripts/build-assets"
            )
        return f"/static/{name}"

    def static(self, name: str) -> Asset | None:
        """A fingerprinted file listed in the manifest, by its dist name; None otherwise."""
        if name in UNFINGERPRINTED:
            return None  # served at the root paths only
        return self.files.get(name)

    def root(self, name: str) -> Asset | None:
        """`sw.js` or `manifest.webmanifest`, if the build made it."""
        return self.files.get(name) if name in UNFINGERPRINTED else None


def resolve_dir(configured: str) -> Path:
    """`FM_STATIC_DIR` as a path: relative ones are taken from the project root."""
    path = Path(configured)
    return path if path.is_absolute() else PROJECT_ROOT / path


def _content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def _read_asset(directory: Path, name: str) -> Asset:
    path = directory / name
    try:
        identity = path.read_bytes()
    except OSError as exc:
        raise AssetsMissing(
            f"{directory / 'manifest.json'} names {name!r}, which cannot be read ({exc}): "
            "run scripts/build-assets"
        ) from None
    bodies = {"identity": identity}
    for coding, suffix in _CODING_SUFFIXES.items():
        coded = directory / (name + suffix)
        if coded.is_file():
            bodies[coding] = coded.read_bytes()
    etag = f'"{hashlib.sha256(identity).hexdigest()[:20]}"'
    return Asset(name, _content_type(name), bodies, etag)


def load_bundle(directory: Path) -> AssetBundle:
    """Read the build in `directory` (its `manifest.json` and every file it names, with their
    `.br`/`.gz` forms); AssetsMissing, saying to run `scripts/build-assets`, if it is not there."""
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise AssetsMissing(
            f"{manifest_path} does not exist: run scripts/build-assets to build the storefront "
            "assets (or point FM_STATIC_DIR at a build)"
        ) from None
    except (OSError, ValueError) as exc:
        raise AssetsMissing(
            f"{manifest_path} is unreadable ({exc}): run scripts/build-assets"
        ) from None
    logical = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(logical, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in logical.items()
    ):
        raise AssetsMissing(f"{manifest_path} has no `files` object: run scripts/build-assets")
    files: dict[str, Asset] = {}
    for name in logical.values():
        if "/" in name or "\\" in name or name.startswith(".") or name in UNFINGERPRINTED:
            raise AssetsMissing(f"{manifest_path} names {name!r}, not a plain file name")
        files[name] = _read_asset(directory, name)
    for name in UNFINGERPRINTED:
        if (directory / name).is_file():
            files[name] = _read_asset(directory, name)
    return AssetBundle(
        directory=directory,
        logical=dict(logical),
        files=files,
        sw_version=str(manifest.get("sw_version", "")),
    )
