"""receiver/redaction.py on its own: every form in which the taps' token travels is redacted,
and nothing else is changed."""

from __future__ import annotations

from receiver.redaction import REDACTED, redact, redact_text

SECRET = "s3cr3t-T0ken_value~1"


def test_every_form_of_the_token_is_redacted() -> None:
    carriers = [
        f"wss://tap.example.com/t/{SECRET}/tap/call-1",
        f"wss://tap.example.com:8443/t/{SECRET}",
        f"http://h/api/taps?state=finished&token={SECRET}&limit=5",
        f"/tap/x?TOKEN={SECRET}",
        f"Authorization: Bearer {SECRET}",
        f"authorization=Basic {SECRET}",
        f'{{"Authorization": "Bearer {SECRET}"}}',
        f"bearer\t{SECRET}",
        f"GET /t/{SECRET}/tap/x\\xff HTTP/1.1",
    ]
    for text in carriers:
        redacted = redact_text(text)
        assert SECRET not in redacted and REDACTED in redacted, (text, redacted)
    nested = {
        "signalwire": {"device": {"params": {"uri": carriers[0], "codec": "PCMU"}}},
        "custom_parameters": {"token": SECRET, "authToken": SECRET, "Authorization": SECRET},
        "list": [[[{"headers": {"X-Authorization-Token": SECRET}}]], carriers[2]],
        carriers[1]: "a key that carries it",
    }
    assert SECRET not in repr(redact(nested))


def test_what_carries_no_token_is_left_alone() -> None:
    sidecar = {
        "tap_id": "support-call-42",
        "remote": "198.51.100.4",
        "counters": {"frames_received": 3, "tokens": 0},
        "events": [{"type": "dtmf", "digit": "5", "at": 1.5}, None, True, 2.5],
        "use_token": True,  # a flag under a token-like key says nothing
        "empty_token": "",
        "stream": {"custom_parameters": {"agent": "42", "note": "the t/ path and a tokenizer"}},
    }
    assert redact(sidecar) == sidecar
    assert redact_text("/tap/support-call-42 from 198.51.100.4") == (
        "/tap/support-call-42 from 198.51.100.4"
    )


def test_hostile_nesting_does_not_exhaust_the_stack() -> None:
    deep: object = f"/t/{SECRET}/"
    for _ in range(100_000):
        deep = [deep]
    result = redact(deep)
    for _ in range(100_000):
        assert isinstance(result, list)
        result = result[0]
    assert result == f"/t/{REDACTED}/"
