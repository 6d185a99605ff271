"""The store on an S3-compatible server (moto, on loopback), through fsspec/s3fs.

Skipped unless moto[server] and s3fs are installed (test extras).
"""
from __future__ import annotations

import os
import uuid

import pytest

moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")
pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

from storage import layout  # noqa: E402
from storage._root import Root  # noqa: E402
from storage.errors import StoreMismatch  # noqa: E402
from storage.inspection import info, verify  # noqa: E402
from storage.reader import TargetReader, read_items  # noqa: E402
from storage.writer import open_for_write  # noqa: E402
from tests.test_storage import assert_same_item, make_items, make_manifest, write_store  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances made before the endpoint was set would not see it
    name = f"stores-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield name
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_s3_store_round_trip_publish_and_refusal(bucket, monkeypatch):
    url = f"s3://{bucket}/run1"
    m = make_manifest(n_queries=7, shard_size=3, dtype="bfloat16")
    written = write_store(url, m, shards=[0, 2])

    def crash(*args):
        raise RuntimeError("killed before publish")

    monkeypatch.setattr("storage.writer._publish", crash)
    with pytest.raises(RuntimeError):
        open_for_write(url, m).write_shard(1, make_items(m, 1))
    monkeypatch.undo()

    assert open_for_write(url, m).published() == {0, 2}
    got = list(read_items(url))
    assert [it.sample_id for it in got] == [q for q in m.query_ids if q not in ("q3", "q4", "q5") for _ in range(2)]
    for it in got:
        assert_same_item(it, written[it.sample_id, it.view])
    assert len(TargetReader(url, seed=0, require_complete=False)) == 4
    assert verify(url) == ["1 of 3 shards are not published (1); rerun the teacher with the same configuration to fill them"]
    assert len(info(url)["unpublished_dirs"]) == 1

    assert open_for_write(url, m).write_shard(1, make_items(m, 1))
    assert verify(url) == [] and info(url)["unpublished_dirs"] == []
    with pytest.raises(StoreMismatch) as e:
        open_for_write(url, make_manifest(n_queries=7, shard_size=3, dtype="float16"))
    assert e.value.lines == ["dtype: store has 'bfloat16', config has 'float16'"]


def test_s3_create_is_exclusive(bucket):
    root = Root(f"s3://{bucket}/excl")
    assert root.create(layout.marker_rel(0), b"first")
    assert not root.create(layout.marker_rel(0), b"second")
    assert root.read(layout.marker_rel(0)) == b"first"
    with pytest.raises(FileExistsError):  # the server itself refuses (If-None-Match), not only our pre-check
        root.fs.pipe_file(f"{root.path}/{layout.marker_rel(0)}", b"third", mode="create")
