"""Faults injected into real components: the S3 endpoint going away during export (a TCP proxy
in front of the moto server is closed and reopened), a deleted cache entry."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytestmark = pytest.mark.slow


class TcpProxy:
    """Forwards a loopback port to the S3 endpoint; ``down()`` makes the endpoint unreachable
    (listener closed, open connections cut) until ``up()``."""

    def __init__(self, target_port: int):
        self.target_port, self.refused = target_port, 0
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def s3_via_proxy(s3_endpoint, s3_bucket, monkeypatch):
    """The bucket reached through a proxy the test can take down; s3fs instances are not reused."""
    import s3fs

    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries; the task retries come on top
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy, s3_bucket
    proxy.down()
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_outage_during_export_is_retried_and_a_lasting_one_fails_clearly(
    prefect_api, s3_via_proxy, make_config, monkeypatch
):
    import fsspec
    import pandas as pd

    import indusfactory.publishing.publish as export
    from flows.generate_dataset import generate_dataset

    proxy, bucket = s3_via_proxy
    config = make_config(factory_root=f"{bucket}/factory")

    # 1. The endpoint goes away while the first shard is written and comes back 3 s later.
    real_write_shard, outages = export.write_shard, []

    def write_shard_during_outage(*args, **kwargs):
        if not outages:
            outages.append(time.time())
            proxy.down()
            threading.Timer(3.0, proxy.up).start()
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr("indusfactory.generation.generate.write_shard", write_shard_during_outage)
    record = generate_dataset(config=config)
    assert outages, "the outage was injected"
    frame = pd.read_parquet(f"{record.uri}/data/")
    assert len(frame) == record.samples == 6 and frame["sample_id"].is_unique
    fs = fsspec.filesystem("s3")
    assert not [p for p in fs.find(f"{bucket}/factory") if "/.tmp-" in p]

    # 2. An outage that lasts: the run fails with an error naming the endpoint; nothing half-written is visible.
    other = make_config(factory_root=f"{bucket}/factory", generation={"steps": 3})
    monkeypatch.setattr("indusfactory.generation.generate.write_shard", real_write_shard)
    real_publish = export.finalize_dataset

    def publish_while_down(*args, **kwargs):
        proxy.down()
        return real_publish(*args, **kwargs)

    monkeypatch.setattr("indusfactory.publishing.publish.finalize_dataset", publish_while_down)
    with pytest.raises(Exception) as info:
        generate_dataset(config=other)
    assert f"127.0.0.1:{proxy.port}" in str(info.value) or "connect" in str(info.value).lower(), str(info.value)
    proxy.up()
    monkeypatch.setattr("indusfactory.publishing.publish.finalize_dataset", real_publish)
    shards_before = {
        p: fs.info(p)["LastModified"]
        for p in fs.find(f"{bucket}/factory/datasets")
        if p.endswith(".parquet") and "/data/" in p
    }
    again = generate_dataset(config=other)
    assert again.samples == 6
    assert not fs.exists(f"{again.uri}/manifest.json.tmp")
    after = {p: fs.info(p)["LastModified"] for p in shards_before}
    assert after == shards_before, "shards written before the outage are not regenerated"


def test_deleted_cache_entry_is_rebuilt_not_trusted(prefect_api, make_config):
    import shutil
    from pathlib import Path

    from flows.learn_concept import learn_concept

    config = make_config(concept={"validation_images": 0})
    first = learn_concept(config=config)
    again = learn_concept(config=config)
    assert again.reused and again.uri == first.uri
    shutil.rmtree(first.uri)  # the artifact behind the cache entry disappears from storage
    rebuilt = learn_concept(config=config)
    assert not rebuilt.reused, "a cache entry whose output was deleted must not be trusted"
    assert (Path(rebuilt.uri) / "pytorch_lora_weights.safetensors").is_file()
