"""Tests that kill mutants `make mutate` (benchmarks/mutation.py, mutmut) found surviving in the
guard modules: each pins a behaviour the existing tests left open (each was checked to fail on
its mutants and pass on the real code). benchmarks/results/mutation.md has the figures."""

import pytest
import requests
import torch
from requests.structures import CaseInsensitiveDict

from ml.trainer import Trainer
from tests.test_trainer import RESUME_VARIANTS, make_model, quick_cfg, toy_sequences
from warehouse.sources import http as http_mod
from warehouse.sources.base import SourceFetchError
from warehouse.sources.http import display_url, get_with_retries, parse_retry_after
from warehouse.sources.retry import RetryPolicy


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels, as in test_trainer
    yield
    torch.set_num_threads(threads)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_resuming_after_an_interrupted_run_in_process_gives_the_uninterrupted_weights(
    tmp_path, variant
):
    """test_trainer's resume-after-SIGKILL test, in one process: the run stops (an exception
    from on_step, right after the step-6 checkpoint), a trainer built from another init resumes
    from last.pt and must end bitwise where an uninterrupted run ends. mutmut cannot run the
    SIGKILL version (its child process has no pytest to fix the trampolined scheduler), so
    this one carries the checkpoint save/restore/resume mutants."""
    model_kw, cfg_kw = RESUME_VARIANTS[variant]
    model, loss = make_model(**model_kw)
    data = toy_sequences(2, 128, 0), toy_sequences(1, 64, 1)
    Trainer(model, loss, *data, quick_cfg(**cfg_kw)).fit()
    expected = model.state_dict()

    ckpt = tmp_path / "ckpt"

    def stop(step):
        if step == 6:  # mid second epoch (4 chunks per epoch): the carried state matters
            raise _Stop

    model, loss = make_model(**model_kw)
    with pytest.raises(_Stop):
        Trainer(
            model,
            loss,
            *data,
            quick_cfg(checkpoint_every=1, **cfg_kw),
            checkpoint_dir=ckpt,
            on_step=stop,
        ).fit()
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    assert saved["position"].tolist()[:3] == [1, 2, 6]
    assert not list(ckpt.glob("*.tmp"))

    model, loss = make_model(seed=123, **model_kw)
    trainer = Trainer(model, loss, *data, quick_cfg(**cfg_kw), checkpoint_dir=ckpt)
    result = trainer.fit()
    assert result.steps == 3 * 4
    got = model.state_dict()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


# -- warehouse/sources/http.py ---------------------------------------------------------------
# A fake session and responses: the exact messages, the status bounds and the session's life,
# without a server.

ONCE = RetryPolicy(attempts=1, base_delay_s=0.0)
TWICE = RetryPolicy(attempts=2, base_delay_s=0.0)


class _Resp:
    def __init__(self, status, body=b"", reason="", headers=None):
        self.status_code, self.content, self.reason = status, body, reason
        self.text = body.decode()
        self.headers = CaseInsensitiveDict(headers or {})
        self.closed = False

    def close(self):
        self.closed = True


class _Session:
    def __init__(self, *replies):
        self.replies, self.calls, self.closed = list(replies), [], 0

    def get(self, url, **kw):
        self.calls.append((url, kw))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self):
        self.closed += 1


def _get(session, params=None, **kw):
    return get_with_retries(
        "https://h/p",
        params,
        source="demo",
        what="Jan",
        session=session,
        sleep=lambda s: None,
        **{"policy": ONCE, **kw},
    )


def test_display_url_appends_to_an_existing_query():
    assert display_url("https://h/p?a=1", {"b": 2}) == "https://h/p?a=1&b=2"
    assert display_url("https://h/p", {"b": 2}) == "https://h/p?b=2"


def test_a_zero_retry_after_is_zero():
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("0.5") == 0.5


def test_the_timeout_reaches_the_session_and_defaults_to_30_s():
    s = _Session(_Resp(200), _Resp(200))
    _get(s)
    _get(s, timeout_s=7)
    assert [kw["timeout"] for _, kw in s.calls] == [30, 7]


def test_a_given_session_is_used_and_not_closed_and_a_private_one_is_closed(monkeypatch):
    given = _Session(_Resp(200))
    assert _get(given).status_code == 200
    assert len(given.calls) == 1 and given.closed == 0
    private = _Session(_Resp(200))
    monkeypatch.setattr(http_mod.requests, "Session", lambda: private)
    get_with_retries("https://h/p", None, source="demo", what="Jan", sleep=lambda s: None)
    assert len(private.calls) == 1 and private.closed == 1


def test_300_is_not_success_and_299_is():
    assert _get(_Session(_Resp(299))).status_code == 299
    with pytest.raises(SourceFetchError, match="HTTP 300"):
        _get(_Session(_Resp(300)))


def test_500_is_retried():
    assert _get(_Session(_Resp(500), _Resp(200)), policy=TWICE).status_code == 200


def test_the_4xx_message_is_exact_without_reason_or_body():
    with pytest.raises(SourceFetchError) as err:
        _get(_Session(_Resp(418, reason=None)))
    assert str(err.value) == (
        "demo: fetching Jan failed: HTTP 418  from https://h/p. Hint: the server refused the "
        "request; check the source's options."
    )


def test_the_4xx_message_has_the_reason_and_300_characters_of_the_body():
    body = ("x" * 299 + "yz").encode()
    with pytest.raises(SourceFetchError) as err:
        _get(_Session(_Resp(404, body, reason="Not Found")))
    assert "HTTP 404 Not Found from" in str(err.value)
    assert f": {'x' * 299}y. Hint:" in str(err.value)


def test_a_secret_echoed_in_the_body_is_masked():
    body = b"key s3cr3t is not valid"
    with pytest.raises(SourceFetchError) as err:
        _get(_Session(_Resp(401, body)), {"API_KEY": "s3cr3t", "asset": "btc"})
    assert "s3cr3t" not in str(err.value) and "key *** is not valid" in str(err.value)
    assert "btc" in str(err.value)  # a value that is not a secret is shown


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (requests.Timeout("t"), "timed out after 30 s (https://h/p?api_key=***)"),
        (
            requests.ConnectionError("c"),
            "connection failed or was cut off (ConnectionError) (https://h/p?api_key=***)",
        ),
    ],
)
def test_retryable_failures_name_what_happened(exc, expected):
    with pytest.raises(SourceFetchError) as err:
        _get(_Session(exc), {"api_key": "s3cr3t"})
    assert str(err.value).endswith(expected)


def test_another_request_error_names_its_type_and_masks_the_secret():
    exc = requests.exceptions.InvalidURL("bad url with s3cr3t in it")
    with pytest.raises(SourceFetchError) as err:
        _get(_Session(exc), {"api_key": "s3cr3t"})
    assert str(err.value) == (
        "demo: fetching Jan failed: InvalidURL: bad url with *** in it (https://h/p?api_key=***)"
    )


def test_a_known_4xx_gets_its_own_hint():
    with pytest.raises(SourceFetchError) as err:
        _get(_Session(_Resp(404, reason="Not Found")))
    assert str(err.value).endswith(
        "Hint: the endpoint or the requested id does not exist; check base_url and the "
        "asset / series ids."
    )
