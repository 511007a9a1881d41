"""Where a data home's shared objects live: a local folder, or an S3-compatible object store.

`EVOLFORGE_HOME` is a plain path or `file://` URL (the default, `~/.evolforge`) or an
`s3://bucket/prefix` URL. A local home is one folder for everything. A home on S3 is split:

- on the object store (`ObjectStore`, below): what every node shares — dataset and artifact
  versions (`datasets/<name>/<version>/…`, each `_manifest.json` written last with a conditional
  put), the `CURRENT` pointers, and the request cache's segments (`cache/requests/`);
- in a local folder of each machine (`storage.settings.home()`, `~/.cache/evolforge/<hash of
  the URL>` or `EVOLFORGE_CACHE`): what cannot live on an object store or belongs to one
  process — the DuckDB catalog file, the run and catalog locks, converted models, Prefect state,
  work folders of artifacts being trained, and a read-through copy of the versions this machine
  read (each file checked against its manifest's sha256).

The endpoint comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (unset: AWS itself), the
credentials from the environment (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a profile,
an instance role): botocore finds them; nothing here writes them anywhere.

Objects are immutable except `CURRENT`: `put_new` is a conditional put (`If-None-Match: *`), so
of two writers of one name exactly one writes and the other learns it lost (a no-op for
content-named objects, the winner's manifest for a version).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from storage.errors import UserError

SUPPORTED = "a local path, file://PATH or s3://BUCKET[/PREFIX]"


class HomeError(UserError):
    """The data home's setting is wrong: an unsupported URL, a missing bucket, no credentials."""


@dataclass(frozen=True)
class HomeLocation:
    """A parsed `EVOLFORGE_HOME`: `local` is set for a folder, `bucket`/`prefix` for S3."""

    url: str
    local: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @property
    def remote(self) -> bool:
        return self.local is None


def parse_home(text: str) -> HomeLocation:
    """`~/x`, `/x`, `file:///x` → a local folder; `s3://bucket/prefix` → an object store."""
    text = text.strip()
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        return HomeLocation(str(path), local=path)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        path = Path(parsed.path or "/").expanduser().resolve()
        return HomeLocation(str(path), local=path)
    if scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise HomeError(f"EVOLFORGE_HOME {text!r}: no bucket (want s3://BUCKET[/PREFIX])")
        prefix = parsed.path.strip("/")
        url = f"s3://{parsed.netloc}" + (f"/{prefix}" if prefix else "")
        return HomeLocation(url, bucket=parsed.netloc, prefix=prefix)
    raise HomeError(f"EVOLFORGE_HOME {text!r}: unsupported scheme {scheme!r} (want {SUPPORTED})")


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class ObjectStore:
    """The shared part of a home on S3: small, whole-object operations on keys relative to the
    home's prefix (`datasets/seeds/<version>/_manifest.json`)."""

    def __init__(self, location: HomeLocation):
        if not location.remote:
            raise ValueError("ObjectStore is for a home on an object store")
        self.location = location
        self.url = location.url
        self.bucket = location.bucket
        self.prefix = location.prefix
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        """The s3fs file system (also registered on DuckDB connections). No listing cache:
        other nodes write beside us, and a version must be seen as soon as it is committed."""
        if self._fs is None:
            import s3fs

            client: dict[str, Any] = {"region_name": _region()}
            endpoint = endpoint_url()
            if endpoint:
                client["endpoint_url"] = endpoint
            self._fs = s3fs.S3FileSystem(
                client_kwargs=client, use_listings_cache=False, skip_instance_cache=True
            )
        return self._fs

    # -- names ---------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """`bucket/prefix/key` (s3fs's form of a path)."""
        base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return f"{base}/{key}" if key else base

    def uri(self, key: str) -> str:
        return f"s3://{self.path(key)}"

    def key_of(self, path: str) -> str:
        base = self.path("") + "/"
        path = path.removeprefix("s3://")
        return path[len(base) :] if path.startswith(base) else path

    # -- operations ----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        return self.fs.cat_file(self.path(key))

    def put(self, key: str, data: bytes) -> None:
        """Write or replace (only `CURRENT` pointers are ever replaced)."""
        self.fs.pipe_file(self.path(key), data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write unless the object exists (a conditional put): True when this call wrote it."""
        try:
            self.fs.pipe_file(self.path(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def put_file_new(self, key: str, source: Path) -> bool:
        """`put_new` from a local file (multipart for big checkpoints)."""
        try:
            self.fs.put_file(str(source), self.path(key), mode="create")
        except FileExistsError:
            return False
        return True

    def download(self, key: str, target: Path) -> None:
        self.fs.get_file(self.path(key), str(target))

    def listdir(self, key: str) -> list[str]:
        """Names directly under `key/` (objects and common prefixes); empty when none."""
        try:
            entries = self.fs.ls(self.path(key), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        base = self.path(key).rstrip("/") + "/"
        return sorted({e[len(base) :].split("/")[0] for e in entries if e.startswith(base)} - {""})

    def find(self, key: str) -> list[str]:
        """Keys of every object under `key/` (relative to the home)."""
        return sorted(self.key_of(p) for p in self.fs.find(self.path(key)))

    def glob(self, pattern: str) -> list[str]:
        """Keys (relative to the home) matching a glob under the home."""
        return sorted(self.key_of(p) for p in self.fs.glob(self.path(pattern)))

    # -- the preflight -------------------------------------------------------------------------
    def check(self) -> None:
        """Fail with one line naming what is wrong: no credentials, an endpoint that does not
        answer, credentials the store refuses, a bucket that does not exist. One short request
        (HEAD bucket), no retries."""
        import boto3
        import botocore.config
        import botocore.exceptions

        endpoint = endpoint_url()
        where = f"endpoint {endpoint}" if endpoint else "AWS S3 (no AWS_ENDPOINT_URL set)"
        session = boto3.session.Session()
        if session.get_credentials() is None:
            raise HomeError(
                f"EVOLFORGE_HOME {self.url}: no S3 credentials in the environment "
                "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )
        config = botocore.config.Config(
            connect_timeout=5, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"}
        )
        client = session.client("s3", endpoint_url=endpoint, region_name=_region(), config=config)
        try:
            client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.EndpointConnectionError as exc:
            raise HomeError(
                f"EVOLFORGE_HOME {self.url}: cannot reach the S3 {where} ({exc})"
            ) from None
        except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError):
            raise HomeError(f"EVOLFORGE_HOME {self.url}: the S3 {where} timed out") from None
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise HomeError(
                    f"EVOLFORGE_HOME {self.url}: bucket {self.bucket!r} does not exist at {where}"
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise HomeError(
                    f"EVOLFORGE_HOME {self.url}: the S3 {where} refused the credentials "
                    f"for bucket {self.bucket!r} ({code})"
                ) from None
            raise HomeError(
                f"EVOLFORGE_HOME {self.url}: the S3 {where} answered {code or exc}"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise HomeError(f"EVOLFORGE_HOME {self.url}: S3 {where}: {exc}") from None


def content_key(path: str, sha256: str) -> str:
    """The object name of a file stored by content: `part-00000.parquet` with sha256 `ab12…`
    → `part-00000.ab12….parquet`. Two writers of different bytes never share a name; the same
    bytes written twice are one object."""
    folder, _, base = path.rpartition("/")
    stem, dot, suffix = base.partition(".")
    named = f"{stem}.{sha256[:32]}{dot}{suffix}" if dot else f"{base}.{sha256[:32]}"
    return f"{folder}/{named}" if folder else named


def url_digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]
