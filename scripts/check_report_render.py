"""Render a run's report.html in headless Chromium and save a full-page screenshot to look at.

Usage: python scripts/check_report_render.py RUN_DIR [--out report.png] [--height 7000]
Needs Debian's chromium (apt-get install chromium). Prints the screenshot path and its size.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG path (default RUN_DIR/report.png).")
@click.option("--width", default=1200, show_default=True)
@click.option("--height", default=7000, show_default=True)
def main(run_dir, out, width, height):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise click.ClickException("chromium not found; apt-get install chromium")
    report = run_dir / "report.html"
    if not report.exists():
        from featx.use.report import write_report

        write_report(run_dir)
    out = out or run_dir / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out.resolve()}", report.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(out) as shot:
        blank = shot.convert("L").getextrema() == (255, 255)
    click.echo(f"{out} ({shot.size[0]}×{shot.size[1]}){'  WARNING: blank page' if blank else ''}")


if __name__ == "__main__":
    main()
