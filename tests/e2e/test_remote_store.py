"""Stores on object storage, against a real S3-compatible server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import tiny_job, write_config
from evapipe import config_from_dict, list_states, load_state, read_metadata, run_job
from evapipe.core.errors import ConfigError, StorageError
from evapipe.core.remote import filesystem, hub_repo, location

BUCKET = "evabucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_endpoint(url: str) -> None:
    """Point s3fs at another endpoint (fsspec caches filesystems by their arguments, not the environment)."""
    import s3fs

    os.environ["AWS_ENDPOINT_URL"] = url
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port, with the AWS variables pointing at it; a bucket made."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    endpoint = f"http://127.0.0.1:{port}"
    use_endpoint(endpoint)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    yield endpoint
    proc.terminate()
    proc.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVAPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cfg_for(llama_dir, store, **sections):
    return config_from_dict(tiny_job(llama_dir, output={"store": store}, **sections))


def objects(prefix: str) -> dict[str, int]:
    from evapipe.core.remote import find

    return find(prefix)


def test_compute_into_bucket_hit_list_show_and_load(tmp_path, tiny_llama_dir, s3, cache):
    store = f"s3://{BUCKET}/first"
    first = run_job(cfg_for(tiny_llama_dir, store), show_progress=False)
    assert isinstance(first.path, str) and first.path.startswith(store + "/t/") and not first.cached
    names = sorted(u.rsplit("/", 1)[1] for u in objects(store))
    assert names == ["eva.safetensors", "eva.spectrum.safetensors"]  # no pending sidecar, no checkpoint left
    assert read_metadata(first.path)["store_key"] == first.path.split("/")[-2]
    # a fresh process with an empty cache: a hit from headers only, neither torch nor a download
    cfg_path = write_config(tmp_path / "job.yaml", **tiny_job(tiny_llama_dir, output={"store": store}))
    script = ("import sys\nfrom evapipe import load_config, run_job\n"
              f"r = run_job(load_config({str(cfg_path)!r}))\nprint(r.cached, r.path, 'torch' in sys.modules)\n")
    env = dict(os.environ, EVAPIPE_CACHE=str(tmp_path / "empty"), PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", first.path, "False"], out.stderr
    assert "cache hit:" in out.stderr and not (tmp_path / "empty" / "states").exists()
    entries = list_states(store)
    assert [(e.path, e.key, e.error) for e in entries] == [(first.path, first.path.split("/")[-2], None)]
    assert entries[0].size == sum(objects(store).values())
    # load from the bucket: downloaded once, verified, then offline
    local = load_state(first.path)
    assert local.spectrum and local.tensors.keys() == first.state.tensors.keys()
    for name, a in first.state.tensors.items():
        assert bool((local.tensors[name] == a).all())
    use_endpoint(f"http://127.0.0.1:{free_port()}")  # nothing listens there: the store is unreachable
    try:
        again = load_state(first.path)
        assert again.meta == local.meta
    finally:
        use_endpoint(s3)


def test_show_list_cli_and_apply_from_bucket(tmp_path, tiny_llama_dir, s3, cache):
    from click.testing import CliRunner

    from evapipe.cli import main

    store = f"s3://{BUCKET}/cli"
    url = run_job(cfg_for(tiny_llama_dir, store), show_progress=False).path
    runner = CliRunner()
    shown = runner.invoke(main, ["show", url])
    assert shown.exit_code == 0 and "model.layers.0.self_attn.q_proj" in shown.output, shown.output
    listed = runner.invoke(main, ["list", store])
    assert listed.exit_code == 0 and url in listed.output, listed.output
    import shutil

    shutil.rmtree(cache)  # apply downloads it into an empty cache
    applied = runner.invoke(main, ["apply", "--state", url, "--model", tiny_llama_dir, "--output",
                                   str(tmp_path / "adapter"), "--device", "cpu"])
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert list((cache / "states").glob("*/eva.safetensors"))


def test_corrupt_object_kept_aside_and_recomputed(tiny_llama_dir, s3, cache):
    store = f"s3://{BUCKET}/corrupt"
    url = run_job(cfg_for(tiny_llama_dir, store), show_progress=False).path
    fs, path = filesystem(url)
    fs.pipe_file(path, b"junk")
    redone = run_job(cfg_for(tiny_llama_dir, store), show_progress=False)
    assert not redone.cached and redone.path == url and read_metadata(url)["store_key"]
    aside = [u for u in objects(store) if ".unreadable-" in u]
    assert len(aside) == 1 and fs.cat_file(filesystem(aside[0])[1]) == b"junk"
    assert [e.path for e in list_states(store)] == [url]  # the kept-aside object is not a state


def test_two_jobs_on_one_key_one_wins(tmp_path, tiny_llama_dir, s3, cache, monkeypatch):
    """Job A computes; before it publishes, job B (another process, another cache: another machine) computes
    and publishes the same key. A's create-if-absent write fails, A drops its state and takes B's."""
    import evapipe.states.remote_store as remote_store

    store = f"s3://{BUCKET}/race"
    cfg_path = write_config(tmp_path / "job.yaml", **tiny_job(tiny_llama_dir, output={"store": store}))
    original = remote_store.publish

    def publish_after_b(local, url, create=True):
        env = dict(os.environ, EVAPIPE_CACHE=str(tmp_path / "b-cache"), PYTHONPATH=os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-m", "evapipe.compute", "--config", str(cfg_path), "--no-progress"],
                       env=env, check=True, capture_output=True)
        return original(local, url, create)

    monkeypatch.setattr(remote_store, "publish", publish_after_b)
    a = run_job(cfg_for(tiny_llama_dir, store), show_progress=False)
    assert a.cached and a.state is None
    meta = read_metadata(a.path)
    side_url = remote_store.sidecar_url(a.path)
    from evapipe.states.state import read_header

    assert read_header(side_url)["__metadata__"]["spectrum_id"] == meta["spectrum_id"]
    names = sorted(u.rsplit("/", 1)[1] for u in objects(store))
    assert names == ["eva.safetensors", "eva.spectrum.safetensors"]  # A's pending sidecar removed
    assert load_state(a.path).spectrum


class Proxy:
    """A TCP proxy in front of the S3 server; `stop()` drops every connection and the listener, as a server
    that goes away would, while the server behind it keeps what it stored."""

    def __init__(self, port: int):
        self.target, self.conns, self.stopped = port, [], False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.stopped:
                client.close()
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        self.stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_server_stopped_mid_upload_leaves_nothing_visible(tiny_llama_dir, s3, cache, monkeypatch):
    import evapipe.core.remote as remote

    store = f"s3://{BUCKET}/cut"
    proxy = Proxy(int(s3.rsplit(":", 1)[1]))
    original = remote.upload

    def upload(local, url, create=False):
        if url.endswith("/eva.safetensors"):  # the sidecar went up; the server goes away before the state
            proxy.stop()
        return original(local, url, create)

    monkeypatch.setattr(remote, "upload", upload)
    import evapipe.states.remote_store as remote_store

    monkeypatch.setattr(remote_store, "upload", upload)
    use_endpoint(f"http://127.0.0.1:{proxy.port}")
    try:
        with pytest.raises(StorageError, match=r"cannot upload to s3://evabucket/cut/.*eva\.safetensors"):
            run_job(cfg_for(tiny_llama_dir, store), show_progress=False)
    finally:
        use_endpoint(s3)
    monkeypatch.undo()
    assert list_states(store) == []  # the pending sidecar is hidden; no state is visible
    assert all(u.rsplit("/", 1)[1].startswith(".") for u in objects(store))
    again = run_job(cfg_for(tiny_llama_dir, store), show_progress=False)
    assert not again.cached and load_state(again.path).spectrum


def test_unreachable_store_and_missing_bucket_fail_before_loading(tiny_llama_dir, s3, cache, monkeypatch):
    import evapipe.model.loading

    def no_load(*a, **k):
        raise AssertionError("the store is checked before any weight is read")

    monkeypatch.setattr(evapipe.model.loading, "load_model", no_load)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x.*does not exist"):
        run_job(cfg_for(tiny_llama_dir, "s3://no-such-bucket/x"), show_progress=False)
    use_endpoint(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(StorageError, match=rf"cannot reach the store s3://{BUCKET}/y"):
            run_job(cfg_for(tiny_llama_dir, f"s3://{BUCKET}/y"), show_progress=False)
    finally:
        use_endpoint(s3)


def test_locations_and_missing_filesystems():
    assert str(location("file:///tmp/store")) == "/tmp/store" and location("s3://b/p/") == "s3://b/p"
    with pytest.raises(ConfigError, match=r"pip install 'evapipe\[gcs\]'"):
        filesystem("gs://bucket/store")
    with pytest.raises(ConfigError, match=r"pip install 'evapipe\[azure\]'"):
        filesystem("az://container/store")


def test_hub_urls_parse_offline():
    assert hub_repo("hf://org/repo/eva.safetensors") == ("model", "org/repo", None, "eva.safetensors")
    assert hub_repo("hf://datasets/org/data@v1/store/t") == ("dataset", "org/data", "v1", "store/t")
    assert hub_repo("hf://org/repo") == ("model", "org/repo", None, "")
    with pytest.raises(ConfigError, match="names a repository"):
        hub_repo("hf://org")


def test_rebudget_and_convert_between_urls(tiny_llama_dir, s3, cache):
    from evapipe import convert_file, rebudget_file
    from evapipe.core.errors import StateError

    url = run_job(cfg_for(tiny_llama_dir, f"s3://{BUCKET}/tools"), show_progress=False).path
    out = f"s3://{BUCKET}/derived/r1.safetensors"
    new = rebudget_file(url, out, r=1)
    assert read_metadata(out)["r"] == 1 and load_state(out).ranks == new.ranks
    with pytest.raises(StateError, match="already exists"):
        rebudget_file(url, out, r=1)
    peft = f"s3://{BUCKET}/derived/peft.pt"
    convert_file(url, peft)
    assert objects(f"s3://{BUCKET}/derived")[peft] > 0


def test_push_to_a_bucket_and_pull_with_an_empty_cache(tmp_path, tiny_llama_dir, s3, cache):
    import shutil

    from click.testing import CliRunner

    from evapipe.cli import main

    local = tmp_path / "s" / "eva.safetensors"
    run_job(config_from_dict(tiny_job(tiny_llama_dir, output={"path": str(local)})), show_progress=False)
    pushed = CliRunner().invoke(main, ["push", str(local), f"s3://{BUCKET}/published", "--license", "mit"])
    assert pushed.exit_code == 0, pushed.output
    names = [u.rsplit("/", 1)[1] for u in objects(f"s3://{BUCKET}/published")]
    assert sorted(names) == ["README.md", "eva-layers.png", "eva.safetensors", "eva.spectrum.safetensors"]
    shutil.rmtree(cache, ignore_errors=True)
    pulled = load_state(f"s3://{BUCKET}/published/eva.safetensors")
    assert pulled.spectrum and pulled.ranks == load_state(local).ranks


def test_file_urls_are_local_stores(tmp_path, tiny_llama_dir):
    from evapipe.job import output_paths
    from evapipe.states.store import job_key, model_slug, remote_entry

    cfg = cfg_for(tiny_llama_dir, f"file://{tmp_path / 'store'}")
    key = job_key(cfg)
    assert remote_entry(cfg, key) is None
    assert output_paths(cfg, key)[0] == (tmp_path / "store" / "t" / model_slug(tiny_llama_dir)
                                          / key / "eva.safetensors")
