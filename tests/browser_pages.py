"""Opening the app in the browser tests' headless chromium (the `browser` fixture is in conftest.py)."""

from __future__ import annotations


def open_app_page(browser, url: str, device: str = "CPU"):
    """A fresh browser context (a new session, as after closing the browser) on the app at `url`, returned once the
    page has loaded its state (the device line names `device`)."""
    tab = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    tab.set_default_timeout(30_000)
    tab.goto(url)
    tab.locator("#device").get_by_text(device).wait_for(state="attached")
    return tab
