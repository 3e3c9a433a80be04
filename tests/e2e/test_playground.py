"""The browser playground (server/playground/) in real headless Chromium against a real steerd
on the embedded default (the session's ``default_server``, HTTP on).

The page is driven as a user would (search, add an edit, run, pick the heatmap feature,
hover a token); what it shows is checked against our own calls to the HTTP API with the
same settings (``/v1/completions``, temperature 0) and against gRPC ``SearchFeatures``.

Needs /usr/bin/chromium and /usr/bin/chromedriver (``make browser-deps``); skipped, saying
so, without them. ``PLAYGROUND_SCREENSHOT=docs/playground.png`` also writes the screenshot
the docs show (1280x900); it is always written under the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SAE = "topics_l1"
PROMPT = "Yesterday my friend"  # neutral: the plain continuation is not about the ocean
MAX_TOKENS = 24
TOP_K = 5  # the page's top features per token (app.js TOP_K)
WIDTH, HEIGHT = 1280, 900


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as res:
        return json.loads(res.read())


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"BROWSER TEST NOT RUN: headless Chromium is missing ({', '.join(missing)} "
                    f"not found). Install it with `make browser-deps` "
                    f"(apt-get install -y chromium chromium-driver).")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="BROWSER TEST NOT RUN: selenium is not installed "
                                     "(pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    # the viewport itself, so the screenshot is exactly WIDTH x HEIGHT
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, fn, timeout: float = 120, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: fn(d), message=f"timed out waiting for {what}")


def _testids(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def _heat_cells(driver) -> list[dict]:
    """Every heatmap cell's position, token id and value (None where the page shows none)."""
    return driver.execute_script("""
        return [...document.querySelectorAll('[data-testid="heat-cell"]')].map(c => ({
            position: Number(c.dataset.position), token_id: Number(c.dataset.tokenId),
            text: c.textContent, value: c.dataset.value === undefined ? null : Number(c.dataset.value)}));
    """)


def _check_heatmap(cells: list[dict], api: dict) -> None:
    """The cells are the API's tokens, one each, with the API's values of its one watched
    feature."""
    choice = api["choices"][0]
    n_prompt = len(choice["prompt_token_ids"])
    ids = [*choice["prompt_token_ids"], *choice["token_ids"]]
    assert [c["position"] for c in cells] == list(range(len(ids)))
    assert [c["token_id"] for c in cells] == ids
    reads = {f["position"]: f for f in choice["features"] if f["sae"] == SAE}
    assert len(reads) == len(ids) - 1  # the last generated token is never fed to the model
    shown = {c["position"]: c["value"] for c in cells if c["value"] is not None}
    assert shown.keys() == reads.keys()
    for p, f in reads.items():
        (want,) = f["watch_values"]
        assert shown[p] == pytest.approx(want, abs=1e-4), f"position {p}"
    # each cell shows its token's text: the generated cells spell the generated text
    assert "".join(c["text"] for c in cells[n_prompt:]) == choice["text"].replace("\n", "↵")


def test_playground_steers_and_shows_reads(default_server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    base = default_server.http_url.removesuffix("/v1")
    model = default_server.openai().models.list().data[0].id
    with default_server.client() as c:
        grpc_found = c.search_features("ocean", sae=SAE, limit=20)
    top = grpc_found[0]
    assert top.steer_value > 0, "the embedded ocean feature has no measured clamp value"

    d = browser
    d.get(base + "/")
    _wait(d, lambda d: model in d.find_element(By.ID, "model-info").text, 30, "model info")
    assert SAE in d.find_element(By.ID, "model-info").text
    assert "vectors@" not in d.find_element(By.ID, "model-info").text  # banks are not SAEs

    from selenium.webdriver.support.select import Select

    # the server also serves the labelled CLT topics_clt: search this SAE's labels only
    Select(d.find_element(By.ID, "search-sae")).select_by_value(SAE)
    d.find_element(By.ID, "search").send_keys("ocean")
    d.find_element(By.ID, "search-go").click()
    _wait(d, lambda d: _testids(d, "search-result"), 30, "search results")
    results = _testids(d, "search-result")
    assert [int(r.get_attribute("data-index")) for r in results] == [f.index for f in grpc_found]
    assert top.label in results[0].text

    results[0].find_element(By.CSS_SELECTOR, '[data-testid="add-edit"]').click()
    (edit,) = _testids(d, "edit")
    value = edit.find_element(By.CSS_SELECTOR, '[data-testid="edit-value"]')
    # a new edit starts where text stays fluent (0.75 x site_norm, README), below the
    # labeller's strong steer value, and the slider goes past that
    assert top.site_norm > 0
    assert float(value.get_attribute("value")) == pytest.approx(0.75 * top.site_norm, rel=1e-5)
    slider = edit.find_element(By.CSS_SELECTOR, '[data-testid="edit-slider"]')
    assert float(slider.get_attribute("max")) > top.steer_value > 0.75 * top.site_norm
    strong = float(round(0.75 * top.site_norm))  # typed in
    assert strong > 2 * top.max_activation  # strong: over twice its largest activation
    value.clear()
    value.send_keys(str(strong))
    assert float(slider.get_attribute("value")) == pytest.approx(strong, rel=1e-2)

    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    mt = d.find_element(By.ID, "max-tokens")
    mt.clear()
    mt.send_keys(str(MAX_TOKENS))
    d.find_element(By.ID, "run").click()
    _wait(d, lambda d: d.find_element(By.ID, "run-state").get_attribute("data-state")
          in ("done", "error"), 180, "both columns")
    assert d.find_element(By.ID, "run-state").get_attribute("data-state") == "done", \
        d.find_element(By.ID, "error").text
    for col in ("plain-output", "steered-output"):
        assert d.find_element(By.ID, col).get_attribute("data-state") == "done"
    plain = d.find_element(By.ID, "plain-output").get_attribute("textContent")
    steered = d.find_element(By.ID, "steered-output").get_attribute("textContent")
    assert plain and steered and steered != plain

    # our own requests with the same settings
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    clamp = [{"sae": SAE, "feature": top.index, "mode": "clamp", "value": strong}]
    assert _post(base + "/v1/completions", body)["choices"][0]["text"] == plain
    assert _post(base + "/v1/completions", {**body, "interventions": clamp}
                 )["choices"][0]["text"] == steered

    # the heatmap of the clamped feature, plain then steered, against reads of our own
    results = _testids(d, "search-result")
    results[0].find_element(By.CSS_SELECTOR, '[data-testid="heatmap-feature"]').click()
    _wait(d, lambda d: _testids(d, "heat-cell"), 60, "heatmap cells")
    assert str(top.index) in d.find_element(By.ID, "heatmap-title").text
    reads = [{"sae": SAE, "top_k": TOP_K, "watch": [top.index]}]
    api_plain = _post(base + "/v1/completions", {**body, "reads": reads, "return_token_ids": True})
    _check_heatmap(_heat_cells(d), api_plain)

    # hovering a prompt token lists that position's top features
    p = 2
    cell = d.find_elements(By.CSS_SELECTOR, '[data-testid="heat-cell"]')[p]
    ActionChains(d).move_to_element(cell).perform()
    _wait(d, lambda d: _testids(d, "top-feature"), 30, "top features on hover")
    shown = [int(e.get_attribute("data-index")) for e in _testids(d, "top-feature")]
    want = next(f for f in api_plain["choices"][0]["features"] if f["position"] == p)
    assert shown == want["indices"] and len(shown) == TOP_K

    Select(d.find_element(By.ID, "heatmap-source")).select_by_value("steered")
    api_steered = _post(base + "/v1/completions", {**body, "reads": reads, "interventions": clamp,
                                                   "return_token_ids": True})
    _check_heatmap(_heat_cells(d), api_steered)
    assert all(c["value"] == pytest.approx(strong) for c in _heat_cells(d)[:-1])  # as edited

    # the feature card
    results[0].find_element(By.CSS_SELECTOR, '[data-testid="show-card"]').click()
    _wait(d, lambda d: d.find_element(By.ID, "feature-card").is_displayed(), 30, "feature card")
    assert d.find_element(By.CSS_SELECTOR, '[data-testid="card-label"]').text == top.label
    assert len(_testids(d, "card-examples")[0].find_elements(By.TAG_NAME, "li")) == \
        len(top.examples)

    # another ocean feature, not edited: picking it re-runs both columns to read it; then the
    # screenshot the docs show
    other = grpc_found[1]
    results[1].find_element(By.CSS_SELECTOR, '[data-testid="heatmap-feature"]').click()
    _wait(d, lambda d: d.find_element(By.ID, "run-state").get_attribute("data-state")
          in ("done", "error"), 180, "the re-run")
    assert d.find_element(By.ID, "steered-output").get_attribute("textContent") == steered
    reads = [{"sae": SAE, "top_k": TOP_K, "watch": [other.index]}]
    _check_heatmap(_heat_cells(d), _post(base + "/v1/completions", {
        **body, "reads": reads, "interventions": clamp, "return_token_ids": True}))
    cells = d.find_elements(By.CSS_SELECTOR, '[data-testid="heat-cell"]')
    ActionChains(d).move_to_element(cells[len(cells) - 4]).perform()
    _wait(d, lambda d: _testids(d, "top-feature"), 30, "top features on hover")
    assert not d.find_element(By.ID, "error").is_displayed()
    shot = tmp_path / "playground.png"
    assert d.save_screenshot(str(shot))
    png = shot.read_bytes()
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (WIDTH, HEIGHT)
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["PLAYGROUND_SCREENSHOT"])
