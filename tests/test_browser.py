"""The app in a real (headless) Chromium: upload an image, read the answer off the page, and click a
cell of the confusion matrix, which only a browser can do (it is a select event, not an API call).

Skips only where no Chromium is installed (`apt-get install -y chromium`); screenshots of both tabs
are saved in the test's tmp_path for a person to look at.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import draw_shape

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and Path(p).is_file()), None)
if CHROMIUM is None:
    pytest.skip("no Chromium installed (apt-get install -y chromium chromium-driver)", allow_module_level=True)

import app as app_module  # noqa: E402
from classifier import app_logic  # noqa: E402
from classifier.predict import Predictor  # noqa: E402
from test_app import free_port, renamed_bundle  # noqa: E402
from test_ood import with_threshold  # noqa: E402

# No network here: keep Chromium from trying to phone home, and let it run as root in a container.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    """The app on the renamed shapes bundle (known mistakes), with the original bundle and a broken
    one (weights that do not fit its config) in the dropdown; yields (url, models folder)."""
    models = tmp_path_factory.mktemp("browser-models")
    renamed_bundle(tiny_bundle, models / "shapes")
    shutil.copytree(tiny_bundle, models / "original")
    broken = shutil.copytree(tiny_bundle, models / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["model_args"]["widths"] = [8, 8, 8]
    (broken / "config.json").write_text(json.dumps(config))
    # A threshold no image reaches: everything is flagged as none of the classes.
    with_threshold(tiny_bundle, models / "unfamiliar", 1e6)
    demo = app_module.build_app(models, model_id=str(models / "shapes"))
    port = free_port()
    app_module.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", models
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served[0], wait_until="domcontentloaded")
        yield page
        browser.close()


def test_upload_shows_the_top_class(page, served, tmp_path):
    image = tmp_path / "upload.png"
    draw_shape("triangle", 96).save(image)
    expected = next(iter(Predictor(served[1] / "shapes").predict(image)))
    page.locator("input[type=file]").first.set_input_files(str(image))
    top = page.locator("#headline")
    sync_api.expect(top).to_have_text(re.compile(rf"^\s*(Not sure: )?{expected} [<>]?[\d.]+%"), timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_text("Predicted in")).to_be_visible()
    # The bars: the top classes, most likely first, each probability as the Predictor gives it, in
    # app_logic.format_probability's words (never "100%" or "0%").
    probabilities = Predictor(served[1] / "shapes").predict(image, top_k=app_module.TOP_K)
    values = page.locator("#bars .bar-value")
    sync_api.expect(values).to_have_count(len(probabilities), timeout=TIMEOUT_MS)
    assert page.locator("#bars .bar-name").all_inner_texts() == list(probabilities)
    assert values.all_inner_texts() == [app_logic.format_probability(p) for p in probabilities.values()]
    page.screenshot(path=str(tmp_path / "classify.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'classify.png'}")


def test_an_unsure_answer_says_so_and_names_the_runner_up(page, tmp_path, monkeypatch):
    # A bar no answer reaches (the shipped one is app_logic.UNSURE_BELOW): every answer is unsure.
    monkeypatch.setattr(app_logic, "headline", functools.partial(app_logic.headline, unsure_below=1.01))
    image = tmp_path / "unsure.png"
    draw_shape("circle", 96).save(image)
    page.locator("input[type=file]").first.set_input_files(str(image))
    sync_api.expect(page.locator("#headline")).to_have_text(
        re.compile(r"^\s*Not sure: \w+ [<>]?[\d.]+% or \w+ [<>]?[\d.]+%\s*$"), timeout=TIMEOUT_MS)


def test_example_captions_name_the_class_of_each_photo(page):
    captions = [app_logic.example_caption(photo) for photo in app_logic.example_images()]
    assert "deer" in captions
    examples = page.locator("#examples .gallery-item")
    sync_api.expect(examples).to_have_text(captions)  # one caption per example, in order
    for n, caption in enumerate(captions):
        example = examples.nth(n)
        sync_api.expect(example).to_be_visible()
        sync_api.expect(example.locator("img")).to_be_visible()  # the photo itself, not only its label
        sync_api.expect(example.locator("img")).to_have_attribute("src", re.compile(re.escape(Path(
            app_logic.example_images()[n]).name) + "$"))
        label = example.locator(".caption-label")
        sync_api.expect(label).to_have_text(caption)
        assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), f"{caption!r} is cut short"


def _counting_classify(monkeypatch) -> list[str]:
    """Wraps the app's classify so a test can count the predictions the server really ran."""
    calls: list[str] = []
    original = app_logic.classify

    def counting(predictor, image, *args, **kwargs):
        calls.append(str(image))
        return original(predictor, image, *args, **kwargs)

    monkeypatch.setattr(app_logic, "classify", counting)
    return calls


def _wait_for(calls: list, count: int, page) -> None:
    for _ in range(TIMEOUT_MS // 100):
        if len(calls) >= count:
            break
        page.wait_for_timeout(100)
    page.wait_for_timeout(1500)  # a second, duplicate prediction would have started by now
    assert len(calls) == count, calls


def test_each_upload_and_example_click_predicts_once(page, tmp_path, monkeypatch):
    """Replacing an image used to run the model twice (the change event fired twice)."""
    calls = _counting_classify(monkeypatch)
    for n, kind in enumerate(["circle", "square", "triangle"], start=1):
        image = tmp_path / f"{kind}.png"
        draw_shape(kind, 96).save(image)
        page.locator("input[type=file]").first.set_input_files(str(image))
        _wait_for(calls, n, page)
    page.locator("#examples .gallery-item button").first.click()  # the first example
    _wait_for(calls, 4, page)
    assert Path(calls[-1]).name == Path(app_logic.example_images()[0]).name  # the example's photo
    sync_api.expect(page.get_by_text("Predicted in")).to_be_visible()


def test_a_hostile_upload_shows_one_plain_error_and_clears_the_last_result(page, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "holiday.jpg"
    draw_shape("square", 96).save(good)
    bad.write_bytes(os.urandom(4096))  # random bytes under an image's name
    files = page.locator("input[type=file]").first
    files.set_input_files(str(good))
    sync_api.expect(page.get_by_text("Predicted in")).to_be_visible()
    files.set_input_files(str(bad))
    error = page.get_by_text("holiday.jpg is not an image file")
    sync_api.expect(error).to_have_count(1)
    text = error.inner_text()
    assert "BMP, GIF, JPEG, PNG, TIFF or WebP" in text and "Pillow" not in text and "/tmp" not in text
    # The square's answer and timing are gone: nothing on the page claims to describe the bad file.
    sync_api.expect(page.locator("#headline")).to_have_text(re.compile(r"^\s*$"))
    sync_api.expect(page.get_by_text("Predicted in")).to_have_count(0)
    sync_api.expect(page.locator("#bars .bar-row")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "bad-upload.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'bad-upload.png'}")
    files.set_input_files(str(good))  # and a good image after it is classified again
    sync_api.expect(page.get_by_text("Predicted in")).to_be_visible()
    sync_api.expect(page.locator("#bars .bar-row").first).to_be_visible()


def test_clicking_a_confusion_cell_filters_the_gallery(page, tmp_path):
    page.get_by_role("tab", name="Mistakes").click()
    captions = page.locator("#mistakes-gallery .caption-label")
    sync_api.expect(captions).to_have_count(4, timeout=TIMEOUT_MS)
    # Row 2 (true "wedge"), column 1 (predicted "disc"): the two wedges taken for discs.
    page.locator("#confusion [data-testid='cell-2-1']").click()
    sync_api.expect(captions).to_have_count(2, timeout=TIMEOUT_MS)
    assert captions.all_inner_texts() == ["wedge (true, 5%) → disc 84%", "wedge (true, 5%) → disc 52%"]
    sync_api.expect(page.locator("#true-filter input")).to_have_value("wedge")
    sync_api.expect(page.locator("#predicted-filter input")).to_have_value("disc")
    page.screenshot(path=str(tmp_path / "mistakes.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'mistakes.png'}")
    # Row 1 (true "box"), column 3 (predicted "wedge"): a zero cell empties the gallery, and the
    # note says why instead of leaving a blank gallery.
    page.locator("#confusion [data-testid='cell-1-3']").click()
    sync_api.expect(captions).to_have_count(0, timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_text("No test images of box were taken for wedge.")).to_be_visible()


def test_a_cell_click_brings_the_gallery_into_view_and_a_mistake_shows_where_the_model_looked(page, tmp_path):
    page.get_by_role("tab", name="Mistakes").click()
    gallery = page.locator("#mistakes-gallery")
    page.locator("#confusion [data-testid='cell-0-2']").scroll_into_view_if_needed()
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # the table in view, the gallery not
    sync_api.expect(gallery).not_to_be_in_viewport(ratio=0.5)  # mostly above the top of the window
    page.locator("#confusion [data-testid='cell-0-2']").click()  # row disc, column box: discs taken for boxes
    captions = page.locator("#mistakes-gallery .caption-label")
    sync_api.expect(captions).to_have_count(1, timeout=TIMEOUT_MS)
    sync_api.expect(gallery).to_be_in_viewport(ratio=0.9, timeout=TIMEOUT_MS)
    gallery.locator("button").filter(has=page.locator("img")).first.click()
    heatmap = page.locator("#mistake-heatmap img")
    sync_api.expect(heatmap).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#mistake-heatmap")).to_contain_text("where it looked for box")
    page.screenshot(path=str(tmp_path / "mistake-heatmap.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'mistake-heatmap.png'}")


def test_ticking_show_where_the_model_looked_shows_the_heatmap(page, tmp_path):
    page.get_by_role("tab", name="Classify").click()
    image = tmp_path / "circle.png"
    draw_shape("circle", 96).save(image)
    page.locator("input[type=file]").first.set_input_files(str(image))
    sync_api.expect(page.get_by_text("Predicted in")).to_be_visible()
    sync_api.expect(page.locator("#heatmap img")).to_have_count(0)  # not asked for: not there
    page.locator("#show-heatmap input[type=checkbox]").check()
    sync_api.expect(page.locator("#heatmap img")).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#heatmap")).to_contain_text("Where the model looked for")
    # Ticked, a new upload gets its heatmap with its answer.
    draw_shape("square", 96).save(tmp_path / "square.png")
    page.locator("input[type=file]").first.set_input_files(str(tmp_path / "square.png"))
    sync_api.expect(page.locator("#heatmap img")).to_be_visible(timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "heatmap.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'heatmap.png'}")


def choose_model(page, name: str) -> None:
    page.get_by_label("Model").first.click()
    page.get_by_role("option", name=name, exact=True).click()


def test_switching_model_reclassifies_the_image(page, served):
    page.get_by_role("tab", name="Classify").click()
    choose_model(page, "original")
    # The uploaded triangle, now under the original class names, without uploading it again.
    top = page.locator("#headline")
    original_names = re.compile(r"^\s*(Not sure: )?(circle|square|triangle) [<>]?[\d.]+%")
    sync_api.expect(top).to_have_text(original_names, timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_text("The model tells apart: circle, square, triangle.")).to_be_visible()


def test_a_model_that_will_not_load_shows_why_and_keeps_the_last_one(page, tmp_path):
    choose_model(page, "broken")
    sync_api.expect(page.get_by_text("the weights do not fit").first).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_label("Model").first).to_have_value("original", timeout=TIMEOUT_MS)
    sync_api.expect(page.get_by_text("The model tells apart: circle, square, triangle.")).to_be_visible()
    page.screenshot(path=str(tmp_path / "broken-model.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'broken-model.png'}")


def test_an_image_past_the_bundles_threshold_is_called_none_of_the_classes(page, tmp_path):
    choose_model(page, "unfamiliar")
    sync_api.expect(page.locator("#headline")).to_have_text(
        re.compile(r"^\s*This may be none of the model's classes \(closest: (circle|square|triangle) [<>]?[\d.]+%\)"),
        timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "none-of-the-classes.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'none-of-the-classes.png'}")


def test_phone_width_layout_does_not_overflow(page, served, tmp_path):
    """At 390 px (a phone), the page scrolls only up and down: nothing pushes the main column
    sideways, on any tab, and the components' labels are not squeezed to a few letters a line."""
    phone = page.context.browser.new_page(viewport={"width": 390, "height": 844})  # the module's Chromium
    try:
        phone.set_default_timeout(TIMEOUT_MS)
        phone.goto(served[0], wait_until="domcontentloaded")
        image = tmp_path / "upload.png"
        draw_shape("circle", 96).save(image)
        phone.locator("input[type=file]").first.set_input_files(str(image))
        sync_api.expect(phone.get_by_text("Predicted in")).to_be_visible()
        for tab in ("Classify", "Mistakes", "Model"):
            phone.get_by_role("tab", name=tab).click()
            phone.wait_for_timeout(500)
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the {tab} tab is {width} px wide at a 390 px viewport"
            # Every visible label is at least a short word wide, at most two lines tall, and no word
            # of it is broken across lines (more lines than words).
            squeezed = phone.evaluate("""() => [...document.querySelectorAll(
                    'label, [data-testid="block-label"], #model-summary :is(td, th):first-child')]
                .filter(e => e.offsetParent !== null && e.innerText.trim())
                .filter(e => { const text = document.createRange();
                               text.selectNodeContents(e);  // the words' own box, not a table row's height
                               const r = text.getBoundingClientRect(), h = parseFloat(getComputedStyle(e).lineHeight) || 20;
                               const lines = new Set([...text.getClientRects()].map(b => Math.round(b.top))).size;
                               return r.width < 40 || r.height > 2.5 * h || (e.matches('td, th') && lines > e.innerText.trim().split(/\s+/).length); })
                .map(e => e.innerText.trim())""")
            assert not squeezed, f"squeezed labels on the {tab} tab: {squeezed}"
            phone.screenshot(path=str(tmp_path / f"phone-{tab.lower()}.png"), full_page=True)
            if tab == "Classify":  # the example captions whole ("automobile", not "automobi..."), on screen
                cut = phone.evaluate("""() => [...document.querySelectorAll('#examples .caption-label')]
                    .filter(e => e.scrollWidth > e.clientWidth || e.getBoundingClientRect().right > innerWidth
                                 || e.getBoundingClientRect().right > e.closest('button').getBoundingClientRect().right)
                    .map(e => e.innerText.trim())""")
                assert not cut, f"example captions cut at 390 px: {cut}"
        print(f"screenshots: {tmp_path}/phone-*.png")
    finally:
        phone.close()
