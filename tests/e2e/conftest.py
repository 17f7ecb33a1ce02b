"""Fixtures for the end-to-end alert tests: a webhook receiver and the real daemons."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alertchain import WebhookReceiver


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.stop()
