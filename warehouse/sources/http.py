"""HTTP GET with retries for network sources, built on `requests` and `with_retries`.

HTTP 429 and 5xx, timeouts and dropped connections are retried (a server's Retry-After in
seconds is honoured, up to the policy's max delay); any other 4xx fails at once with a
SourceFetchError that names the source, the range, the status and the URL. Secrets in query
strings (`api_key=...` and similar) are masked in every message and log line.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import requests

from warehouse.sources.base import SourceFetchError
from warehouse.sources.retry import RetryableError, RetryPolicy, with_retries

SECRET_PARAMS = ("api_key", "apikey", "key", "token", "access_token")
_SECRET_RE = re.compile(
    r"(?P<lead>(?:^|[?&;\s\"'(,])(?:" + "|".join(SECRET_PARAMS) + r")=)[^&\s\"'#),]*",
    re.IGNORECASE,
)

_HINTS = {
    400: "the server rejected the request parameters; check the configured assets, series, "
    "metrics and dates",
    401: "the API key is missing or invalid; set a valid key",
    403: "the API key (or the free tier) has no access to one of the requested items; "
    "request fewer metrics or use a key with access",
    404: "the endpoint or the requested id does not exist; check base_url and the "
    "asset / series ids",
    414: "the request URL is too long; request fewer items at once",
}


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """`text` with secret query values (api_key=..., token=...) and any given secret masked."""
    out = _SECRET_RE.sub(lambda m: m.group("lead") + "***", text)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return out


class _RedactSecrets(logging.Filter):
    """Masks secret query values in a record: urllib3 logs every request line, key included,
    at DEBUG (`"GET /v4/...?api_key=... HTTP/1.1" 200`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def _mask_urllib3_request_lines() -> None:
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(type(f).__name__ == _RedactSecrets.__name__ for f in pool.filters):
        pool.addFilter(_RedactSecrets())


_mask_urllib3_request_lines()


def display_url(url: str, params: Mapping[str, Any] | None = None) -> str:
    """The URL as it may be shown in a message: parameters appended, secrets masked."""
    if params:
        url = f"{url}{'&' if '?' in url else '?'}{urlencode(dict(params))}"
    return redact(url)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def get_with_retries(
    url: str,
    params: Mapping[str, Any] | None = None,
    *,
    source: str,
    what: str,
    policy: RetryPolicy = RetryPolicy(),
    timeout_s: float = 30,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> requests.Response:
    """GET `url` with `params` and return the successful (2xx) response, its body read.

    Retries 429, 5xx, timeouts and connection errors under `policy` (waiting at least a
    server's Retry-After, capped at `policy.max_delay_s`); any other 4xx raises
    SourceFetchError at once. Every failure message names `source` and `what` (the range) and
    shows the URL with secret query values masked. A `session` passed in is used and left
    open; otherwise a private one is opened and closed.
    """
    shown = display_url(url, params)
    secrets = tuple(str(v) for k, v in (params or {}).items() if k.lower() in SECRET_PARAMS)
    own = session is None
    sess = session if session is not None else requests.Session()

    def check_status(resp: requests.Response) -> requests.Response:
        status = resp.status_code
        if 200 <= status < 300:
            return resp
        reason = resp.reason or ""
        detail = redact(resp.text[:300].strip(), secrets) if resp.content else ""
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        resp.close()
        if status == 429 or status >= 500:
            if retry_after is not None:
                retry_after = min(retry_after, policy.max_delay_s)
            raise RetryableError(f"HTTP {status} {reason} from {shown}", retry_after_s=retry_after)
        hint = _HINTS.get(status, "the server refused the request; check the source's options")
        raise SourceFetchError(
            f"{source}: fetching {what} failed: HTTP {status} {reason} from {shown}"
            + (f": {detail}" if detail else "")
            + f". Hint: {hint}."
        )

    def attempt() -> requests.Response:
        # requests' exceptions repeat the full URL (secrets included): only their type is
        # kept, and the new error is raised outside the handler so they are not its context.
        failure: Exception
        try:
            resp = sess.get(url, params=params, timeout=timeout_s)
        except requests.Timeout:
            failure = RetryableError(f"timed out after {timeout_s:g} s ({shown})")
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            failure = RetryableError(
                f"connection failed or was cut off ({type(exc).__name__}) ({shown})"
            )
        except requests.RequestException as exc:
            failure = SourceFetchError(
                f"{source}: fetching {what} failed: {type(exc).__name__}: "
                f"{redact(str(exc), secrets)} ({shown})"
            )
        else:
            return check_status(resp)
        raise failure

    try:
        return with_retries(attempt, source=source, what=what, policy=policy, sleep=sleep)
    finally:
        if own:
            sess.close()
