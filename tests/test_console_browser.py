"""The console in a real headless Chromium against a real ``smc serve``: the mesh drawn, a
change on the timeline within a second of an apply, time travel, keyboard use, no console
errors. Screenshots go to the test's folder (and to ``$SMC_SCREENSHOTS`` when set)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_mesh import MESH, STORE_TO_WAREHOUSE

from smc.testing.browser import headless_chromium
from smc.testing.serve import ServeProcess

pytestmark = pytest.mark.slow


def _apply(serve: ServeProcess, text: str, actor: str) -> None:
    status, body = serve.request(
        "/v1/apply",
        method="POST",
        body=text.encode(),
        headers={"X-SMC-Actor": actor},
    )
    assert status == 200, body


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    proc = ServeProcess(tmp_path_factory.mktemp("console-browser"))
    try:
        proc.wait_ready()
        proc.grant("console-actors", ["alice", "bob"], ["apply"])
        _apply(proc, MESH, "alice")
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = headless_chromium(accept_insecure_certs=True)  # serve's own API CA
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path))
    extra = os.environ.get("SMC_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def _until(driver: Any, script: str, *, what: str, wait: float = 10.0) -> Any:
    deadline = time.monotonic() + wait
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            logs = driver.get_log("browser")
            raise AssertionError(f"timed out waiting for {what}; browser log: {logs}")
        time.sleep(0.02)


def test_console_end_to_end(serve: ServeProcess, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # the operator opens the console with the admin token in the URL fragment (never sent)
    browser.get(f"{serve.base}/console/#token={serve.credentials.token}")
    _until(browser, "return document.body.dataset.ready === 'true'", what="the page to load")
    # the demo-like mesh is drawn: services, the client identity, allowed and split edges
    ids = _until(
        browser,
        "const cy = window.smcConsole.cy;"
        "return cy.nodes().length >= 5 ? cy.elements().map(e => e.id()) : null",
        what="the map",
    )
    assert "svc:shop/bookstore" in ids and "id:shop/buyer" in ids
    assert "allow:id:shop/buyer->svc:shop/bookstore" in ids
    assert "split:svc:shop/bookstore->svc:shop/bookstore-v1" in ids
    _until(browser, "return document.querySelector('.tl-row[data-seq]')", what="timeline rows")
    _shot(browser, tmp_path, "console-mesh")

    # click an edge: its rules are shown
    browser.execute_script(
        "window.smcConsole.cy.getElementById('allow:id:shop/buyer->svc:shop/bookstore').emit('tap')"
    )
    panel = browser.find_element(By.ID, "panel-details").text
    assert "TrafficTarget/shop/buyer-to-store" in panel and "GET /books" in panel
    assert "null" not in panel and "undefined" not in panel

    # a change appears on the timeline (and the map) within a second of the apply
    t0 = time.monotonic()
    _apply(serve, STORE_TO_WAREHOUSE, "bob")
    _until(
        browser,
        "const r = document.querySelector('.tl-row[data-display=\"0\"]');"
        "return r && r.textContent.includes('TrafficTarget/shop/store-to-warehouse')",
        what="the new change at the top of the timeline",
        wait=5.0,
    )
    took = time.monotonic() - t0
    assert took < 1.0, f"the change reached the timeline after {took:.2f}s"
    _until(
        browser,
        "return window.smcConsole.cy.getElementById("
        "'allow:svc:shop/bookstore->svc:shop/warehouse').nonempty()",
        what="the new edge on the map",
        wait=3.0,
    )
    _shot(browser, tmp_path, "console-live-change")

    # keyboard: focus the timeline, move down to the previous change, open it
    timeline = browser.find_element(By.ID, "timeline")
    timeline.click()
    browser.execute_script("window.smcConsole.selected = null")
    tt_seq = browser.execute_script(
        "return [...document.querySelectorAll('.tl-row[data-seq]')].find(r => "
        "r.textContent.includes('store-to-warehouse')).dataset.seq"
    )
    for _ in range(30):  # down to the first change older than the new grant
        timeline.send_keys(Keys.ARROW_DOWN)
        seq = browser.execute_script(
            "const r = document.querySelector('.tl-row[aria-selected=\"true\"]');"
            "return r && r.dataset.seq"
        )
        if seq is not None and int(seq) < int(tt_seq):
            break
    timeline.send_keys(Keys.ENTER)
    _until(
        browser,
        "const h = document.querySelector('#panel-details h2');"
        "return h && h.textContent.startsWith('#')",
        what="the change opened from the keyboard",
    )
    # time travel from the keyboard (T) to the change before the last one: the new edge is gone
    timeline.send_keys("t")
    _until(
        browser,
        "return !document.getElementById('travel').hidden && "
        "window.smcConsole.cy.getElementById('allow:svc:shop/bookstore->svc:shop/warehouse')"
        ".empty() && window.smcConsole.cy.nodes().length >= 5",
        what="the map as it was before the change",
    )
    assert browser.find_element(By.ID, "mode").text == "past"
    _shot(browser, tmp_path, "console-time-travel")
    # Escape returns to the live mesh
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _until(
        browser,
        "return window.smcConsole.cy.getElementById("
        "'allow:svc:shop/bookstore->svc:shop/warehouse').nonempty()",
        what="the live map again",
    )

    # why: the decision and the changes behind it
    browser.find_element(By.ID, "tab-why").click()
    browser.find_element(By.ID, "why-from").send_keys("shop/buyer")
    browser.find_element(By.ID, "why-to").send_keys("shop/bookstore")
    browser.find_element(By.ID, "why-path").send_keys("/books")
    browser.find_element(By.ID, "why-method").send_keys("GET" + Keys.ENTER)
    _until(browser, "return document.getElementById('why-decision')", what="the answer")
    assert browser.find_element(By.ID, "why-decision").text == "ALLOW"
    assert "TrafficTarget/shop/buyer-to-store" in browser.find_element(By.ID, "why-events").text
    _shot(browser, tmp_path, "console-why")

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


HOSTILE = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: hostile-routes, namespace: shop}
spec:
  matches:
  - name: hostile
    pathRegex: "/<img src=x onerror=window.pwned=1>"
    methods: [GET]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: buyer-to-warehouse, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: warehouse, namespace: shop}
  rules: [{kind: HTTPRouteGroup, name: hostile-routes}]
  sources: [{kind: ServiceAccount, name: buyer, namespace: shop}]
"""


def test_markup_from_the_log_is_shown_as_text(serve: ServeProcess, browser: Any) -> None:
    """An attacker who can write policy cannot script the operator's console: markup in a
    manifest is shown as text, in the map's rules and in the timeline's diff."""
    from selenium.webdriver.common.by import By

    _apply(serve, HOSTILE, "alice")
    browser.get(f"{serve.base}/console/#token={serve.credentials.token}")
    _until(browser, "return document.body.dataset.ready === 'true'", what="the page to load")
    edge = "allow:id:shop/buyer->svc:shop/warehouse"
    _until(
        browser,
        f"return window.smcConsole.cy.getElementById('{edge}').nonempty()",
        what="the hostile grant's edge",
    )
    browser.execute_script(f"window.smcConsole.cy.getElementById('{edge}').emit('tap')")
    panel = browser.find_element(By.ID, "panel-details")
    assert "/<img src=x onerror=window.pwned=1>" in panel.text
    assert panel.find_elements(By.TAG_NAME, "img") == []
    # the change itself, opened from the timeline: the diff shows the markup as text too
    seq = browser.execute_script(
        "return [...document.querySelectorAll('.tl-row[data-seq]')].find(r => "
        "r.textContent.includes('HTTPRouteGroup/shop/hostile-routes')).dataset.seq"
    )
    browser.execute_script(f"document.querySelector('.tl-row[data-seq=\"{seq}\"]').click()")
    _until(
        browser,
        "return document.querySelector('#panel-details h2').textContent.startsWith('#" + seq + "')",
        what="the change's details",
    )
    assert "<img src=x onerror=window.pwned=1>" in panel.text
    assert panel.find_elements(By.TAG_NAME, "img") == []
    assert browser.execute_script("return window.pwned === undefined")
