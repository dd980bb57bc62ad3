"""The tracking server: is it there (checked before any work), and its URI without credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import TrackingUnavailableError


def redact_uri(uri: str) -> str:
    """The URI without ``user:password@``, safe to print in logs.

    Args:
        uri: a tracking URI.
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _reason(exc: BaseException, timeout_s: float) -> str:
    """Connection refused / timed out / name not resolved, from a ``requests`` error and its causes."""
    import requests

    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, requests.exceptions.Timeout) for e in chain) or "timed out" in text.lower():
        return f"no answer within {timeout_s:g} s (timeout)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text.lower():
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return "host name not found"
    if any(isinstance(e, requests.exceptions.SSLError) for e in chain):
        return "TLS error"
    return f"connection failed ({exc.__class__.__name__})"


def check_tracking_server(uri: str, timeout_s: float = 5) -> None:
    """Fail fast, before any work, when an HTTP(S) tracking server does not answer.

    One request to the REST API (``GET api/2.0/mlflow/experiments/search``, one result),
    without retries and with MLflow's own credentials and TLS settings, so a server that
    answers ``/health`` behind a proxy but refuses the API still counts as unavailable.
    Other URIs (``sqlite:``, ``file:``, paths) are not checked.

    Args:
        uri: the tracking URI.
        timeout_s: seconds to wait for the answer.

    Raises:
        TrackingUnavailableError: one line naming the URI (without credentials) and the
            reason: connection refused, timeout, or the HTTP status.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in ("http", "https"):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    safe = redact_uri(uri)
    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, backoff_factor=0, timeout=timeout_s, raise_on_status=False,
                                params={"max_results": 1})
    except Exception as exc:  # any failure to get an answer means unavailable
        raise TrackingUnavailableError(f"MLflow tracking server {safe} cannot be reached: {_reason(exc, timeout_s)}") from None
    if response.status_code != 200:
        hint = {401: " (credentials refused)", 403: " (access denied)"}.get(response.status_code, "")
        raise TrackingUnavailableError(
            f"MLflow tracking server {safe} answered HTTP {response.status_code}{hint} to an API request"
        )
