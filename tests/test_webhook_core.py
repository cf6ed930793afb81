"""The pure core of webhooks: events, Standard Webhooks signatures, and the SSRF guard.

No test here may open a connection to anything but 127.0.0.1: every test runs under a socket
guard, refusal tests send through a transport that fails on any request, and host names are
resolved by a fake resolver only.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from webhook_helpers import (
    FakeResolver,
    NoConnectTransport,
    RebindingResolver,
    guard_sockets,
    http_receiver,
    make_tls,
)

from mlx_fusion.webhooks.events import build_event, encode_event, event_id
from mlx_fusion.webhooks.guard import (
    GuardedTransport,
    WebhookTargetRefused,
    check_url,
    guarded_client,
)
from mlx_fusion.webhooks.signing import (
    WebhookVerificationError,
    generate_secret,
    headers,
    sign,
    verify,
)

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return guard_sockets(monkeypatch)


# --- signing -------------------------------------------------------------------------------


def test_sign_matches_the_standard_webhooks_test_vector() -> None:
    assert sign(VECTOR_BODY, VECTOR_ID, VECTOR_TS, VECTOR_SECRET) == VECTOR_SIG


def test_verify_accepts_the_standard_webhooks_test_vector() -> None:
    hdrs = {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS)}
    verify(VECTOR_BODY, {**hdrs, "webhook-signature": VECTOR_SIG}, VECTOR_SECRET, now=VECTOR_TS)


def test_signed_message_round_trips_through_verify() -> None:
    secret, now = generate_secret(), int(time.time())
    body = b'{"type":"job.completed"}'
    verify(body, headers(body, "msg_1", now, secret), secret)


def test_reference_verifier_accepts_our_signatures() -> None:
    secret, now = generate_secret(), int(time.time())
    body = encode_event({"type": "job.completed", "data": {"id": "j1", "text": "café"}})
    hdrs = headers(body, event_id("j1", "job.completed"), now, secret)
    payload = standardwebhooks.Webhook(secret).verify(body, hdrs)
    assert payload["data"]["text"] == "café"


def test_verify_accepts_reference_signatures() -> None:
    secret, now = generate_secret(), int(time.time())
    body = '{"a": 1}'
    ref_sig = standardwebhooks.Webhook(secret).sign(
        "msg_x", dt.datetime.fromtimestamp(now, dt.UTC), body
    )
    hdrs = {"webhook-id": "msg_x", "webhook-timestamp": str(now), "webhook-signature": ref_sig}
    verify(body.encode(), hdrs, secret)


def test_verify_rejects_a_tampered_body() -> None:
    secret, now = generate_secret(), int(time.time())
    hdrs = headers(b'{"amount":1}', "msg_1", now, secret)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(b'{"amount":9}', hdrs, secret)


def test_verify_rejects_an_old_timestamp() -> None:
    secret, now = generate_secret(), int(time.time())
    hdrs = headers(b"{}", "msg_1", now - 301, secret)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(b"{}", hdrs, secret, now=now)


def test_verify_rejects_a_future_timestamp() -> None:
    secret, now = generate_secret(), int(time.time())
    hdrs = headers(b"{}", "msg_1", now + 301, secret)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(b"{}", hdrs, secret, now=now)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_missing_headers(missing: str) -> None:
    secret = generate_secret()
    hdrs = headers(b"{}", "msg_1", int(time.time()), secret)
    del hdrs[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(b"{}", hdrs, secret)


def test_verify_rejects_a_wrong_secret() -> None:
    hdrs = headers(b"{}", "msg_1", int(time.time()), generate_secret())
    with pytest.raises(WebhookVerificationError):
        verify(b"{}", hdrs, generate_secret())


def test_headers_carry_one_signature_per_active_secret() -> None:
    old, new, now = generate_secret(), generate_secret(), int(time.time())
    hdrs = headers(b"{}", "msg_1", now, [old, new])
    assert len(hdrs["webhook-signature"].split(" ")) == 2
    verify(b"{}", hdrs, old)
    verify(b"{}", hdrs, new)
    standardwebhooks.Webhook(old).verify(b"{}", hdrs)
    standardwebhooks.Webhook(new).verify(b"{}", hdrs)


def test_receiver_with_two_secrets_accepts_either() -> None:
    old, new, now = generate_secret(), generate_secret(), int(time.time())
    verify(b"{}", headers(b"{}", "msg_1", now, new), [old, new])
    verify(b"{}", headers(b"{}", "msg_1", now, old), [old, new])


def test_header_names_are_case_insensitive_in_verify() -> None:
    secret, now = generate_secret(), int(time.time())
    hdrs = {k.title(): v for k, v in headers(b"{}", "msg_1", now, secret).items()}
    verify(b"{}", hdrs, secret)


# --- events --------------------------------------------------------------------------------

FINISHED = dt.datetime(2026, 11, 26, 15, 54, 2, 675000, tzinfo=dt.UTC)


def record(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "job1",
        "status": "completed",
        "kind": "chat.completion",
        "model": "smollm2-135m",
        "request_id": "req-9",
        "metadata": {"user": "u1"},
        "finished_at": FINISHED,
        "result": {"object": "chat.completion", "choices": []},
        "error": None,
    }
    base.update(fields)
    return base


def test_completed_event_inlines_a_small_result() -> None:
    event = build_event(record(), max_result_bytes=1000)
    assert event["type"] == "job.completed"
    assert event["timestamp"] == "2026-11-26T15:54:02.675Z"
    assert event["data"] == {
        "id": "job1",
        "status": "completed",
        "model": "smollm2-135m",
        "kind": "chat.completion",
        "request_id": "req-9",
        "metadata": {"user": "u1"},
        "result": {"object": "chat.completion", "choices": []},
    }


def test_completed_event_references_a_result_over_the_limit() -> None:
    result = {"text": "x" * 500}
    size = len(json.dumps(result, separators=(",", ":")).encode())
    event = build_event(record(result=result), max_result_bytes=size - 1)
    assert "result" not in event["data"]
    assert event["data"]["result_ref"] == {"job_id": "job1", "bytes": size}
    assert build_event(record(result=result), max_result_bytes=size)["data"]["result"] == result


def test_completed_event_passes_a_stored_blob_reference() -> None:
    ref = {"blob_id": "b1", "bytes": 5_000_000, "content_type": "application/json"}
    event = build_event(record(result=None, result_ref=ref), max_result_bytes=1000)
    assert "result" not in event["data"]
    assert event["data"]["result_ref"] == {"job_id": "job1", **ref}


def test_image_results_carry_blob_ids_not_bytes() -> None:
    result = {"data": [{"blob_id": "b7", "bytes": 1_400_000, "content_type": "image/png"}]}
    event = build_event(record(kind="image.generation", result=result), max_result_bytes=65536)
    assert event["data"]["result"] == result
    assert len(encode_event(event)) < 1000


def test_failed_event_carries_the_error_and_no_result() -> None:
    error = {"code": "timeout", "message": "ran past 600 s"}
    event = build_event(record(status="failed", result=None, error=error), max_result_bytes=1000)
    assert event["type"] == "job.failed"
    assert event["data"]["error"] == error
    assert "result" not in event["data"] and "result_ref" not in event["data"]


def test_cancelled_event_has_neither_error_nor_result() -> None:
    rec = record(status="cancelled", result=None)
    rec.pop("result")
    event = build_event(rec, max_result_bytes=1000)
    assert event["type"] == "job.cancelled"
    assert "error" not in event["data"] and "result" not in event["data"]


def test_event_is_built_from_a_stored_document_with_underscore_id() -> None:
    rec = record()
    rec["_id"] = rec.pop("id")
    assert build_event(rec, max_result_bytes=1000)["data"]["id"] == "job1"


@pytest.mark.parametrize("status", ["queued", "processing"])
def test_no_event_for_an_unfinished_job(status: str) -> None:
    with pytest.raises(ValueError, match="no webhook event"):
        build_event(record(status=status), max_result_bytes=1000)


def test_event_body_is_the_same_on_every_build() -> None:
    assert encode_event(build_event(record(), max_result_bytes=1000)) == encode_event(
        build_event(record(), max_result_bytes=1000)
    )


def test_event_id_is_stable_and_distinct_per_job_and_type() -> None:
    assert event_id("job1", "job.completed") == event_id("job1", "job.completed")
    assert event_id("job1", "job.completed").startswith("msg_")
    ids = {event_id(j, t) for j in ("job1", "job2") for t in ("job.completed", "job.failed")}
    assert len(ids) == 4


# --- guard ---------------------------------------------------------------------------------

RESOLVER = FakeResolver(
    {
        "evil.test": ["10.0.0.1"],
        "metadata.test": ["169.254.169.254"],
        "mixed.test": ["93.184.216.34", "127.0.0.1"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "receiver.test": ["127.0.0.1"],
    }
)

REFUSED = [
    "http://127.0.0.1/hook",
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://evil.test/hook",
    "http://metadata.test/hook",
    "http://mixed.test/hook",
    "http://mapped.test/hook",
    "http://0.0.0.0/hook",
    "http://100.64.0.1/hook",
    "http://224.0.0.1/hook",
    "http://[fe80::1]/hook",
    "http://[2002:7f00:1::]/hook",
    "https://192.168.1.1/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_non_public_targets_are_refused_without_a_connection(url: str) -> None:
    inner = NoConnectTransport()
    with (
        guarded_client(resolver=RESOLVER, inner=inner) as client,
        pytest.raises(WebhookTargetRefused),
    ):
        client.post(url, content=b"{}")
    assert inner.requests == []


@pytest.mark.parametrize("url", ["ftp://93.184.216.34/x", "file:///etc/passwd", "http:///x"])
def test_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(WebhookTargetRefused):
        check_url(url, resolver=RESOLVER)


def test_public_host_passes_with_every_resolved_address() -> None:
    addrs = check_url("https://public.test/hook", resolver=RESOLVER)
    assert [str(a) for a in addrs] == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]


def test_allow_list_cidr_admits_its_addresses_only() -> None:
    assert [str(a) for a in check_url("http://127.0.0.1/", allow=["127.0.0.0/8"])] == ["127.0.0.1"]
    with pytest.raises(WebhookTargetRefused):
        check_url("http://evil.test/", allow=["127.0.0.0/8"], resolver=RESOLVER)


def test_allow_list_host_name_admits_that_name() -> None:
    addrs = check_url("http://evil.test/", allow=["evil.test"], resolver=RESOLVER)
    assert [str(a) for a in addrs] == ["10.0.0.1"]
    with pytest.raises(WebhookTargetRefused):
        check_url("http://10.0.0.1/", allow=["evil.test"], resolver=RESOLVER)


def test_unresolvable_host_is_a_connect_error_not_a_refusal() -> None:
    with (
        guarded_client(resolver=RESOLVER, inner=NoConnectTransport()) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.post("http://nowhere.test/hook", content=b"{}")


def _signed_post(client: httpx.Client, url: str, secret: str) -> httpx.Response:
    event = build_event(record(), max_result_bytes=65536)
    body = encode_event(event)
    hdrs = headers(body, event_id("job1", event["type"]), int(time.time()), secret)
    return client.post(url, content=body, headers={**hdrs, "content-type": "application/json"})


def test_allow_listed_loopback_receiver_gets_a_signed_post(loopback_only: list[Any]) -> None:
    secret = generate_secret()
    with (
        http_receiver() as receiver,
        guarded_client(allow=["127.0.0.0/8"], resolver=RESOLVER) as client,
    ):
        response = _signed_post(client, f"http://receiver.test:{receiver.port}/hook", secret)
    assert response.status_code == 204
    [got] = receiver.received
    assert got.path == "/hook"
    assert got.headers["host"] == f"receiver.test:{receiver.port}"
    verify(got.body, got.headers, secret)
    standardwebhooks.Webhook(secret).verify(got.body, got.headers)
    assert json.loads(got.body)["data"]["id"] == "job1"
    assert {a[0] for a in loopback_only} == {"127.0.0.1"}


def test_loopback_receiver_is_refused_when_not_allow_listed() -> None:
    with (
        http_receiver() as receiver,
        guarded_client(resolver=RESOLVER) as client,
        pytest.raises(WebhookTargetRefused),
    ):
        client.post(f"http://127.0.0.1:{receiver.port}/hook", content=b"{}")
    assert receiver.received == []


def test_connection_goes_to_the_checked_address_not_a_second_lookup() -> None:
    resolver = RebindingResolver("rebind.test", first="127.0.0.1", then="10.0.0.1")
    transport = GuardedTransport(allow=["127.0.0.0/8"], resolver=resolver)
    with http_receiver() as receiver, httpx.Client(transport=transport, trust_env=False) as c:
        assert c.post(f"http://rebind.test:{receiver.port}/", content=b"{}").status_code == 204
        assert resolver.calls == ["rebind.test"]
        with pytest.raises(WebhookTargetRefused):
            c.post(f"http://rebind.test:{receiver.port}/", content=b"{}")
    assert len(receiver.received) == 1


def test_https_keeps_the_host_name_for_sni_and_certificate(tmp_path: Path) -> None:
    server_ctx, client_ctx = make_tls(tmp_path, "receiver.test")
    secret = generate_secret()
    with (
        http_receiver(server_ctx) as receiver,
        guarded_client(allow=["127.0.0.1"], resolver=RESOLVER, verify=client_ctx) as client,
    ):
        response = _signed_post(client, f"https://receiver.test:{receiver.port}/hook", secret)
    assert response.status_code == 204
    assert receiver.sni == ["receiver.test"]
    [got] = receiver.received
    assert got.headers["host"] == f"receiver.test:{receiver.port}"
    verify(got.body, got.headers, secret)


def test_https_certificate_for_another_name_is_rejected(tmp_path: Path) -> None:
    server_ctx, client_ctx = make_tls(tmp_path, "other.test")
    with (
        http_receiver(server_ctx) as receiver,
        guarded_client(allow=["127.0.0.1"], resolver=RESOLVER, verify=client_ctx) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.post(f"https://receiver.test:{receiver.port}/hook", content=b"{}")
    assert receiver.received == []
