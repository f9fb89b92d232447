"""The demo page in a real browser: what a person does (click, double-click, flip a switch), and the charges the
service really made, counted on the server's side.

Every wait is for something the page or the server shows (an attribute, a log row), never a sleep.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .conftest import Demo

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.timeout(90)

SUCCESS = "#pay-form[data-idempo-state=success]"
FAIL = "#pay-form[data-idempo-state=fail]"


def log_rows(page: Page) -> list[dict[str, str]]:
    """The page's log of attempts, oldest first: payment, attempt, key, status and replayed, from data attributes."""
    rows: list[dict[str, str]] = page.eval_on_selector_all(
        "#log tbody tr", "rows => rows.map(r => ({...r.dataset})).reverse()"
    )
    return rows


def wait_for_log(page: Page, status: str, count: int) -> None:
    """Wait until the log has *count* rows with *status* (naive mode has no state machine to wait on)."""
    page.wait_for_function(
        "([status, count]) => document.querySelectorAll(`#log tbody tr[data-status='${status}']`).length >= count",
        arg=[status, count],
    )


def one_key(attempts: list[dict[str, Any]]) -> str:
    keys = {attempt["key"] for attempt in attempts}
    assert len(keys) == 1, keys
    (key,) = keys
    assert isinstance(key, str)
    return key


def test_double_click_pay_makes_one_charge(page: Page, demo: Demo) -> None:
    """Double-clicking Pay while the payment runs (the slow switch keeps it running for 3 s) makes one payment:
    the button is disabled by the first click, and the retries of the timed-out attempt reuse its key."""
    page.check("#slow")
    page.dblclick("#pay")
    assert page.get_attribute("#pay", "aria-busy") == "true"
    page.wait_for_selector(SUCCESS)

    assert len(demo.charges()) == 1
    attempts = demo.attempts()
    assert {attempt["submission"] for attempt in attempts} == {attempts[0]["submission"]}  # one submission only
    key = one_key(attempts)
    assert demo.charges()[0]["idempotency_key"] == key
    rows = log_rows(page)
    assert rows[0]["status"] == "timeout"  # the first attempt ran out of its 2 s
    assert (rows[-1]["status"], rows[-1]["replayed"], rows[-1]["key"]) == ("201", "true", key)
    assert page.is_enabled("#pay")  # again=True: ready for the next payment, with a new key
    assert page.inner_text("#next-key") != key


def test_dropped_response_is_retried_with_the_same_key(page: Page, demo: Demo) -> None:
    """The charge is made, its response lost: the page sees a network error, retries with the same key, and the
    service replays the stored answer. One charge."""
    page.check("#drop")
    page.click("#pay")
    page.wait_for_selector(SUCCESS)

    charges = demo.charges()
    assert len(charges) == 1
    attempts = demo.attempts()
    assert [(a["fault"], a["status"], a["replayed"]) for a in attempts] == [("drop", None, False), (None, 201, True)]
    key = one_key(attempts)
    assert charges[0]["idempotency_key"] == key
    rows = log_rows(page)
    assert [(r["attempt"], r["key"], r["status"], r["replayed"]) for r in rows] == [
        ("1", key, "network-error", "false"),
        ("2", key, "201", "true"),
    ]
    assert "replayed" in page.inner_text("#status")


def test_503_on_the_first_attempt_is_retried_once(page: Page, demo: Demo) -> None:
    """A 503 with Retry-After refuses the first attempt before anything runs; the retry charges. One charge."""
    page.check("#fail-first")
    page.click("#pay")
    page.wait_for_selector(SUCCESS)

    assert len(demo.charges()) == 1
    attempts = demo.attempts()
    assert [(a["status"], a["replayed"]) for a in attempts] == [(503, False), (201, False)]
    key = one_key(attempts)
    assert [(r["key"], r["status"]) for r in log_rows(page)] == [(key, "503"), (key, "201")]


def test_reused_key_replays_the_same_amount_and_rejects_another(page: Page, demo: Demo) -> None:
    """The previous key with the same amount is a replay (no new charge); with another amount a 422: an error
    is shown, a new key generated, and paying again with it works."""
    page.click("#pay")
    page.wait_for_selector(SUCCESS)
    first_key = demo.charges()[0]["idempotency_key"]

    page.check("#reuse-key")
    assert page.inner_text("#next-key") == first_key
    page.click("#pay")
    page.wait_for_function("document.querySelectorAll('#log tbody tr').length === 2")  # the second payment ran
    page.wait_for_selector(SUCCESS)
    assert log_rows(page)[-1]["replayed"] == "true"
    assert len(demo.charges()) == 1

    page.check("#reuse-key")
    page.fill("#amount", "25.00")
    page.click("#pay")
    page.wait_for_selector(FAIL)
    assert page.get_attribute("#status", "data-kind") == "error"
    assert "422" in page.inner_text("#status")
    new_key = page.inner_text("#next-key")
    assert new_key not in (first_key, "", "…")
    assert page.is_enabled("#pay")
    assert len(demo.charges()) == 1

    page.click("#pay")
    page.wait_for_selector(SUCCESS)
    charges = demo.charges()
    assert [(c["amount"], c["idempotency_key"]) for c in charges] == [(1000, first_key), (2500, new_key)]


def test_without_idempo_a_double_click_charges_twice(page: Page, demo: Demo) -> None:
    """With idempo off, no key is sent and the button stays enabled: a double click is two charges."""
    page.check("#no-idempo")
    assert page.inner_text("#next-key").startswith("none")
    page.dblclick("#pay")
    wait_for_log(page, "201", 2)

    charges = demo.charges()
    assert len(charges) == 2
    assert {c["idempotency_key"] for c in charges} == {None}


def test_without_idempo_a_dropped_response_charges_twice(page: Page, demo: Demo) -> None:
    """With idempo off, the retry after a lost response is a second charge: what the key prevents."""
    page.check("#no-idempo")
    page.check("#drop")
    page.click("#pay")
    wait_for_log(page, "201", 1)

    assert len(demo.charges()) == 2
    assert [a["fault"] for a in demo.attempts()] == ["drop", None]


def test_idempo_back_on_sends_keys_again(page: Page, demo: Demo) -> None:
    """Turning idempo off and on again rebinds the form: the next payment is keyed and the button disabled."""
    page.check("#no-idempo")
    page.uncheck("#no-idempo")
    page.check("#drop")
    page.click("#pay")
    page.wait_for_selector(SUCCESS)
    charges = demo.charges()
    assert len(charges) == 1
    assert charges[0]["idempotency_key"] == one_key(demo.attempts())


def test_screenshot_after_a_payment(page: Page, demo: Demo, tmp_path: Path) -> None:
    """A picture of the page after a payment through a 503 and a dropped response, with the log showing the
    retries. Saved where ``IDEMPO_SCREENSHOT`` says (``make screenshot`` writes docs/demo.png), else only checked."""
    page.fill("#amount", "42.00")
    page.click("#pay")
    page.wait_for_selector(SUCCESS)
    page.check("#fail-first")
    page.check("#drop")
    page.fill("#amount", "19.90")
    page.click("#pay")
    page.wait_for_function("document.querySelectorAll('#log tbody tr').length === 4")
    page.wait_for_selector(SUCCESS)
    page.click("#refresh")
    page.wait_for_function("document.querySelector('#charge-count').textContent === '2'")
    assert len(demo.charges()) == 2

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("IDEMPO_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
