"""Tests that need an outside service (a PostgreSQL server, a headless browser) ask for it here.

Where the service cannot be had, such a test is skipped with the reason, except under
``RSX_REQUIRE_SERVICES=1`` (CI sets it), where a missing service fails the test: CI must never
pass by skipping what it was meant to run.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "RSX_REQUIRE_SERVICES"


def services_required() -> bool:
    """Whether this run must have every service (``RSX_REQUIRE_SERVICES=1``)."""
    return os.environ.get(REQUIRE_ENV, "").strip() == "1"


def require_service(name: str, available: bool, reason: str) -> None:
    """Go on when ``available``; otherwise skip the test, or fail it when services are required.

    ``name`` names the service ("postgresql", "chromium"), ``reason`` says in one line why it
    is missing and how to get it.
    """
    if available:
        return
    message = f"{name} is not available: {reason}"
    if services_required():
        pytest.fail(f"{message} ({REQUIRE_ENV}=1: a missing service is a failure)", pytrace=False)
    pytest.skip(message)
