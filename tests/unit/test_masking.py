"""Secrets in free text masked by their shape (``storage.masking.masked_in_text``), and
what is left as it is. How a breaker's logs use it: ``test_health_checks.py``."""

from __future__ import annotations

import pytest

from celery_breaker.storage.masking import masked_in_text

# -- adversarial texts -------------------------------------------------------------
# Each regex is linear: worst cases measured on these, not asserted (a timed assertion
# fails on a busy machine). The commits that changed the rules give the figures.


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1990 + " https://shop:s3cr3t-pw@payments.example/charge",  # (cut in its last word)
        "token" * 400,
        "a:" * 1000,
        "a:@" * 700,
        "@" * 2000,
        "password: " * 250,
        "\\'" * 1000,
        "user:" + "a" * 1990 + "@",
        "https://" + "a@" * 1000,
    ],
)
def test_an_adversarial_text_is_masked_as_it_should_be(text: str) -> None:
    shown = masked_in_text(text)
    assert "s3cr3t" not in shown
    assert len(shown) <= 2_003


def test_a_text_cut_keeps_its_first_words_and_drops_the_one_it_cut() -> None:
    assert masked_in_text("word " * 500) == "word " * 400 + "..."
    assert masked_in_text("ab " + "x" * 2100) == "ab ..."
    assert masked_in_text("x" * 2100) == "..."
