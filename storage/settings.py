"""Where the factory keeps its data, and the few process-wide settings.

`EVOLFORGE_HOME` (default `~/.evolforge`) is a local folder (a path or `file://` URL) holding
datasets, the catalog, the request cache, converted models and Prefect results, or an
`s3://bucket/prefix` URL (any S3-compatible store: endpoint and credentials from the
environment, see `storage/fs.py`) holding the versions and the request cache, with what must stay
on one machine in a local folder derived from the URL. Tests point it at a temporary folder.

`home()` is always a local folder: the home itself, or the local folder of a home on S3 (its
`HOME_URL` file names the URL, so a `DatasetStore` or request cache opened on it works on the
object store). `home_url()` is the home as the user set it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from storage.fs import HomeError, HomeLocation, ObjectStore, parse_home, url_digest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOME_URL_FILE = "HOME_URL"

_stores: dict[tuple[str, str | None], ObjectStore] = {}
_checked: set[tuple[str, str | None, str | None]] = set()
_lock = threading.Lock()


def home_location() -> HomeLocation:
    return parse_home(os.environ.get("EVOLFORGE_HOME") or "~/.evolforge")


def home_url() -> str:
    """The data home as configured: a local path, or `s3://bucket/prefix`."""
    return home_location().url


def home() -> Path:
    """The data home's local folder, created on first use: the home itself, or for a home on S3
    its local folder (`EVOLFORGE_CACHE`, default `~/.cache/evolforge/<hash of the URL>`), after a
    preflight of the S3 setting (once per process; a bad one raises `HomeError`, one line)."""
    location = home_location()
    if location.local is not None:
        location.local.mkdir(parents=True, exist_ok=True)
        return location.local
    preflight(location)
    path = local_dir(location)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / HOME_URL_FILE
    try:
        recorded = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        recorded = None
    if recorded is not None and recorded != location.url:
        raise HomeError(
            f"EVOLFORGE_CACHE {path} is the local folder of {recorded}, not of {location.url}: "
            "give each home its own"
        )
    if recorded is None:
        tmp = path / f".{HOME_URL_FILE}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(location.url + "\n", encoding="utf-8")
        os.replace(tmp, marker)
    return path


def local_dir(location: HomeLocation) -> Path:
    """Where a home on S3 keeps its machine-local part."""
    env = os.environ.get("EVOLFORGE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return (base / "evolforge" / url_digest(location.url)).resolve()


def preflight(location: HomeLocation | None = None) -> None:
    """Check a home on S3 can be used (credentials, endpoint, bucket) before any stage runs;
    nothing to check for a local one. Flows and the CLI reach it through `home()`."""
    location = location or home_location()
    if location.local is not None:
        return
    from storage.fs import endpoint_url

    key = (location.url, endpoint_url(), os.environ.get("AWS_ACCESS_KEY_ID"))
    with _lock:
        if key in _checked:
            return
    object_store_for(location).check()
    with _lock:
        _checked.add(key)


def object_store_for(location: HomeLocation) -> ObjectStore:
    from storage.fs import endpoint_url

    key = (location.url, endpoint_url())
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = ObjectStore(location)
        return store


def remote_of(local: Path) -> ObjectStore | None:
    """The object store whose local folder `local` is (its `HOME_URL` file), or None for a
    local home."""
    try:
        url = (Path(local) / HOME_URL_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return object_store_for(parse_home(url))


def shared_data_dir() -> Path:
    """The reference math data (`../shared/data` beside the checkout), overridable for users."""
    env = os.environ.get("EVOLFORGE_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (PROJECT_ROOT.parent / "shared" / "data").resolve()


def shard_workers() -> int:
    """Shards of a stage run at once in a flow (`EVOLFORGE_SHARD_WORKERS`, default 1): on one
    machine the engine is the bottleneck and runs one batch at a time; a Ray task runner (or
    several GPU engines) is where more pays."""
    return max(1, int(os.environ.get("EVOLFORGE_SHARD_WORKERS", "1")))
