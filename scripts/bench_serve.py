"""`featx serve` under load, beside `featx predict`'s batch throughput on the same images, in one run.

Starts the server on a free loopback port, sends a bounded number of one-image requests at each concurrency
(by default 1, 8 and 32 clients), and prints requests/s, p50/p95/p99 latency and errors; then classifies the
same images with `Predictor.predict` in batches and prints images/s; then stops. Talks to 127.0.0.1 only.

Usage: python scripts/bench_serve.py [RUN] [--requests 2000] [--clients 1,8,32] [--docs docs/results/serve.md]
       (without RUN: the bundled chest X-ray sample with efficientnet_lite0, extracted and compared first)
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click


def sample_run(folder: Path) -> Path:
    from featx.comparison.evaluate import compare
    from featx.comparison.runs import save_run
    from featx.data.sample import sample_path
    from featx.embed.extraction import ExtractConfig, extract

    made = extract(sample_path(), ExtractConfig(cache_dir=str(folder / "cache")), progress=False)
    return save_run(compare([made.path], ["logreg"]), folder / "run")


async def load(port: int, images: list[bytes], requests: int, clients: int) -> tuple[list[float], int, float]:
    """Latencies (s) of ``requests`` one-image requests from ``clients`` concurrent clients, errors, wall time."""
    import httpx

    latencies, errors, sent = [], 0, iter(range(requests))

    async def client(http):
        nonlocal errors
        for k in sent:
            began = time.perf_counter()
            try:
                answer = await http.post("/predict", files=[("files", (f"{k}.jpeg", images[k % len(images)]))])
                errors += answer.status_code != 200
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - began)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, errors, time.perf_counter() - began


@click.command()
@click.argument("run", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--requests", default=2000, show_default=True, type=click.IntRange(1, 100_000),
              help="Requests per concurrency level.")
@click.option("--clients", default="1,8,32", show_default=True, help="Concurrency levels, comma-separated.")
@click.option("--batch", default=32, show_default=True, help="The server's --batch.")
@click.option("--wait-ms", default=10.0, show_default=True, help="The server's --wait-ms.")
@click.option("--docs", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table, with the command and the machine, to this markdown file.")
def main(run, requests, clients, batch, wait_ms, docs):
    import uvicorn

    from featx.data.sample import sample_path
    from featx.embed.hardware import cpu_model
    from featx.use.predict import Predictor
    from featx.use.serve import ServeLimits, create_app

    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    run = run or sample_run(scratch)
    files = sorted((sample_path() / "test").rglob("*.jpeg"))
    images = [p.read_bytes() for p in files]
    print(f"CPU: {cpu_model()}; run {run}; {len(files)} distinct images; batch {batch}, wait {wait_ms} ms")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(run, limits=ServeLimits(batch=batch, wait_ms=wait_ms))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    rows = []
    try:
        asyncio.run(load(port, images, min(requests, 20), 1))  # warm-up
        for concurrency in (int(c) for c in clients.split(",")):
            latencies, errors, wall = asyncio.run(load(port, images, requests, concurrency))
            q = statistics.quantiles(latencies, n=100)
            rows.append((concurrency, requests / wall, q[49], q[94], q[98], errors))
    finally:
        server.should_exit = True
        thread.join(30)

    predictor = Predictor(run)
    predictor.predict(files[:8])  # warm-up
    began = time.perf_counter()
    predictor.predict(files, batch_size=batch)
    batch_rate = len(files) / (time.perf_counter() - began)
    lines = [f"featx predict, batches of {batch}: {batch_rate:.1f} img/s", "",
             "| clients | requests/s | vs predict | p50 ms | p95 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {concurrency} | {rate:.1f} | {rate / batch_rate:.2f}× | {p50 * 1000:.0f} | {p95 * 1000:.0f} | "
              f"{p99 * 1000:.0f} | {errors} |" for concurrency, rate, p50, p95, p99, errors in rows]
    print("\n" + "\n".join(lines))
    if docs:
        command = "python scripts/bench_serve.py" + (f" {run}" if run != scratch / "run" else "") + (
            f" --requests {requests} --clients {clients} --batch {batch} --wait-ms {wait_ms:g}")
        docs.write_text(f"# featx serve under load\n\nGenerated by `{command}` on {time.strftime('%Y-%m-%d')}; do not "
                        f"edit by hand.\nMachine: {cpu_model()}, {os.cpu_count()} cores; the load generator runs on "
                        f"the same cores as the server. {requests} one-image requests per line, {len(files)} distinct "
                        "images of the bundled chest X-ray sample, efficientnet_lite0 + logreg.\n\n"
                        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
