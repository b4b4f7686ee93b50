"""The Train tab in a real (headless) Chromium: two classes from images the test makes, added through
the file picker, trained, then a new image classified with the new model on the Classify tab.
Screenshots at desktop and phone widths are saved in the test's tmp_path for a person to look at."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from conftest import draw_shape
from test_teach import SIDE, make_set

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
from test_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS  # noqa: E402  (skips without Chromium)

import app as app_module  # noqa: E402
from test_app import free_port  # noqa: E402


@pytest.fixture(scope="module")
def url(tiny_bundle, tmp_path_factory):
    models = tmp_path_factory.mktemp("teach-models")
    shutil.copytree(tiny_bundle, models / "shapes")
    demo = app_module.build_app(models, teach_root=tmp_path_factory.mktemp("teach-root"))
    port = free_port()
    app_module.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


def add_class(page, name: str, files: list[str]) -> None:
    page.locator("#teach-class textarea, #teach-class input").first.fill(name)
    page.locator("#teach-files input[type=file]").set_input_files(files)
    # The picker shows the files once they are uploaded; only then does the add see them.
    picker = page.locator("#teach-files")
    sync_api.expect(picker).to_contain_text(files[-1].rsplit("/", 1)[-1].split(".")[0])
    sync_api.expect(picker).not_to_contain_text("Uploading")
    page.locator("#teach-add").click()
    sync_api.expect(page.locator("#teach-counts")).to_contain_text(name)
    # The add empties the picker after it succeeds: wait for that, or the next class's files could
    # land in the picker just before it is emptied.
    sync_api.expect(picker).to_contain_text("Drop File Here")


@pytest.mark.parametrize("width", [1280, 390])
def test_teach_two_classes_train_and_classify_with_the_new_model(url, tmp_path, width):
    images = make_set(tmp_path / "set", per_class=6)
    probe = tmp_path / "probe.jpg"
    draw_shape("circle", SIDE, np.random.default_rng(11)).save(probe)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Train").click()
        add_class(page, "circle", images["circle"])
        add_class(page, "square", images["square"])
        sync_api.expect(page.locator("#teach-notes")).to_contain_text("Ready to train")
        page.locator("#teach-train").click()
        result = page.locator("#teach-result")
        sync_api.expect(result).to_contain_text(re.compile(r"\d+% right"), timeout=120_000)
        sync_api.expect(result).to_contain_text("12 images taught")
        sync_api.expect(page.locator("#teach-download")).to_be_visible()
        page.screenshot(path=str(tmp_path / f"train-{width}.png"), full_page=True)
        # The page no wider than the screen: nothing of the tab is out of reach sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        page.get_by_role("tab", name="Classify").click()
        page.locator("input[type=file]").first.set_input_files(str(probe))
        sync_api.expect(page.locator("#headline")).to_contain_text("circle", timeout=60_000)
        page.screenshot(path=str(tmp_path / f"classify-taught-{width}.png"), full_page=True)
        print(f"screenshots: {tmp_path}")
        browser.close()
