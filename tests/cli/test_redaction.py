"""No store URL the CLI is given ever shows its password: every malformed kind (usage error,
exit 2) and an unreachable store (exit 3), through both entry points, as a user runs them."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from celery_idempotency.cli import EXIT_STORE, EXIT_USAGE
from tests.cli.conftest import Run, run_celery, run_standalone
from tests.support.services import free_port

SECRET = "Pa55/w@rd:x"
FORMS = (SECRET, quote(SECRET, safe=""), "Pa55", "rd:x")

MALFORMED = {
    "bad port": "redis://app:{pw}@127.0.0.1:99999/0",
    "unknown scheme": "rdis://app:{pw}@127.0.0.1:6379/0",
    "missing ://": "redis:/app:{pw}@127.0.0.1:6379/0",
    "extra sentinel path segment": "redis+sentinel://app:{pw}@127.0.0.1:26379/svc/0/extra",
    "cluster with a db number": "redis+cluster://app:{pw}@127.0.0.1:7000/2",
    "bad IPv6": "redis://app:{pw}@[::1:6379/0",
    "unknown parameter": "redis://app:{pw}@127.0.0.1:6379/0?sslmode=on",
}


def assert_redacted(result: Run) -> None:
    output = result.out + result.err
    assert not [form for form in FORMS if form in output], output
    assert "Traceback" not in output and "***" in result.err


@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "raw"])
@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_urls_exit_2_without_the_password(kind: str, encoded: bool) -> None:
    url = MALFORMED[kind].format(pw=quote(SECRET, safe="") if encoded else SECRET)
    result = run_standalone("--store-url", url, "list")
    assert result.code == EXIT_USAGE, result.err
    assert_redacted(result)


@pytest.mark.parametrize("kind", ["bad port", "missing ://", "cluster with a db number"])
def test_the_celery_plugin_hides_it_too(kind: str) -> None:
    result = run_celery("stats", store_url=MALFORMED[kind].format(pw=quote(SECRET, safe="")))
    assert result.code == EXIT_USAGE, result.err
    assert_redacted(result)


@pytest.mark.parametrize("scheme", ["redis://", "redis+cluster://"])
def test_an_unreachable_store_exits_3_without_the_password(scheme: str) -> None:
    url = f"{scheme}app:{quote(SECRET, safe='')}@127.0.0.1:{free_port()}"
    result = run_standalone("--store-url", url, "--timeout", "0.3", "list")
    assert result.code == EXIT_STORE, result.err
    assert_redacted(result)
