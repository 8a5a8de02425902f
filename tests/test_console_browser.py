"""The console in a real browser: Playwright driving Debian's chromium against a live server on loopback.

Without chromium these tests skip with the install command; under `.ci/run` (FEDXR_REQUIRE_BROWSER=1) a
missing browser is a failure. Each page visited is saved as a screenshot, in the test's temporary folder
or, with FEDXR_CONSOLE_SHOTS=docs/console, where the README shows them from.
"""

import hashlib
import os
import shutil
import time

import pytest
from PIL import Image

from helpers import (CONSOLE_PASSWORD, GRADIENT, QUICKSTART, ROOT, SHARED_NIH, console_overrides,
                     phantom_training_image, write_dicom)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("fastapi", reason="the console extra is not installed: pip install -e '.[console]'")
from fedxr.console.server import background_server  # noqa: E402
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        message = "no chromium browser: install it with `apt-get install chromium` (as root)"
        if os.environ.get("FEDXR_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("FEDXR_CONSOLE_SHOTS")
    return ROOT / folder if folder else tmp_path_factory.mktemp("screenshots")


def shot(page, folder, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    assert (folder / f"{name}.png").stat().st_size > 5_000


def wait_until(check, timeout_s: float, what: str) -> None:
    """Poll ``check()`` (bounded). Playwright's wait_for_function would eval a string in the page, which the
    console's Content-Security-Policy rightly forbids."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def sign_in(page, base: str, name: str, password: str = CONSOLE_PASSWORD) -> None:
    page.goto(base + "/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_console_in_a_browser(chromium, console_run, shots, tmp_path):
    from fedxr.console.app import create_app

    app = create_app(console_run["runs"], console_run["db"], console_run["exports"])
    png = SHARED_NIH / "00000001_000.png"
    if not png.is_file():
        png = tmp_path / "ramp.png"
        Image.fromarray(GRADIENT).save(png)
    write_dicom(tmp_path / "study.dcm", GRADIENT.astype("uint16") * 16, window=(2000, 1000))
    with background_server(app) as base:
        page = chromium.new_page(accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(base + "/")
        assert page.url.startswith(base + "/login")
        sign_in(page, base, "carol", "not-the-password")
        assert "wrong user name or password" in page.inner_text("#login-error")
        shot(page, shots, "login")
        sign_in(page, base, "carol")
        assert page.url == base + "/"
        assert page.is_visible("#runs")
        shot(page, shots, "home")
        page.goto(base + "/runs/t")
        page.wait_for_selector("#rounds-chart[data-rounds='2']")
        assert page.locator("#rounds-chart polyline").count() == 3  # two sites and the aggregate
        shot(page, shots, "run")
        page.goto(base + "/models")
        link = page.locator("a.download").first
        with page.expect_download() as download:
            link.click()
        data = open(download.value.path(), "rb").read()
        assert hashlib.sha256(data).hexdigest() == link.get_attribute("data-sha256")
        shot(page, shots, "models")
        assert "Trained on synthetic data" in page.inner_text("main")  # the banner above a phantom model
        assert "Model card" in page.inner_text(".model-card summary")
        assert "Known limits" in page.inner_text(".model-card")
        page.goto(base + "/try")
        for image in (tmp_path / "study.dcm", png):  # not a chest film: the warning replaces the findings
            page.set_input_files("#try-file", str(image))
            page.click("#try-form button[type=submit]")
            page.wait_for_selector("#try-result:not([hidden])")
            wait_until(lambda: page.locator("#try-probabilities tbody tr").count() == 14, 20, "14 probabilities")
            assert page.is_visible("#try-ood") and "Findings withheld" in page.inner_text("#try-ood")
            assert "none shown" in page.inner_text("#try-findings")
            assert not page.is_visible("#try-heatmap")
        shot(page, shots, "try-not-for-this-model")
        page.set_input_files("#try-file", str(phantom_training_image(console_run)))
        page.click("#try-form button[type=submit]")
        wait_until(lambda: page.is_hidden("#try-ood"), 20, "the warning to go for an in-distribution image")
        assert "trained on synthetic data" in page.inner_text("#try-warning")
        assert page.inner_text("#try-findings")
        assert page.is_visible("#try-heatmap")
        shot(page, shots, "try")
        page.click("#sign-out")
        assert page.url.startswith(base + "/login")

        hospital = chromium.new_page()
        hospital.set_default_timeout(TIMEOUT_MS)
        sign_in(hospital, base, "hana")
        hospital.goto(base + "/sites/site-1")
        assert "images of" in hospital.inner_text("#site-data")
        shot(hospital, shots, "site")
        response = hospital.goto(base + "/sites/site-2")
        assert response.status == 403
        assert "Not allowed" in hospital.inner_text("h1")
        hospital.close()
        page.close()


def test_start_a_run_and_watch_it_live(chromium, console_run, shots):
    from fedxr.console.app import create_app

    app = create_app(console_run["runs"], console_run["db"], console_run["exports"], recipes=ROOT / "recipes")
    overrides = [o for o in console_overrides(console_run["tmp"], rounds=2, name="live")  # the console puts runs
                 if not o.startswith(("output.runs_dir=", "export.out="))]  # and models where it shows them
    overrides.append("federated.cross_site_eval=false")  # not what this page shows; ~10 s less
    with background_server(app) as base:
        page = chromium.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        sign_in(page, base, "carol")
        page.goto(base + "/runs/new")
        page.select_option("select[name=recipe]", QUICKSTART.name)
        page.fill("textarea[name=overrides]", "\n".join(overrides))
        shot(page, shots, "new_run")
        page.click("#new-run button[type=submit]")
        assert page.url == base + "/runs/live"
        page.evaluate("window.__sameDocument = true")
        # A second start while this one runs is refused.
        other = chromium.new_page()
        sign_in(other, base, "carol")
        other.goto(base + "/runs/new")
        other.fill("textarea[name=overrides]", "\n".join(overrides))
        other.click("#new-run button[type=submit]")
        assert "already going" in other.inner_text("#new-run-error")
        other.close()
        # The chart gains rounds without a reload, and the page says when the run is done.
        def rounds() -> int:
            return int(page.locator("#rounds-chart").get_attribute("data-rounds") or 0)

        wait_until(lambda: rounds() >= 1, 240, "the first round on the chart")
        wait_until(lambda: rounds() >= 2, 240, "two rounds on the chart")
        wait_until(lambda: page.inner_text("#run-state") == "finished", 240, "the run to finish")
        assert page.evaluate("window.__sameDocument") is True
        shot(page, shots, "run_live")
        page.close()
    app.state.console.launcher.stop()
