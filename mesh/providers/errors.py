"""Provider HTTP failures as gRPC statuses (pure: no I/O).

| HTTP                          | gRPC                                              |
|-------------------------------|---------------------------------------------------|
| 400, 413, 422, other 4xx      | INVALID_ARGUMENT                                  |
| 404 naming a model            | NOT_FOUND (any other 404: INVALID_ARGUMENT)       |
| 401                           | UNAUTHENTICATED                                   |
| 402                           | FAILED_PRECONDITION (billing)                     |
| 403                           | PERMISSION_DENIED                                 |
| 408, 5xx, 529                 | UNAVAILABLE                                       |
| 409                           | ABORTED                                           |
| 429                           | RESOURCE_EXHAUSTED                                |

Where the response says how long to wait (`retry-after-ms`, or `Retry-After` in seconds
or as an HTTP date), the status carries it as `grpc-retry-pushback-ms` (gRFC A6).

Messages quote the provider's own error message, read from whichever error body shape
the server uses (OpenAI's `{"error": {"message", "type", "code"}}`, Anthropic's
`{"type": "error", "error": {"type", "message"}}`, vLLM's top-level `message`, Ollama's
`{"error": "..."}`), with the API key and anything shaped like one blanked out.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import grpc

from ..errors import MeshError

MAX_MESSAGE = 500  # characters of a provider's message quoted in a status

# Bearer tokens and provider keys (sk-..., sk-ant-..., sk-proj-...), including the
# partly masked form some providers echo back ("Incorrect API key provided: sk-ab***yz").
_KEYLIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*.]{6,}")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without any of `secrets` (each at least 4 characters) or key-like tokens."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


@dataclass(frozen=True, slots=True)
class ProviderError:
    """What an error body says: its type or code (may be empty) and its message."""

    kind: str
    message: str


def parse_error_body(body: bytes) -> ProviderError:
    """The error type and message from a provider's error body, whatever its shape."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            kind = err.get("type") or err.get("code") or doc.get("type") or ""
            if kind == "error":
                kind = ""
            message = err.get("message") or ""
            code = err.get("code")
            if isinstance(code, str) and code and code != kind:
                kind = f"{kind}/{code}" if kind else code
            return ProviderError(str(kind), _clip(str(message) or json.dumps(err)))
        if isinstance(err, str):
            return ProviderError(str(doc.get("error_type") or doc.get("type") or ""), _clip(err))
        if isinstance(doc.get("message"), str):
            return ProviderError(str(doc.get("type") or ""), _clip(doc["message"]))
        if isinstance(doc.get("detail"), str):  # FastAPI's HTTPException
            return ProviderError("", _clip(doc["detail"]))
        return ProviderError("", _clip(text))
    if text.lstrip().startswith("<"):
        return ProviderError("", "")  # an HTML error page says nothing useful
    return ProviderError("", _clip(text))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


def retry_after_ms(headers: Mapping[str, str], now: float) -> int | None:
    """How long the response asks the caller to wait, in ms: `retry-after-ms` (OpenAI's
    SDKs read it first), else `Retry-After` as seconds or an HTTP date (RFC 9110 10.2.3),
    counted from `now` (a Unix time). None when neither is there or parses."""
    raw = _header(headers, "retry-after-ms")
    if raw is not None:
        try:
            ms = float(raw.strip())
            if math.isfinite(ms) and ms >= 0:
                return math.ceil(ms)
        except ValueError:
            pass
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
        if math.isfinite(seconds) and seconds >= 0:
            return math.ceil(seconds * 1000)
        return None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, math.ceil((when.timestamp() - now) * 1000))


_MODEL_WORDS = re.compile(r"\bmodel", re.IGNORECASE)


def status_for(http_status: int, error: ProviderError) -> grpc.StatusCode:
    s = http_status
    if s == 401:
        return grpc.StatusCode.UNAUTHENTICATED
    if s == 402:
        return grpc.StatusCode.FAILED_PRECONDITION
    if s == 403:
        return grpc.StatusCode.PERMISSION_DENIED
    if s == 404:
        about_model = "model_not_found" in error.kind or _MODEL_WORDS.search(error.message)
        return grpc.StatusCode.NOT_FOUND if about_model else grpc.StatusCode.INVALID_ARGUMENT
    if s == 408:
        return grpc.StatusCode.UNAVAILABLE
    if s == 409:
        return grpc.StatusCode.ABORTED
    if s == 429:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if 400 <= s < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    if s >= 500:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.UNKNOWN


def http_error(
    provider: str,
    http_status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    secrets: Iterable[str] = (),
) -> MeshError:
    """The MeshError for a provider's non-2xx response."""
    error = parse_error_body(body)
    code = status_for(http_status, error)
    what = f"HTTP {http_status}" + (f" {error.kind}" if error.kind else "")
    message = f"{provider}: {what}: {error.message or 'no error message in the response'}"
    if http_status == 404 and code == grpc.StatusCode.INVALID_ARGUMENT and not error.kind:
        message += " (is --base-url right?)"
    pushback = retry_after_ms(headers, now)
    if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        pushback = None
    return MeshError(code, redact(message, secrets), pushback_ms=pushback)


# Error types a provider sends inside a stream (OpenAI `{"error": {...}}` data, Anthropic
# `event: error`) after a 200, mapped as their HTTP counterparts would be.
STREAM_ERROR_STATUS: dict[str, grpc.StatusCode] = {
    "invalid_request_error": grpc.StatusCode.INVALID_ARGUMENT,
    "authentication_error": grpc.StatusCode.UNAUTHENTICATED,
    "permission_error": grpc.StatusCode.PERMISSION_DENIED,
    "not_found_error": grpc.StatusCode.NOT_FOUND,
    "rate_limit_error": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "request_too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "overloaded_error": grpc.StatusCode.UNAVAILABLE,
    "api_error": grpc.StatusCode.UNAVAILABLE,
    "server_error": grpc.StatusCode.UNAVAILABLE,
    "timeout_error": grpc.StatusCode.UNAVAILABLE,
}


def stream_error(
    provider: str, error: Mapping[str, object], secrets: Iterable[str] = ()
) -> MeshError:
    """A mid-stream error object; anything not known to be the caller's fault is
    UNAVAILABLE, so the mesh may resume the stream elsewhere."""
    kind = str(error.get("type") or error.get("code") or "error")
    message = str(error.get("message") or "the provider reported an error mid-stream")
    code = STREAM_ERROR_STATUS.get(kind, grpc.StatusCode.UNAVAILABLE)
    return MeshError(code, redact(f"{provider}: {kind} mid-stream: {_clip(message)}", secrets))
