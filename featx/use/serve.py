"""``featx serve``: a run's best head behind a web page and a JSON API (FastAPI on uvicorn, ``pip install
featx[serve]``).

The model is loaded once; images of concurrent requests are classified together (up to ``batch`` images, or
after ``wait_ms``), decoding and the forward run on a worker thread, off the event loop. Safe by default: it
listens on 127.0.0.1, anywhere else only with a token, which every request must then carry; upload bytes,
image pixels and files per request are capped, and a file that is not an image is a per-file error.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose types are imported
# inside ``create_app`` (the extra is needed only to serve).
import asyncio
import hmac
import ipaddress
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from featx.comparison.runs import RUN_FILE, load_run
from featx.errors import ConfigError
from featx.shift.remedies import not_reproducible
from featx.use.predict import Prediction, Predictor
from featx.version import __version__

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may bring, and how requests are batched together."""

    max_bytes: int = 20_000_000  # per uploaded file
    max_files: int = 32  # per request
    max_pixels: int = 50_000_000  # per image, checked from its header before it is decoded
    batch: int = 32  # images classified together at most
    wait_ms: float = 10.0  # how long the first image of a batch waits for others


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Anywhere but loopback needs a token: a model behind an open port answers whoever finds it."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"refusing to listen on {host} without a token: give --token (or FEATX_TOKEN), which "
                          "every request must then carry, or serve on 127.0.0.1")


class MicroBatcher:
    """Images of concurrent requests classified in one call of the predictor, on one worker thread."""

    def __init__(self, predictor: Predictor, limits: ServeLimits):
        self.predictor, self.limits = predictor, limits
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="featx-serve")  # the model is used by one at a time
        self.ids = itertools.count()

    async def classify(self, uploads: list, score: str) -> list:
        """Predictions for ``uploads`` (name, bytes), in their order, every class ranked."""
        if not uploads:
            return []
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((uploads, score, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            deadline = loop.time() + self.limits.wait_ms / 1000
            while sum(len(w[0]) for w in waiting) < self.limits.batch and (left := deadline - loop.time()) > 0:
                try:
                    waiting.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            for score in dict.fromkeys(w[1] for w in waiting):
                await self._classify_together([w for w in waiting if w[1] == score], score)

    async def _classify_together(self, waiting: list, score: str) -> None:
        # Names unique across the requests of the batch; each request gets its own names back.
        keyed = [[(f"{next(self.ids)}", data) for _, data in uploads] for uploads, _, _ in waiting]
        flat = [item for items in keyed for item in items]
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self.worker, lambda: self.predictor.classify(flat, len(self.predictor.classes), len(flat), score))
        except Exception as err:  # a failure of the model fails the requests of this batch, not the server
            for _, _, future in waiting:
                future.set_exception(err)
            return
        by_key = {p.path: p for p in found}
        for (uploads, _, future), items in zip(waiting, keyed):
            future.set_result([replace(by_key[key], path=name) for (name, _), (key, _) in zip(uploads, items)])


def open_predictor(run: str | Path, *, score: str, trust: bool, adapt_to: list | None,
                   limits: ServeLimits) -> Predictor:
    """The run's predictor, refused where serving could not give the leaderboard's answers image by image."""
    predictor = Predictor(run, score=score, trust=trust, adapt_to=adapt_to)
    reason = not_reproducible([step["name"] for step in predictor.steps])
    if reason:
        raise ConfigError(f"{run}: cannot serve this run image by image ({reason}); compare it without that option")
    if any(b.adapts_bn for b in predictor.backbones) and not adapt_to:
        raise ConfigError(f"{run}: its features were embedded with BatchNorm statistics of their own images "
                          "(--adapt-bn): give --adapt-to FOLDER, unlabelled images of the domain to serve")
    for backbone in predictor.backbones:
        backbone.preprocess = replace(backbone.preprocess,
                                      max_pixels=min(backbone.preprocess.max_pixels, limits.max_pixels))
        backbone.model(predictor.adapt_to or [])  # built now: the first request does not wait for it
    return predictor


def describe_model(run: str | Path, predictor: Predictor) -> dict:
    """Where the served head comes from: what ``GET /model`` and the page's "About this model" show."""
    described = {"featx_version": __version__, "head": predictor.head["head"], "classes": predictor.classes,
                 "backbones": [b.meta.get("label") or b.meta["backbone"] for b in predictor.backbones],
                 "decision_threshold": predictor.head.get("threshold"), "unknown_score": predictor.score,
                 "unknown_threshold": predictor.open_set.thresholds[predictor.score] if predictor.open_set else None,
                 "remedies": [step["name"] for step in predictor.steps]}
    folder = Path(run)
    if (folder / RUN_FILE).exists():
        loaded = load_run(folder)
        best = loaded.rows[0]
        shift = (loaded.info["config"].get("shift") or {}).get(best["file"]) or {}
        described.update(
            trained=loaded.info["created"], input=best["file"],
            validation={k[4:]: v for k, v in best.items() if k.startswith("val_") and k != "val_source"},
            test={k[5:]: v for k, v in best.items() if k.startswith("test_") and not isinstance(v, (dict, list))},
            shift_warning=("the test images differ from the training ones (shift test): expect lower accuracy on "
                           "new images like them than the validation figures" if shift.get("shifted") else None))
    return described


def create_app(run: str | Path, *, score: str = "knn", trust: bool = False, adapt_to: list | None = None,
               limits: ServeLimits = ServeLimits(), token: str | None = None):
    """The FastAPI application serving ``run`` (a run folder or its ``best/``); the model is loaded here, once."""
    try:
        from fastapi import FastAPI, File, Query, Request, UploadFile
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError as err:
        raise ConfigError(f"featx serve needs its extra ({err.name} is missing): pip install 'featx[serve]'") from None

    predictor = open_predictor(run, score=score, trust=trust, adapt_to=adapt_to, limits=limits)
    batcher = MicroBatcher(predictor, limits)
    model = describe_model(run, predictor)
    page = resources.files("featx.use").joinpath("page.html").read_text(encoding="utf-8")
    app = FastAPI(title="featx", version=__version__,
                  description=f"{model['head']} on {', '.join(model['backbones'])}: {', '.join(model['classes'])}")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path not in ("/", "/health"):  # the page asks for it; health is bare
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a token is required (Authorization: Bearer <token>)"}, 401)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_files * (limits.max_bytes + 4096):
            return JSONResponse({"detail": f"request over {limits.max_files} files of {limits.max_bytes} bytes"}, 413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "featx_version": __version__}

    @app.get("/model")
    async def about():
        return model

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(..., description="one or several images"),
                      top_k: int = Query(3, ge=1),
                      score: str = Query(predictor.score, pattern="^(knn|centroid|max_prob)$")):
        """The same JSON as ``featx predict --json`` for the same files, with a ``status`` per file."""
        if len(files) > limits.max_files:
            return JSONResponse({"detail": f"{len(files)} files; at most {limits.max_files} a request"}, 413)
        uploads, refused = [], {}
        for k, upload in enumerate(files):
            name = upload.filename or f"file{k + 1}"
            data = await upload.read(limits.max_bytes + 1)
            if len(data) > limits.max_bytes:
                refused[k] = Prediction(name, None, [], error=f"over the upload cap of {limits.max_bytes} bytes")
            uploads.append((name, data))
        found = await batcher.classify([u for k, u in enumerate(uploads) if k not in refused], score)
        answers = iter(found)
        results = [refused[k] if k in refused else next(answers) for k in range(len(uploads))]
        body = [{**r.as_dict(), "top_k": r.as_dict()["top_k"][:top_k], "status": "error" if r.error else "ok"}
                for r in results]
        if all(r.error for r in results):
            return JSONResponse({"detail": "no file could be read as an image", "predictions": body}, 422)
        return body

    return app


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, **options) -> None:
    """Serve ``run`` until interrupted."""
    import uvicorn

    check_exposure(host, token)
    app = create_app(run, token=token, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning")
