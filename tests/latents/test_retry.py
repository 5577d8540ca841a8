"""Storage faults: which errors are retried, how long, and what happens when retries run out."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import torch

from lcm_dist.latents import retry as store_retry
from lcm_dist.latents.cache import StoreIOError, WriteBackCache
from lcm_dist.latents.retry import RetryPolicy, StoreUnavailableError, is_transient, store_options
from lcm_dist.latents.store import LatentStore

SIG = {"phi_size": 6, "preset": "test", "latent_widths": [2]}


@pytest.fixture
def fake_clock(monkeypatch):
    """Waits advance a fake clock instead of sleeping; returns the list of waits."""
    now, waits = [0.0], []

    def sleep(seconds, stop):
        waits.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(store_retry, "_now", lambda: now[0])
    monkeypatch.setattr(store_retry, "_sleep", sleep)
    return waits


def failing(errors, result="done"):
    """An operation that raises ``errors`` one per call, then returns ``result``."""
    calls = []

    def op():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return op, calls


def test_transient_errors_are_retried_with_growing_backoff(fake_clock):
    policy = RetryPolicy(retries=5, seconds=1000, first_backoff=0.5, max_backoff=3.0)
    op, calls = failing([ConnectionResetError(errno.ECONNRESET, "reset")] * 5)
    seen = []
    assert policy.call(op, "reading chunk 3 of latent store", "s3://b/x", on_retry=seen.append) == (
        "done"
    )
    assert len(calls) == 6 and len(seen) == 5
    # Each wait is the doubled cap times a factor in [0.5, 1], capped at max_backoff.
    caps = [0.5, 1.0, 2.0, 3.0, 3.0]
    for wait, cap in zip(fake_clock, caps, strict=True):
        assert cap / 2 <= wait <= cap
    assert fake_clock[:3] == sorted(fake_clock[:3])  # below the cap each wait >= the last


def test_retries_run_out_by_count_and_by_time_with_a_clear_error(fake_clock):
    err = OSError(errno.EBUSY, "Please slow down.")
    op, calls = failing([err] * 100)
    with pytest.raises(StoreUnavailableError) as caught:
        RetryPolicy(retries=3, seconds=1000).call(op, "writing chunk 7 of latent store", "s3://b/l")
    assert len(calls) == 4
    message = str(caught.value)
    assert message.startswith("writing chunk 7 of latent store s3://b/l failed 4 time(s) over ")
    assert "OSError: [Errno 16] Please slow down." in message and "\n" not in message
    assert caught.value.__cause__ is err

    fake_clock.clear()
    op, calls = failing([TimeoutError("timed out")] * 100)
    with pytest.raises(StoreUnavailableError, match="the last time with TimeoutError: timed out"):
        RetryPolicy(retries=100, seconds=10, first_backoff=1.0).call(op, "reading", "s3://b/l")
    assert sum(fake_clock) <= 10 and len(calls) < 10


def test_permanent_errors_are_raised_at_once(fake_clock):
    for err in [
        FileNotFoundError(errno.ENOENT, "not found"),
        PermissionError(errno.EACCES, "denied"),
        OSError(errno.ENOSPC, "No space left on device"),
        ValueError("shape mismatch"),
    ]:
        op, calls = failing([err])
        with pytest.raises(type(err)):
            RetryPolicy().call(op, "writing chunk 0 of latent store", "s3://b/l")
        assert len(calls) == 1 and fake_clock == []


def test_which_errors_are_transient():
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
    )
    from s3fs.errors import translate_boto_error

    def client_error(code, status):
        return ClientError(
            {
                "Error": {"Code": code, "Message": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "GetObject",
        )

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    # s3fs turns service errors into OSErrors raised from botocore's ClientError.
    for code, status in [("SlowDown", 503), ("InternalError", 500), ("503", 503)]:
        assert is_transient(translate_boto_error(client_error(code, status))), code
    assert is_transient(client_error("Throttling", 400))
    for code, status in [("NoSuchKey", 404), ("AccessDenied", 403), ("InvalidArgument", 400)]:
        assert not is_transient(translate_boto_error(client_error(code, status))), code
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(KeyError("x"))


def test_s3_options_get_timeouts_unless_given():
    opts = store_options("s3://b/x", {"endpoint_url": "http://h"})
    assert opts["endpoint_url"] == "http://h"
    assert opts["config_kwargs"] == {
        "connect_timeout": 5,
        "read_timeout": 15,
        "retries": {"mode": "standard", "total_max_attempts": 1},
    }
    mine = {"config_kwargs": {"read_timeout": 60, "retries": {"max_attempts": 3}}}
    opts = store_options("s3://b/x", mine)
    assert opts["config_kwargs"] == {
        "read_timeout": 60,
        "retries": {"max_attempts": 3},
        "connect_timeout": 5,
    }
    assert mine == {"config_kwargs": {"read_timeout": 60, "retries": {"max_attempts": 3}}}
    assert store_options("/data/latents.zarr", {"auto_mkdir": True}) == {"auto_mkdir": True}
    assert store_options("memory://x", {}) is None
    assert store_options("file:///data/l.zarr", None) == {"auto_mkdir": True}
    assert store_options("file:///data/l.zarr", {"auto_mkdir": False}) == {"auto_mkdir": False}


def make_store(url, options, retry=None, rows=16):
    return LatentStore.create(
        url,
        num_rows=rows,
        initial=np.arange(6, dtype=np.float32),
        signature=SIG,
        rows_per_chunk=4,
        storage_options=options,
        retry=retry,
    )


def test_chunk_io_rides_out_failing_requests_and_an_outage(faulty_s3, tmp_path):
    proxy, prefix, options = faulty_s3
    url = f"{prefix}/{tmp_path.name}/latents.zarr"
    retry = RetryPolicy(retries=50, seconds=60, first_backoff=0.05, max_backoff=0.5)
    store = make_store(url, options, retry)
    proxy.fail_fraction = 0.4
    data = np.random.default_rng(0).standard_normal((4, 4, 6)).astype(np.float32)
    for _ in range(2):
        for chunk in range(4):
            store.write_chunk(chunk, data[chunk])
        for chunk in range(4):
            np.testing.assert_array_equal(store.read_chunk(chunk), data[chunk])
    store.commit()
    assert proxy.counts["internal"] and proxy.counts["slowdown"] and proxy.counts["drop"], (
        proxy.counts
    )
    assert store.counters.retries > 0
    # The endpoint goes away for a second, then comes back: the read waits it out.
    proxy.fail_fraction = 0.0
    proxy.stop()
    threading.Timer(1.0, proxy.start).start()
    np.testing.assert_array_equal(store.read_chunk(2), data[2])
    reopened = LatentStore.open(url, signature=SIG, storage_options=options)
    np.testing.assert_array_equal(reopened.read_rows(range(16)), data.reshape(16, 6))


def test_when_retries_run_out_the_step_gets_one_clear_error(faulty_s3, tmp_path):
    proxy, prefix, options = faulty_s3
    url = f"{prefix}/{tmp_path.name}/latents.zarr"
    store = make_store(url, options, RetryPolicy(retries=100, seconds=2, first_backoff=0.1))
    store.write_chunk(1, np.ones((4, 6), np.float32))
    store.commit()
    cache = WriteBackCache(store, 1 << 20, 2, 4)
    proxy.stop()
    start = time.monotonic()
    cache.begin_epoch([1, 2, 3])
    with pytest.raises(StoreIOError) as caught:
        cache.read_rows(torch.tensor([4, 5]))
    assert time.monotonic() - start < 30
    message = str(caught.value)
    assert message.startswith(f"reading chunk 1 of latent store {url} failed ")
    assert "EndpointConnectionError" in message and "\n" not in message
    # The committed rows are untouched: they read back once the endpoint is back.
    proxy.start()
    reopened = LatentStore.open(url, signature=SIG, storage_options=options)
    np.testing.assert_array_equal(reopened.read_chunk(1), np.ones((4, 6), np.float32))


def test_a_store_that_stops_answering_is_reported_not_a_silent_stall(faulty_s3, tmp_path, capfd):
    proxy, prefix, options = faulty_s3
    url = f"{prefix}/{tmp_path.name}/latents.zarr"
    store = make_store(url, options, RetryPolicy(retries=10, seconds=60))
    store.write_chunk(0, np.full((4, 6), 2.0, np.float32))
    store.commit()
    cache = WriteBackCache(store, 1 << 20, 1, 4, stall_warning_seconds=0.5)
    proxy.hang()  # requests are accepted and never answered...
    threading.Timer(2.5, proxy.resume).start()  # ...for longer than the warning threshold
    cache.begin_epoch([0])
    rows = cache.read_rows(torch.tensor([0, 1]))
    assert torch.equal(rows, torch.full((2, 6), 2.0))
    assert proxy.counts["hung"] >= 1
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("lcm-dist: waiting")]
    assert len(warnings) >= 2, err  # repeated while it waits, not only once
    assert (
        f"for chunk 0 of latent store {url} (reading it; no error from the store yet"
        in (warnings[0])
    )
    cache.close()


def test_an_export_to_a_failing_endpoint_equals_a_clean_export(
    faulty_s3, tmp_path, trained_run, trained_export
):
    import fsspec
    import zarr

    from lcm_dist.export import export_run, open_export

    proxy, prefix, options = faulty_s3
    url = f"{prefix}/{tmp_path.name}/model.zarr"
    proxy.fail_fraction = 0.2
    export_run(trained_run, url, storage_options=options, progress=False)
    assert proxy.counts["internal"] and proxy.counts["slowdown"] and proxy.counts["drop"]
    proxy.fail_fraction = 0.0
    got, attrs = open_export(url, options)
    want = zarr.open_group(str(trained_export), mode="r")
    assert attrs == dict(want.attrs) and attrs["complete"]
    for name in ("latents", "keys", "noise", "initial_phi"):
        np.testing.assert_array_equal(got[name][:], want[name][:])
    with fsspec.open(f"{url}/generator.safetensors", "rb", **options) as f:
        assert f.read() == (trained_export / "generator.safetensors").read_bytes()
