"""File operations on a store root: a local directory, or any fsspec URL (s3://, memory://, ...).

Only what the protocol needs: read/list small files, create a small file exclusively and atomically
(the publish step), hand zarr a store for a sub-directory, and remove or measure a sub-tree.
Remote URLs take their credentials and endpoint from the environment (AWS_ENDPOINT_URL, ...).
"""
from __future__ import annotations

import os
import secrets
import shutil

import zarr
from zarr.storage import FsspecStore, LocalStore

from storage.errors import StoreError


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class Root:
    """A store root. `rel` arguments are '/'-separated paths that the caller has already checked."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
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
            _fsync_dir(os.path.dirname(path))
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
        for dpath, _, fnames in os.walk(top):
            for name in fnames:
                fd = os.open(os.path.join(dpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(dpath)
        _fsync_dir(os.path.dirname(top))

    def remove_tree(self, rel: str) -> None:
        path = self._join(rel)
        if self.fs is None:
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
            total = 0
            for dpath, _, fnames in os.walk(path):
                total += sum(os.path.getsize(os.path.join(dpath, n)) for n in fnames)
            return total
        try:
            return int(self.fs.du(path, total=True))
        except FileNotFoundError:
            return 0


def _fsync_dir(dpath: str) -> None:
    fd = os.open(dpath, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
