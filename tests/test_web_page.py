"""The page at ``/`` in a real headless Chromium (Selenium + Debian's chromium-driver), against the
session's 2-rank tiny server: fill in the form, watch the bar reach 100 %, the video play in
place, cancel a queued job, and see the server's own words for a bad size. The screenshot of
the finished page is written to $STEPVIDEO_SCREENSHOT when set (docs/web-page.png comes from it).
"""
from __future__ import annotations

import os
import time

import pytest
import requests

from server_launch import TOKEN
from stepvideo.job_server.app import ServingContext, create_app
from stepvideo.job_server.config import ServerConfig
from stepvideo.job_server.jobs import JobStore
from stepvideo.job_server.metrics import ServerMetrics
from stepvideo.job_server.worker import Dispatcher

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LONG = 90            # steps of a job that keeps the worker busy while another one waits (--max_steps 100)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing: the page test needs a headless Chromium and its driver "
                        f"(STEPVIDEO_INSTALL_BROWSER=1 bash scripts/test.sh installs Debian's {package} as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _until(predicate, timeout=120.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} never happened within {timeout:g} s")


def _fill(driver, **values):
    from selenium.webdriver.common.by import By      # selenium is optional: the module skips without it

    for element_id, value in values.items():
        box = driver.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(str(value))


def _card(driver, job_id):
    return driver.execute_script(
        "const c = document.querySelector('.job[data-id=\"' + arguments[0] + '\"]'); if (!c) return null;"
        "const v = c.querySelector('video'); return {status: c.querySelector('.status').textContent,"
        "bar: c.querySelector('.bar').getAttribute('aria-valuenow'), stage: c.querySelector('.stage').textContent,"
        "ready: v ? v.readyState : null, duration: v ? v.duration : null};", job_id)


def test_page_generates_plays_cancels_and_shows_errors(browser, tiny_generation_server):
    from selenium.webdriver.common.by import By      # selenium is optional: the browser fixture skips without it

    server = tiny_generation_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(server.url + "/", timeout=10).status_code == 200          # the page needs no token
    browser.get(server.url + "/")
    _fill(browser, token=TOKEN)
    browser.find_element(By.ID, "prompt").click()                                 # the token box's change event
    _until(lambda: "stepvideo-t2v" in browser.find_element(By.ID, "model").text, 30, "the model name")

    before = {j["id"] for j in requests.get(server.url + "/v1/videos?limit=100", headers=auth, timeout=10).json()["data"]}
    _fill(browser, prompt="一只猫在月球上散步 a cat walks on the moon", size="64x64", frames=17, steps=2, seed=11)
    browser.find_element(By.ID, "submit").click()
    job_id = _until(lambda: ({j["id"] for j in requests.get(server.url + "/v1/videos?limit=100", headers=auth,
                                                            timeout=10).json()["data"]} - before or {None}).pop(),
                    30, "the job")
    seen = []
    card = _until(lambda: seen.append(_card(browser, job_id)) or (seen[-1] if seen[-1] and seen[-1]["ready"] and
                                                                    seen[-1]["ready"] >= 2 else None),
                  180, "the finished video")
    bars = [int(c["bar"]) for c in seen if c]
    assert card["status"] == "completed" and bars[-1] == 100 and bars == sorted(bars), bars
    assert card["duration"] > 0
    job = requests.get(f"{server.url}/v1/videos/{job_id}", headers=auth, timeout=10).json()
    assert job["settings"]["seed"] == 11 and job["size"] == "64x64" and job["settings"]["num_frames"] == 17
    shot = os.environ.get("STEPVIDEO_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)

    # cancel a queued job: one long job runs, the page's cancel button stops the one behind it
    running, waiting = (requests.post(server.url + "/v1/videos", headers=auth, timeout=10, json=body)
                        for body in ({"prompt": "busy", "num_inference_steps": LONG, "seed": 1},
                                     {"prompt": "waits in the queue", "seed": 2}))
    assert running.status_code == 202 and waiting.status_code == 202, (running.text, waiting.text)
    running, waiting = running.json(), waiting.json()
    _until(lambda: (_card(browser, waiting["id"]) or {}).get("status") == "queued", 30, "the queued job's card")
    browser.find_element(By.CSS_SELECTOR, f'.job[data-id="{waiting["id"]}"] button.cancel').click()
    _until(lambda: (_card(browser, waiting["id"]) or {}).get("status") == "cancelled", 30, "the cancel")
    assert requests.get(f"{server.url}/v1/videos/{waiting['id']}", headers=auth, timeout=10).json()["status"] == \
        "cancelled"
    requests.delete(f"{server.url}/v1/videos/{running['id']}", headers=auth, timeout=10)

    # a bad size: the page shows what the server says, word for word
    _fill(browser, size="100x100")
    browser.find_element(By.ID, "submit").click()
    said = requests.post(server.url + "/v1/videos", headers=auth, timeout=10,
                         files={"prompt": (None, "x"), "size": (None, "100x100"), "num_frames": (None, "17"),
                                "num_inference_steps": (None, "2"), "seed": (None, "11")}).json()["error"]["message"]
    assert "'size'" in said
    _until(lambda: browser.find_element(By.ID, "error").text == said, 30, "the server's message")

    # delete the finished job from the page: its card goes away
    browser.find_element(By.CSS_SELECTOR, f'.job[data-id="{job_id}"] button.delete').click()
    _until(lambda: _card(browser, job_id) is None, 30, "the delete")
    assert requests.get(f"{server.url}/v1/videos/{job_id}", headers=auth, timeout=10).status_code == 404


@pytest.mark.parametrize("ui", [True, False])
def test_the_page_needs_no_token_and_no_ui_turns_it_off(tmp_path, ui):
    """The app itself (its store in a temporary state dir; no model needed for these routes)."""
    store = JobStore.open(tmp_path)
    try:
        ctx = ServingContext(store=store, config=ServerConfig(token=TOKEN, ui=ui), metrics=ServerMetrics(store.counts),
                             dispatcher=Dispatcher(store))
        http = create_app(ctx).test_client()
        page = http.get("/")
        if ui:
            assert page.status_code == 200 and b"<video" not in page.data[:200] and b"/v1/videos" in page.data
            assert b"http://" not in page.data and b"https://" not in page.data and b'="//' not in page.data   # offline
        else:
            assert page.status_code == 401                          # an unknown route, behind the token
            assert http.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
        error = http.get("/v1/videos").get_json()["error"]          # every API call needs the token
        assert error["type"] == "authentication_error" and "Authorization" in error["message"]
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503   # loading
    finally:
        store.close()
