"""The draw-a-digit page in a real browser: Debian's chromium, driven by Selenium through
Debian's chromedriver (no browser download). It loads the page from a real server, draws a
"1" with the mouse and a "0" with a pen as pointer events along stroke paths, uploads a PNG of
an MNIST test digit, checks the label the page shows each time, and keeps a screenshot in
`test-artifacts/` (set MNIST_TEST_ARTIFACTS to put it elsewhere).

Skipped, saying why, where chromium, chromedriver or selenium is missing, unless
MNIST_REQUIRE_CHROMIUM=1 (set by .ci/run, which installs them) makes their absence a failure.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, MnistSplit, ServerProcess, png_bytes
from .http_client import base_url

CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
WAIT_S = 30


def _missing(reason: str) -> None:
    if os.environ.get("MNIST_REQUIRE_CHROMIUM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    binary = next((path for name in CHROMIUM if (path := shutil.which(name))), None)
    driver_path = shutil.which(CHROMEDRIVER)
    if binary is None or driver_path is None:
        _missing(
            "Debian's chromium and chromium-driver are not installed "
            "(apt-get install chromium chromium-driver; .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=900,1000"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "1", "--models", "conv,mlp")
    yield process
    assert process.stop() == 0


def shown_label(driver: Any, expected: str) -> str:
    """The label the page shows once it shows `expected` (or whatever it shows at the end
    of the wait), polling the page."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def label() -> str:
        text: str = driver.find_element(By.ID, "label").text
        return text

    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda _: label() == expected)
    return label()


def draw(driver: Any, points: list[tuple[float, float]], kind: str) -> None:
    """One stroke through `points` (fractions of the pad's size), as pointer events of a
    mouse, a pen or a finger (`kind`)."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    pad = driver.find_element(By.ID, "pad")
    size = pad.size
    pointer = PointerInput(
        {"pen": interaction.POINTER_PEN, "touch": interaction.POINTER_TOUCH}.get(
            kind, interaction.POINTER_MOUSE
        ),
        kind,
    )
    actions = ActionBuilder(driver, mouse=pointer, duration=10)

    def at(x: float, y: float) -> None:  # offsets from the pad's centre
        actions.pointer_action.move_to(
            pad, int((x - 0.5) * size["width"]), int((y - 0.5) * size["height"])
        )

    at(*points[0])
    actions.pointer_action.pointer_down()
    for x, y in points[1:]:
        at(x, y)
    actions.pointer_action.pointer_up()
    actions.perform()


def clear(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "clear").click()


def test_the_page_reads_drawn_and_uploaded_digits(
    browser: Any, server: ServerProcess, mnist_test_set: MnistSplit, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base_url(server) + "/")
    assert browser.title == "mnist-service: draw a digit"
    models = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "option")]
    assert models == ["mnist_convnet", "mnist_mlp"]

    one = [(0.5, 0.15 + 0.07 * i) for i in range(11)]
    draw(browser, one, "mouse")
    assert shown_label(browser, "1") == "1"
    # The pad's paper is transparent, so the PNG it sends has its ink in the alpha channel
    # (which the server decodes alone): a corner is clear, the stroke's middle opaque.
    alpha = (
        "return document.getElementById('pad').getContext('2d').getImageData(%d, %d, 1, 1).data[3]"
    )
    assert browser.execute_script(alpha % (0, 0)) == 0
    assert browser.execute_script(alpha % (140, 140)) == 255

    clear(browser)
    zero = [
        (0.5 + 0.22 * math.sin(2 * math.pi * t / 24), 0.5 - 0.32 * math.cos(2 * math.pi * t / 24))
        for t in range(25)
    ]
    draw(browser, zero, "pen")
    assert shown_label(browser, "0") == "0"
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    assert len(bars) == 10
    assert browser.find_element(By.ID, "seen").get_attribute("src").startswith("data:image/png")
    assert "inference" in browser.find_element(By.ID, "timing").text

    images, labels = mnist_test_set
    index = next(i for i, label in enumerate(labels) if label == 4)
    upload = tmp_path / "four.png"
    upload.write_bytes(png_bytes(images[index]))
    browser.find_element(By.ID, "file").send_keys(str(upload))
    assert shown_label(browser, "4") == "4"

    artifacts = Path(os.environ.get("MNIST_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    clear(browser)
    draw(browser, zero, "pen")
    assert shown_label(browser, "0") == "0"
    assert browser.save_screenshot(str(artifacts / "page.png"))


def test_the_page_is_usable_with_the_keyboard(browser: Any, server: ServerProcess) -> None:
    """Tab reaches the pad and every control, each with a visible focus ring; the arrow keys
    and Space draw a "1"."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(base_url(server) + "/")
    pad = browser.find_element(By.ID, "pad")
    pad.click()  # focus
    pad.send_keys(Keys.ARROW_UP * 9, " ", Keys.ARROW_DOWN * 18, " ")
    assert shown_label(browser, "1") == "1"
    focused = []
    for _ in range(5):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        active = browser.switch_to.active_element
        focused.append(active.get_attribute("id"))
        assert active.value_of_css_property("outline-style") == "solid", focused[-1]
    assert focused[:4] == ["undo", "clear", "file", "model"]


def test_the_page_is_off_with_no_web_ui() -> None:
    from .http_client import request

    process = ServerProcess("--workers", "1", "--no-web-ui")
    try:
        assert request(base_url(process) + "/").status == 404
        assert request(base_url(process) + "/v2/health/live").status == 200
    finally:
        assert process.stop() == 0


def test_the_page_fits_a_phone_screen(browser: Any, server: ServerProcess) -> None:
    """At 390×844 (a phone) nothing scrolls sideways and the pad still draws."""
    browser.set_window_size(390, 844)
    try:
        browser.get(base_url(server) + "/")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= browser.execute_script("return window.innerWidth")
        draw(browser, [(0.5, 0.15 + 0.07 * i) for i in range(11)], "touch")
        assert shown_label(browser, "1") == "1"
    finally:
        browser.set_window_size(900, 1000)
