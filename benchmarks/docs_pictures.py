"""Make the pictures of docs/ from real runs (the test suite never writes them).

    python benchmarks/docs_pictures.py --run RUN --toy-run TOY_RUN            # everything, into docs/
    python benchmarks/docs_pictures.py --run RUN --only demo --out /tmp/pics  # one kind, elsewhere

RUN is the default MNIST run (``ddpm train``), TOY_RUN the 2-D run (``ddpm train --config toy2d``).
The kinds (``--only``, comma-separated; default all):

  samples   mnist_samples.png, toy2d_samples.png: the runs' own final samples (RUN/samples/final.png)
  viz       forward.png, reverse_ddpm250.gif, schedules.png, toy_diffusion.gif, loss.png: the
            ``ddpm viz`` calls the docs show (forward --n 3; reverse --sampler ddpm --steps 250
            --frames 10 --seed 1 --n 4; schedules; toy --n 1000 --frames 12; loss)
  demo      demo.png: ``ddpm demo RUN`` in headless Chromium, the Inpaint tab after RePaint filled a
            brush stroke across a training digit (needs gradio and selenium, ``bash install.sh
            --test``, and chromium + chromedriver on the PATH)

Each picture is made in a temporary folder and copied to ``--out`` under the name the docs use.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from ddpmlab.cli import main as ddpm

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("samples", "viz", "demo")


def samples(run: Path, toy_run: Path | None, work: Path) -> dict[str, Path]:
    """The runs' final sample grids, as drawn at the end of training."""
    out = {"mnist_samples.png": run / "samples" / "final.png"}
    if toy_run is not None:
        out["toy2d_samples.png"] = toy_run / "samples" / "final.png"
    missing = [str(p) for p in out.values() if not p.is_file()]
    if missing:
        sys.exit(f"docs_pictures: no final samples at {', '.join(missing)}; let the run finish first")
    return out


def viz(run: Path, toy_run: Path | None, work: Path) -> dict[str, Path]:
    """The ``ddpm viz`` pictures of the guides, each from one command line."""
    calls = {
        "forward.png": ["forward", str(run), "--n", "3"],
        "reverse_ddpm250.gif": ["reverse", str(run), "--n", "4", "--sampler", "ddpm", "--steps", "250",
                                "--frames", "10", "--seed", "1"],
        "schedules.png": ["schedules"],
        "loss.png": ["loss", str(run)],
    }
    if toy_run is not None:
        calls["toy_diffusion.gif"] = ["toy", str(toy_run), "--n", "1000", "--frames", "12"]
    out = {}
    for name, args in calls.items():
        folder = work / name.split(".")[0]
        if ddpm(["viz", *args, "--out", str(folder)]) != 0:
            sys.exit(f"docs_pictures: `ddpm viz {' '.join(args)}` failed (its message is above)")
        out[name] = folder / name
    return out


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        sys.exit("docs_pictures: the demo picture needs chromium and chromedriver on the PATH "
                 "(apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(a)
    opts.binary_location = chrome
    return webdriver.Chrome(service=Service(driver), options=opts)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except Exception:  # the page is re-rendering
            pass
        time.sleep(0.5)
    sys.exit(f"docs_pictures: the demo page did not {what} within {timeout:.0f} s")


def demo(run: Path, toy_run: Path | None, work: Path, steps: int = 50, timeout: float = 900.0) -> dict[str, Path]:
    """A screenshot of the Inpaint tab after RePaint filled a brush stroke across training digit 0."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from ddpmlab.demo import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serve([run], port=port, device="cpu", out_root=work / "demo_out", block=False, quiet=True)
    browser = _browser()
    find = lambda css: browser.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(lambda: find("#s-go"), 60, "load")
        [t for t in find("[role='tab']") if "Inpaint" in t.text][0].click()
        find("#e-pick")[0].click()
        _wait(lambda: any(c.size["width"] > 100 for c in find("#e-editor canvas")), 60, "show the training image")
        time.sleep(0.5)
        canvas = max(find("#e-editor canvas"), key=lambda c: c.size["width"])
        ActionChains(browser).move_to_element_with_offset(canvas, -40, -20).click_and_hold() \
            .move_by_offset(30, 10).move_by_offset(30, 10).move_by_offset(20, 10).release().perform()
        box = find("#e-steps input")[0]
        box.clear()
        box.send_keys(str(steps))
        find("#e-inpaint")[0].click()
        _wait(lambda: "inpaintings" in find("#e-text")[0].get_attribute("textContent") and find("#e-row img"),
              timeout, "finish inpainting")
        time.sleep(1.0)
        path = work / "demo.png"
        browser.save_screenshot(str(path))
    finally:
        browser.quit()
        app.close()
    return {"demo.png": path}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the default MNIST run (ddpm train)")
    p.add_argument("--toy-run", type=Path, help="the 2-D run (ddpm train --config toy2d); without it its pictures "
                   "are left as they are")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder the pictures go to (default: docs/)")
    p.add_argument("--only", default=",".join(KINDS), help=f"comma-separated kinds: {', '.join(KINDS)}")
    args = p.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        sys.exit(f"docs_pictures: unknown kind(s) {', '.join(bad)} in --only; choose from {', '.join(KINDS)}")
    makers = {"samples": samples, "viz": viz, "demo": demo}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="docs_pictures_") as tmp:
        for kind in kinds:
            for name, made in makers[kind](args.run, args.toy_run, Path(tmp)).items():
                shutil.copyfile(made, args.out / name)
                print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
