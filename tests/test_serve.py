"""``featx serve``: the API as a client uses it, its limits and token rule, and the page as a person uses it in a
headless Chromium. Every server here listens on loopback only and stops by itself."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")  # in the test extra
from starlette.testclient import TestClient  # noqa: E402

from featx.cli.commands import main  # noqa: E402
from featx.errors import ConfigError  # noqa: E402
from featx.use.predict import Predictor  # noqa: E402
from featx.use.serve import ServeLimits, check_exposure, create_app  # noqa: E402
from tests.test_hardening import invoke, one_line_error  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(tiny_run.run)) as test_client:
        yield test_client


def images(tiny_run, count=2) -> list[Path]:
    return sorted((tiny_run.data / "test").rglob("*.jpg"))[:count]


def upload(*paths: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_the_api_answers_as_featx_predict_json_does(client, tiny_run):
    chosen = images(tiny_run)
    answer = client.post("/predict", files=upload(*chosen), params={"top_k": 2})
    assert answer.status_code == 200
    expected = [{**p.as_dict(), "path": Path(p.path).name, "status": "ok"}
                for p in Predictor(tiny_run.run).predict(chosen, top_k=2)]
    assert answer.json() == expected
    assert client.get("/health").json()["status"] == "ok"
    model = client.get("/model").json()
    assert model["classes"] == ["blue", "green", "red"] and model["backbones"] == ["resnet18"]
    assert "/predict" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
    assert "<input id=\"files\"" in client.get("/").text and "cdn" not in client.get("/").text.lower()


def test_each_bad_upload_is_a_reason_and_the_server_keeps_serving(tiny_run, tmp_path):
    good = images(tiny_run, 1)[0]
    limits = ServeLimits(max_bytes=good.stat().st_size + 10, max_files=3, max_pixels=100_000)
    with TestClient(create_app(tiny_run.run, limits=limits)) as limited:
        big = tmp_path / "big.jpg"
        big.write_bytes(good.read_bytes() + b"\0" * 100)
        from PIL import Image

        huge = tmp_path / "huge.png"
        Image.new("RGB", (400, 300), (200, 30, 30)).save(huge)  # 120,000 pixels in a few hundred bytes
        empty = tmp_path / "empty.jpg"
        empty.write_bytes(b"")
        text = tmp_path / "notes.jpg"
        text.write_text("not an image")
        for bad, reason in ((text, "not an image"), (empty, "empty file"), (big, "over the upload cap"),
                            (huge, "over the pixel budget")):
            alone = limited.post("/predict", files=upload(bad))
            assert alone.status_code == 422 and reason in alone.json()["predictions"][0]["error"], bad.name
            mixed = limited.post("/predict", files=upload(good, bad))
            assert mixed.status_code == 200 and [p["status"] for p in mixed.json()] == ["ok", "error"]
        assert limited.post("/predict", files=upload(good, good, good, good)).status_code == 413
        assert limited.post("/predict").status_code == 422  # no files at all
        assert limited.post("/predict", files=upload(good), params={"score": "nearest"}).status_code == 422
        assert limited.get("/health").status_code == 200


def test_a_token_guards_every_request_and_is_required_off_loopback(tiny_run):
    with TestClient(create_app(tiny_run.run, token="s3cret")) as guarded:
        assert guarded.get("/model").status_code == 401
        assert guarded.post("/predict", files=upload(*images(tiny_run, 1))).status_code == 401
        assert guarded.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded.get("/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0 without a token"):
        check_exposure("0.0.0.0", None)
    one_line_error(invoke("serve", tiny_run.run, "--host", "0.0.0.0"), 2, "without a token")


def test_a_run_predict_cannot_replay_image_by_image_is_not_served(tiny_run, tmp_path):
    from featx.comparison.evaluate import compare
    from featx.comparison.runs import save_run

    save_run(compare([tiny_run.embeddings], ["logreg"], smooth_test=3), tmp_path / "run")
    with pytest.raises(ConfigError, match="cannot serve this run image by image \\(smooth_test"):
        create_app(tmp_path / "run")


def test_concurrent_requests_are_classified_together(tiny_run, monkeypatch):
    import httpx

    calls = []
    real = Predictor.classify

    def counted(self, files, *args, **kwargs):
        calls.append(len(files))
        return real(self, files, *args, **kwargs)

    monkeypatch.setattr(Predictor, "classify", counted)
    app = create_app(tiny_run.run, limits=ServeLimits(batch=64, wait_ms=200))
    chosen = images(tiny_run, 8)

    async def eight_at_once():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as http:
            return await asyncio.gather(*(http.post("/predict", files=upload(p)) for p in chosen))

    answers = asyncio.run(eight_at_once())
    assert [a.json()[0]["path"] for a in answers] == [p.name for p in chosen]
    assert sum(calls) == 8 and len(calls) < 8  # batched, each request its own answer back


# --- the page, as a person uses it -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium driven through the DevTools protocol on a pipe (fds 3 and 4): no port, no extra library."""

    def __init__(self, profile: Path):
        to_browser, from_us = os.pipe()
        to_us, from_browser = os.pipe()

        def wire():  # in the child: the protocol's fds 3 (commands in) and 4 (answers out)
            commands, answers = os.dup(to_browser), os.dup(from_browser)
            os.dup2(commands, 3)
            os.dup2(answers, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1000,900", "about:blank"],
            preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.send_fd, self.read_fd, self.buffer, self.ids, self.session = from_us, to_us, b"", 0, None
        self.events: list[str] = []  # the methods of the events seen, in order

    def call(self, method: str, timeout: float = 20, **params) -> dict:
        self.ids += 1
        message = {"id": self.ids, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self.read_fd], [], [], left)[0], f"no answer to {method}"
                self.buffer += os.read(self.read_fd, 1 << 20)
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if "method" in answer:
                self.events.append(answer["method"])
            if answer.get("id") == self.ids:
                assert "error" not in answer, answer
                return answer["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"the page never showed {expression}"
            time.sleep(0.1)

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        finally:
            self.process.wait(10)
            os.close(self.send_fd)
            os.close(self.read_fd)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_a_person_uploads_two_sample_images_and_reads_the_top_3(tmp_path):
    import uvicorn

    from featx.data.sample import sample_path

    cache, run = tmp_path / "cache", tmp_path / "run"
    tiny = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--out", cache]
    assert invoke("extract", sample_path(), *tiny).exit_code == 0
    assert invoke("compare", *cache.rglob("*.h5"), "--heads", "logreg", "--out", run).exit_code == 0
    chosen = [sorted((sample_path() / "test" / name).glob("*.jpeg"))[0] for name in ("NORMAL", "PNEUMONIA")]
    expected = json.loads(CliRunner().invoke(main, ["predict", str(run), *map(str, chosen), "--json"]).stdout)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    browser = None
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        browser = DevTools(tmp_path / "profile")
        target = browser.call("Target.createTarget", url=f"http://127.0.0.1:{port}/")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Emulation.setDeviceMetricsOverride", width=1000, height=900, deviceScaleFactor=1, mobile=False)
        browser.wait_for("document.getElementById('model').children.length > 0")  # provenance loaded
        # with the keyboard alone: Tab reaches the drop zone, Enter opens the file chooser
        browser.call("Page.enable")
        browser.call("Page.setInterceptFileChooserDialog", enabled=True)
        browser.call("Input.dispatchKeyEvent", type="keyDown", key="Tab", code="Tab", windowsVirtualKeyCode=9)
        browser.call("Input.dispatchKeyEvent", type="keyUp", key="Tab", code="Tab", windowsVirtualKeyCode=9)
        assert browser.evaluate("document.activeElement.id") == "drop"
        for kind in ("keyDown", "keyUp"):
            browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        deadline = time.monotonic() + 10
        while "Page.fileChooserOpened" not in browser.events:
            assert time.monotonic() < deadline, "Enter on the drop zone opened no file chooser"
            browser.evaluate("1")  # reads the events that came meanwhile
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        chooser = browser.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=chooser, files=[str(p) for p in chosen])
        browser.wait_for("document.body.dataset.done === '1'")
        shown = browser.evaluate("""JSON.stringify([...document.querySelectorAll('.result')].map(r => ({
            name: r.querySelector('h2').textContent,
            top: [...r.querySelectorAll('.topk')].map(row => [row.querySelector('.label').textContent,
                                                              Number(row.querySelector('.value').textContent)])})))""")
        screenshot = tmp_path / "page.png"
        screenshot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        if browser:
            browser.close()
        server.should_exit = True
        thread.join(15)
    shown = json.loads(shown)
    assert [s["name"] for s in shown] == [p.name for p in chosen]
    for on_page, predicted in zip(shown, expected):
        assert [c for c, _ in on_page["top"]] == [t["class"] for t in predicted["top_k"]]
        assert all(abs(p - t["probability"]) < 5e-4 for (_, p), t in zip(on_page["top"], predicted["top_k"]))
    assert screenshot.read_bytes()[:4] == b"\x89PNG" and screenshot.stat().st_size > 10_000
    if os.environ.get("FEATX_KEEP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["FEATX_KEEP_SCREENSHOT"])
