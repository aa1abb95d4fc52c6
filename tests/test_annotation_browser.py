"""The annotation page in a real browser (headless Chromium driven by selenium): an annotator votes
on every item with clicks and keys, reloads half-way and resumes, changes an earlier vote; markup
in a response shows as text; the page's screenshot.

`PDPO_UPDATE_SCREENSHOT=1` writes the screenshot to docs/annotate-page.png (the README's picture)
instead of a temporary folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from annotation_fixtures import MARKUP, REPO_ROOT, link_of, pair_items, position_of, server_in_thread

from pdpo_jax.annotation.store import Study

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 20
SCREENSHOT = REPO_ROOT / "docs" / "annotate-page.png"
ITEMS = [*pair_items(4), MARKUP]


def browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed here (scripts/setup.sh installs them with apt "
                    "where it runs as root)")
    os.environ["SE_AVOID_STATS"] = "true"  # selenium's driver manager would otherwise call home
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,860", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    browser.set_page_load_timeout(WAIT_S)
    browser.set_script_timeout(WAIT_S)
    return browser


@pytest.fixture(scope="module")
def browser():
    browser = browser_or_skip()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory, browser):
    study = Study.create(tmp_path_factory.mktemp("browser") / "study.db", ITEMS)
    tokens = {name: study.add_annotator(name) for name in ("alice", "bob", "carol")}
    with server_in_thread(study) as base:
        yield browser, study, {name: link_of(base, token) for name, token in tokens.items()}, tokens


def shown_at(browser, position: int | None) -> None:
    """Waits until the page shows the item at `position` (None: the closing screen) and is idle."""
    def ready(driver) -> bool:
        body = driver.find_element(By.TAG_NAME, "body")
        view = "done" if position is None else "item"
        return (body.get_attribute("data-view") == view and body.get_attribute("data-busy") == "false"
                and (position is None or body.get_attribute("data-position") == str(position)))
    WebDriverWait(browser, WAIT_S).until(ready)


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def press(browser, key: str) -> None:
    browser.find_element(By.TAG_NAME, "body").send_keys(key)


def test_an_annotator_votes_with_clicks_and_keys_resumes_after_a_reload_and_changes_a_vote(page):
    browser, study, links, tokens = page
    annotator = study.annotator_for_token(tokens["alice"])
    browser.get(links["alice"])
    shown_at(browser, 1)
    assert text(browser, "progress") == "0 / 5"
    for element in ("persona", "history", "response-1", "response-2", "choose-1", "choose-2", "choose-draw"):
        assert browser.find_element(By.ID, element).is_displayed(), element
    first = study.shown_item(annotator, 1)
    assert text(browser, "response-1") == first.shown_responses[0]
    assert text(browser, "response-2") == first.shown_responses[1]
    assert first.item.persona[0] in text(browser, "persona")
    assert first.item.history[-1] in text(browser, "history")

    browser.find_element(By.ID, "choose-1").click()
    shown_at(browser, 2)
    assert text(browser, "progress") == "1 / 5"
    press(browser, "2")
    shown_at(browser, 3)
    press(browser, "d")
    shown_at(browser, 4)
    assert text(browser, "progress") == "3 / 5"

    browser.refresh()  # half-way: the page comes back where the annotator stopped
    shown_at(browser, 4)
    assert text(browser, "progress") == "3 / 5"

    press(browser, Keys.ARROW_LEFT)  # back to the draw, and change it
    shown_at(browser, 3)
    assert "chosen" in browser.find_element(By.ID, "choose-draw").get_attribute("class")
    browser.find_element(By.ID, "choose-1").click()
    shown_at(browser, 4)  # on to the first item not voted on
    assert text(browser, "progress") == "3 / 5"

    browser.find_element(By.ID, "choose-draw").click()
    shown_at(browser, 5)
    press(browser, "3")
    shown_at(browser, None)
    assert text(browser, "progress") == "5 / 5"

    expected = {1: "1", 2: "2", 3: "1", 4: "draw", 5: "draw"}
    votes = {v.item: v.winner for v in study.votes() if v.annotator == "alice"}
    assert votes == {study.shown_item(annotator, p).number: study.shown_item(annotator, p).winner(c)
                     for p, c in expected.items()}
    changed = [v for v in study.votes(history=True) if v.annotator == "alice" and not v.current]
    assert [v.winner for v in changed] == ["draw"]

    browser.find_element(By.ID, "back").click()  # the closing screen leads back to the last item
    shown_at(browser, 5)
    assert "chosen" in browser.find_element(By.ID, "choose-draw").get_attribute("class")


def walk_to(browser, link: str, position: int) -> None:
    """Opens the link (at position 1: nothing voted yet) and steps right to `position` with the arrow key."""
    browser.get(link)
    shown_at(browser, 1)
    for _ in range(position - 1):
        press(browser, Keys.ARROW_RIGHT)
    shown_at(browser, position)


def test_markup_in_the_data_shows_as_text_and_never_runs(page):
    browser, study, links, tokens = page
    walk_to(browser, links["bob"], position_of(study, tokens["bob"], lambda shown: shown.item == MARKUP))
    shown = {text(browser, "response-1"), text(browser, "response-2")}
    assert shown == {MARKUP.response_a, MARKUP.response_b}
    assert "<b>bold</b>" in text(browser, "persona") and "<i>hi</i>" in text(browser, "history")
    for element in ("response-1", "response-2", "persona", "history"):
        children = browser.find_element(By.ID, element).find_elements(By.CSS_SELECTOR, "script, img, b, i")
        assert children == [], element
    assert browser.execute_script("return window.pwned === undefined")
    assert all(v.annotator != "bob" for v in study.votes(history=True))  # looking is not voting


def test_the_pages_screenshot(page, tmp_path):
    browser, study, links, tokens = page
    walk_to(browser, links["carol"], position_of(study, tokens["carol"], lambda shown: shown.item != MARKUP))
    target = SCREENSHOT if os.environ.get("PDPO_UPDATE_SCREENSHOT") == "1" else tmp_path / "annotate-page.png"
    png = browser.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and height >= 600, (width, height)
    Path(target).write_bytes(png)
    assert SCREENSHOT.exists(), "docs/annotate-page.png is missing: run this test with PDPO_UPDATE_SCREENSHOT=1"
