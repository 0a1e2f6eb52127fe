"""A real headless Chromium for browser tests, driven through Selenium and chromedriver.

Role: :func:`headless_chromium` installs Debian's ``chromium`` and ``chromium-driver`` when
missing (root; see :mod:`smc.testing._apt`) and returns a Selenium WebDriver on a fresh
profile, with the browser's console log captured (``driver.get_log("browser")``) and the
background services that would reach for the network switched off. Close it with ``quit()``.
Concurrency: one driver per test; each has its own browser process and profile folder.
"""

from __future__ import annotations

import tempfile
from typing import Any

from smc.testing._apt import ensure_commands

__all__ = ["headless_chromium"]


def headless_chromium(
    *, width: int = 1400, height: int = 900, accept_insecure_certs: bool = False
) -> Any:
    """A Selenium WebDriver on a new headless Chromium (see the module docstring)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = ensure_commands({"chromium": "chromium", "chromedriver": "chromium-driver"})
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(paths["chromium"])
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--window-size={width},{height}",
        f"--user-data-dir={tempfile.mkdtemp(prefix='smc-chromium-')}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if accept_insecure_certs:
        # a test server whose private CA Chromium does not know (the HTTPS API of smc serve)
        opts.set_capability("acceptInsecureCerts", True)
    return webdriver.Chrome(
        service=Service(executable_path=str(paths["chromedriver"])), options=opts
    )
