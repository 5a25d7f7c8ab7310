"""Run-folder locations through pyarrow's filesystem layer: a local or mounted folder, or a URI.

`StoragePath.parse("results")` is a local folder; `s3://bucket/results`, `gs://bucket/results`,
`file:///mnt/shared/results` go through `pyarrow.fs.FileSystem.from_uri`, so query options such
as `?endpoint_override=host:9000&scheme=http` (MinIO) and the usual credential variables apply.
Every error reaching the store becomes a one-line `StorageError` naming the location.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_pipeline.errors import PipelineError, first_line

# The lock file a job holds in its run folder (see StoragePath.lock).
LOCK_NAME = ".lock"
# The schemes pyarrow.fs.FileSystem.from_uri understands.
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


def uri_fault(location: str) -> str | None:
    """Why `location` is a malformed URI (unknown scheme, nothing after `scheme://`), or None."""
    match = _URI.match(location)
    if match is None:
        return None if "://" not in location else "it is not scheme://location"
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in URI_SCHEMES:
        return f"its scheme {scheme!r} is not one of {', '.join(URI_SCHEMES)}"
    if not rest.split("?", 1)[0].strip("/"):
        return "it names no bucket or folder after scheme://"
    return None


class StorageError(PipelineError):
    """The store could not be reached or refused an operation: `reason` is its word, `hint` what to check."""

    def __init__(self, action: str, location: str, exc: BaseException, remote: bool):
        self.reason = _reason(exc)
        self.hint = (
            "check the credentials (AWS_*/GOOGLE_* variables), the endpoint and that the bucket exists"
            if remote
            else "check the path and its permissions"
        )
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Rerunning the same command resumes: the shards already committed are kept.
            self.hint = "free some space there and run the same command again"
        super().__init__(f"cannot {action} {location}: {self.reason}; {self.hint}")


@dataclass(frozen=True)
class StoragePath:
    """A file or folder on a pyarrow filesystem: `fs` and the path inside it."""

    fs: pafs.FileSystem
    path: str
    # What precedes `path` when shown: "" locally, "s3://" for a bucket, "hdfs://host:port".
    prefix: str = ""

    @classmethod
    def parse(cls, location: StoragePath | str | os.PathLike) -> StoragePath:
        """A location string (plain path, `~`, or `scheme://…`), a Path, or a StoragePath as is."""
        if isinstance(location, StoragePath):
            return location
        text = os.fspath(location)
        if _URI.match(text) is None:
            return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
        fault = uri_fault(text)
        if fault:
            raise PipelineError(f"{text!r} is not a usable location: {fault}")
        parts = urlsplit(text)
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, pa.ArrowException) as exc:
            raise StorageError("open", shown, exc, remote=True) from None
        if isinstance(fs, pafs.LocalFileSystem):
            return cls(fs, path)
        # Bucket stores keep the bucket in the path; others (hdfs) keep the host in the filesystem.
        prefix = f"{parts.scheme}://" if not path.startswith("/") else shown[: len(shown) - len(parts.path)]
        return cls(fs, path.rstrip("/"), prefix)

    def __truediv__(self, name: str) -> StoragePath:
        return dataclasses.replace(self, path=f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        # Never the query string or user:secret@ of the URI it came from.
        return self.prefix + self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> StoragePath:
        return dataclasses.replace(self, path=posixpath.dirname(self.path.rstrip("/")))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @contextlib.contextmanager
    def _reaching(self, action: str) -> Iterator[None]:
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(action, str(self), exc, remote=not self.is_local) from None

    def _type(self) -> pafs.FileType:
        with self._reaching("look up"):
            return self.fs.get_file_info(self.path).type

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def files(self, pattern: str = "*") -> list[StoragePath]:
        """The files directly in this folder whose names match the glob `pattern`, sorted; none if it is absent."""
        with self._reaching("list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        found = [i.base_name for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)]
        return [self / name for name in sorted(found)]

    def read_bytes(self) -> bytes:
        with self._reaching("read"), self.fs.open_input_stream(self.path, compression=None) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input_file(self) -> pa.NativeFile:
        """A random-access file, for `pq.ParquetFile` and `pq.read_table`; close it (use `with`)."""
        with self._reaching("open"):
            return self.fs.open_input_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        self._write_atomically(lambda out: out.write(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_parquet(self, table: pa.Table) -> None:
        self._write_atomically(lambda out: pq.write_table(table, out))

    def _write_atomically(self, write: Callable[[pa.NativeFile], object]) -> None:
        """Readers see the old file or the whole new one, never a part.

        Locally: write a temporary sibling, then rename it (POSIX rename is atomic). An object
        store shows an object only once its upload completes, so there the final key is written
        directly; a rename would be a copy.
        """
        target = self.parent / f".{self.name}.tmp-{os.getpid()}" if self.is_local else self
        with self._reaching("write"):
            if self.is_local:
                self.fs.create_dir(self.parent.path, recursive=True)
            try:
                with self.fs.open_output_stream(target.path, compression=None) as out:
                    write(out)
                if target is not self:
                    self.fs.move(target.path, self.path)
            except BaseException:
                if target is not self:
                    with contextlib.suppress(OSError):
                        self.fs.delete_file(target.path)
                raise

    def delete(self) -> None:
        """Remove this file; a missing one is no error."""
        if self.is_file():
            with self._reaching("delete"):
                self.fs.delete_file(self.path)

    def delete_contents(self) -> None:
        """Remove everything under this folder; a missing folder is no error."""
        with self._reaching("delete the contents of"):
            self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    @contextlib.contextmanager
    def lock(self, what: str = "run folder", fix: str = "or pass another --run_id") -> Iterator[bool]:
        """Hold this local folder's lock file (`.lock`) for the block; a second holder is refused at once.

        Yields True when locked. An object store has no lock (pyarrow offers none): the block runs
        unlocked and yields False, so two jobs must not share a run folder there.
        """
        if not self.is_local:
            yield False
            return
        from filelock import FileLock, Timeout

        self.mkdir()
        lock = FileLock(posixpath.join(self.path, LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise PipelineError(
                f"{what} {self} is in use by another job (it holds {self / LOCK_NAME}): wait for that job to end, "
                f"{fix}"
            ) from None
        except OSError as exc:
            raise StorageError("lock", str(self / LOCK_NAME), exc, remote=False) from None
        try:
            yield True
        finally:
            lock.release()

    def mkdir(self) -> None:
        # An object store has no folders: a key's prefix is its folder, so there is nothing to make.
        if self.is_local:
            with self._reaching("create"):
                self.fs.create_dir(self.path, recursive=True)


def _reason(exc: BaseException) -> str:
    # pyarrow's local errors carry an errno; the store's own message otherwise (first line).
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return first_line(exc, 300)


# What the run-folder functions accept: a StoragePath, a location string, or a local Path.
Location = StoragePath | str | os.PathLike
