"""File operations on a store root: a local directory, or any fsspec URL (s3://, memory://, ...).

Only what the protocol needs: read/list small files, create a small file exclusively and atomically
(the publish step), hand zarr a store for a sub-directory, and remove or measure a sub-tree.
Remote URLs take their credentials and endpoint from the environment (AWS_ENDPOINT_URL, ...).
"""
from __future__ import annotations

import os
import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from storage.errors import StoreError


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class Root:
    """A store root. `rel` arguments are '/'-separated paths that the caller has already checked."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self._syncing: list[tuple[str, Future]] = []  # (path, its fsync) of files written, not yet waited for
        if is_local(url):
            self.fs = None
            self.path = os.path.abspath(url.removeprefix("file://"))
        else:
            from fsspec.core import url_to_fs

            try:
                self.fs, self.path = url_to_fs(self.url)
            except (ImportError, ValueError) as e:
                raise StoreError(f"cannot open store URL {url}: {e} (install the fsspec backend for it, e.g. s3fs)") from None
            self.path = self.path.rstrip("/")

    def _join(self, rel: str) -> str:
        if self.fs is None:
            return os.path.join(self.path, *rel.split("/")) if rel else self.path
        return f"{self.path}/{rel}" if rel else self.path

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            if self.fs is None:
                with open(self._join(rel), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self._join(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            raise StoreError(f"cannot read {self._join(rel)}: permission denied") from None

    def read_range(self, rel: str, start: int, end: int) -> np.ndarray:
        """Bytes [start, end) of a file as a uint8 array; StoreError if the file is missing or shorter.

        Locally one pread into the array, with read-ahead off (POSIX_FADV_RANDOM): a rank reads its own
        items only, and read-ahead would pull in the neighbouring items of other ranks. Remote: one
        ranged GET.
        """
        path, n = self._join(rel), end - start
        try:
            if self.fs is not None:
                out = np.frombuffer(bytearray(self.fs.cat_file(path, start=start, end=end)), np.uint8)  # writable, as locally
            else:
                out = np.empty(n, np.uint8)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    got = 0
                    while got < n and (step := os.preadv(fd, [out[got:]], start + got)):
                        got += step
                    out = out[:got]
                finally:
                    os.close(fd)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"{path} is missing") from None
        if len(out) != n:
            raise StoreError(f"{path} is truncated: bytes {start}-{end} asked, {len(out)} there")
        return out

    def write(self, rel: str, data) -> None:
        """Write a whole file, replacing it: a buffer, or a list of buffers written one after the other.

        Locally the file's fsync starts at once, on a thread, so that the disk works while the caller
        writes the next file; fsync_tree waits for it (durable only after fsync_tree).
        """
        parts = data if isinstance(data, list) else [data]
        if self.fs is None:
            path = self._join(rel)
            with open(path, "wb") as f:
                f.writelines(parts)
            self._syncing.append((path, _SYNC.submit(_fsync_path, path)))
        else:
            self.fs.pipe_file(self._join(rel), b"".join(parts))

    def listdir(self, rel: str, prefix: str = "") -> list[str]:
        """Names (not paths) directly under `rel` that start with `prefix`; empty if `rel` does not exist."""
        if self.fs is None:
            try:
                return sorted(n for n in os.listdir(self._join(rel)) if n.startswith(prefix))
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(self._join(rel))
        if prefix:  # an object store lists by key prefix, so this stays cheap with many shards
            paths = self.fs.glob(f"{self._join(rel)}/{prefix}*")
        else:
            try:
                paths = self.fs.ls(self._join(rel), detail=False)
            except FileNotFoundError:
                return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)

    def makedirs(self, rel: str = "") -> None:
        if self.fs is None:
            try:
                os.makedirs(self._join(rel), exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {self._join(rel)}: {e.strerror}") from None
        # Object stores have no directories to make.

    def create(self, rel: str, data: bytes) -> bool:
        """Create file `rel` with `data` atomically, unless it exists. True if this call created it.

        Locally: write a temporary sibling, fsync, then os.link() it to the final name; link fails
        if the name exists, so exactly one of several racing processes wins, and a reader never sees
        a partial file. Remote: one PUT with If-None-Match (s3fs mode="create"), then a read-back,
        because some S3-compatible servers ignore the condition.
        """
        path = self._join(rel)
        if self.fs is None:
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            except OSError as e:
                raise StoreError(f"cannot write {path}: {e.strerror or e}") from None
            _fsync_path(os.path.dirname(path))
            return True
        if self.fs.exists(path):
            return False
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        self.fs.invalidate_cache(path)
        return self.fs.cat_file(path) == data

    def zarr_store(self, rel: str, *, read_only: bool):
        """A zarr store rooted at `rel`."""
        if self.fs is None:
            return LocalStore(self._join(rel), read_only=read_only)
        return FsspecStore.from_url(f"{self.url}/{rel}", read_only=read_only)

    def open_group(self, rel: str, *, mode: str) -> zarr.Group:
        return zarr.open_group(store=self.zarr_store(rel, read_only=mode == "r"), mode=mode, zarr_format=3)

    def fsync_tree(self, rel: str) -> None:
        """Flush a local sub-tree to disk so that a published marker never outlives its data after a
        power loss (a SIGKILL alone would not need this: the page cache survives it)."""
        if self.fs is not None:
            return  # a completed PUT is durable
        top = self._join(rel)
        started = {path: done for path, done in self._syncing if path.startswith(top + os.sep)}
        self._syncing = [(path, done) for path, done in self._syncing if path not in started]
        # The rest at once: the file system commits concurrent fsyncs together, where one after the
        # other each waits for a journal commit of its own (a shard is 15 files and 8 directories).
        paths = [p for d, _, names in os.walk(top) for p in (os.path.join(d, n) for n in names) if p not in started]
        rest = [_SYNC.submit(_fsync_path, p) for p in paths + [d for d, _, _ in os.walk(top)]]
        for done in [*started.values(), *rest]:
            done.result()
        _fsync_path(os.path.dirname(top))

    def remove_tree(self, rel: str) -> None:
        path = self._join(rel)
        if self.fs is None:
            self._syncing = [(p, done) for p, done in self._syncing if not p.startswith(path + os.sep)]
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def size(self, rel: str = "") -> int:
        """Bytes of all files under `rel`."""
        path = self._join(rel)
        if self.fs is None:
            if os.path.isfile(path):
                return os.path.getsize(path)
            total = 0
            for dpath, _, fnames in os.walk(path):
                total += sum(os.path.getsize(os.path.join(dpath, n)) for n in fnames)
            return total
        try:
            return int(self.fs.du(path, total=True))
        except FileNotFoundError:
            return 0


# fsync waits on the disk, not the CPU: many at once cost no more than one.
_SYNC = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-fsync")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
