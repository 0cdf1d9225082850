"""``ddpm demo``: the page's pixels equal the command line's, editing keeps what the mask keeps, and bad input
is answered with one visible line while the page keeps serving (driven in headless Chromium with Selenium)."""

import io
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ddpmlab.cli import main
from ddpmlab.data import build_dataset, to_uint8
from ddpmlab.demo import INSTALL_HINT, Limits, Runs, import_gradio, serve
from ddpmlab.demo import actions as act
from ddpmlab.demo.app import DEFAULT_SCHEDULE
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import load_run_config
from ddpmlab.runs import resolve_device

TINY = ["model.num_classes=null", "train.steps=4", "train.batch_size=8", "unet.base_channels=8", "unet.norm_groups=4",
        "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.sample_n=4",
        "train.sample_steps=2", "train.log_every=2"]
TOY = ["train.steps=4", "train.batch_size=64", "train.sample_n=16", "train.sample_steps=2", "train.log_every=2"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_runs")
    assert main(["train", "--config", "mnist", "data.dataset=digits", f"train.out_dir={root}", "train.name=img",
                 "--no-progress", *TINY]) == 0
    assert main(["train", "--config", "toy2d", f"train.out_dir={root}", "train.name=toy", "--no-progress", *TOY]) == 0
    return root


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


# ------------------------------------------------------------------------------ without a browser

def test_without_gradio_serving_says_what_to_install(monkeypatch, capsys, runs_root):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(DDPMError, match=r"pip install 'ddpmlab\[demo\]'"):
        import_gradio()
    assert main(["demo", str(runs_root / "img"), "--port", "7999"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddpm demo: error: ddpm demo needs Gradio, which is not installed: {INSTALL_HINT}"


def test_tab_actions_write_what_the_cli_writes(runs_root, tmp_path):
    runs = Runs([runs_root / "img", runs_root / "toy"], resolve_device("cpu"), tmp_path / "out")
    img, toy = (str(runs_root / n) for n in ("img", "toy"))
    # images: grid, single PNGs and .npz equal `ddpm sample --out FOLDER/ --npz`
    res = act.sample(runs, img, sampler="dpmpp_2m", steps=4, step_schedule="karras", seed=3, n=5)
    assert main(["sample", img, "--sampler", "dpmpp_2m", "--steps", "4", "--step-schedule", "karras", "--seed", "3",
                 "--n", "5", "--out", f"{tmp_path / 'cli'}/", "--npz", "--no-progress"]) == 0
    assert np.array_equal(_png(res.picture), _png(tmp_path / "cli" / "grid.png"))
    assert [p.name for p in res.files] == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.load(res.npz)["samples"], np.load(tmp_path / "cli" / "samples.npz")["samples"])
    # a 2-D toy run: the scatter plot of `ddpm sample` (same bytes), no per-sample PNGs
    res = act.sample(runs, toy, sampler="ddim", steps=3, seed=1, n=200)
    assert main(["sample", toy, "--sampler", "ddim", "--steps", "3", "--seed", "1", "--n", "200",
                 "--out", str(tmp_path / "toy.png"), "--no-progress"]) == 0
    assert res.files == [] and res.picture.read_bytes() == (tmp_path / "toy.png").read_bytes()
    with pytest.raises(DDPMError, match="works on image models"):
        act.training_image(runs, toy, 0)
    # limits and unconditional runs are refused in one line before any sampling
    with pytest.raises(DDPMError, match=r"n = 65 samples is more than this page serves \(at most 64: --max-samples"):
        act.sample(runs, img, n=65, limits=Limits(64, 100))
    with pytest.raises(DDPMError, match=r"steps = 101 is more than .* --max-steps"):
        act.sample(runs, img, steps=101, n=2, limits=Limits(64, 100))
    with pytest.raises(DDPMError, match="guidance scale needs a class-conditional run"):
        act.sample(runs, img, steps=2, n=2, guidance=2.0)
    # compare: the same noise through two samplers; side A is the Sample tab's picture for those settings
    (pa, ca), (pb, cb) = act.compare(runs, img, ("ddim", 3), ("dpmpp_2m", 4), seed=2, n=4)
    assert np.array_equal(_png(pa), _png(act.sample(runs, img, sampler="ddim", steps=3, seed=2, n=4).picture))
    assert ca.startswith("ddim, 3 steps: NFE 3") and cb.startswith("dpmpp_2m, 4 steps: NFE 4")
    # reverse process: the stills and the GIF of `ddpm viz reverse --n 1`
    strip, gif = act.reverse(runs, img, steps=4, frames=3, seed=1)
    assert main(["viz", "reverse", img, "--n", "1", "--steps", "4", "--frames", "3", "--seed", "1", "--out",
                 str(tmp_path / "viz")]) == 0
    assert gif.read_bytes() == (tmp_path / "viz" / gif.name).read_bytes()
    assert np.array_equal(_png(strip), _png(tmp_path / "viz" / strip.name))
    strip, gif = act.reverse(runs, toy, steps=3, frames=2, n=300)
    assert strip.name == "toy_reverse.png" and gif.suffix == ".gif"
    # inpaint and img2img: the rows `ddpm inpaint` / `ddpm img2img` write
    image = act.training_image(runs, img, 3)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.kron(np.eye(2, dtype=np.uint8), np.full((4, 4), 255, np.uint8))).save(mask)
    res = act.inpaint_image(runs, img, image, mask_file=mask, n=2, steps=6, jump_length=2, jump_n_sample=2, seed=4)
    assert main(["inpaint", img, "--image", str(image), "--mask", str(mask), "--n", "2", "--steps", "6",
                 "--jump-length", "2", "--jump-n-sample", "2", "--seed", "4", "--out", str(tmp_path / "ip.png"),
                 "--no-progress"]) == 0
    assert np.array_equal(_png(res.picture), _png(tmp_path / "ip.png"))
    res = act.img2img_image(runs, img, image, strength=0.2, sampler="ddim", steps=3, n=2, seed=4)
    assert main(["img2img", img, "--image", str(image), "--strength", "0.2", "--sampler", "ddim", "--steps", "3",
                 "--n", "2", "--seed", "4", "--out", str(tmp_path / "i2i.png"), "--no-progress"]) == 0
    assert np.array_equal(_png(res.picture), _png(tmp_path / "i2i.png"))
    # the run tab: loaded checkpoint, loss curve from log.csv, the config
    text, loss, config = act.run_info(runs, img)
    assert "ema weights of step_0000004" in text and loss.is_file() and "num_timesteps: 1000" in config


def test_mask_from_brush_strokes_keeps_half_covered_blocks():
    layer = np.zeros((16, 24, 4), np.uint8)  # a 2x3 image enlarged 8x
    layer[0:8, 8:14, 3] = 255  # 6/8 of block (0, 1)
    layer[8:16, 16:19, 3] = 255  # 3/8 of block (1, 2)
    mask = act.mask_from_layers([layer], (2, 3), 8)
    assert mask.tolist() == [[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]
    assert act.mask_from_layers([np.zeros((16, 24, 4), np.uint8)], (2, 3), 8) is None
    with pytest.raises(DDPMError, match="the drawn mask is 20x16 pixels but the editor's image is 24x16"):
        act.mask_from_layers([np.zeros((16, 20, 4), np.uint8)], (2, 3), 8)


def test_the_page_samples_as_the_run_says_through_its_api(runs_root, tmp_path):
    """The Sample tab as it opens (no sampler, no steps): the pixels of `ddpm sample RUN` (no browser needed)."""
    try:
        import_gradio()
        from gradio_client import Client
    except (DDPMError, ImportError):
        pytest.skip(f"gradio is not installed ({INSTALL_HINT})")
    from ddpmlab.demo.app import RUN_SAMPLER

    img, port = str(runs_root / "img"), _free_port()
    app = serve([img], port=port, device="cpu", out_root=tmp_path / "page", block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        text, picture, _ = client.predict(img, "ema", RUN_SAMPLER, None, DEFAULT_SCHEDULE, 2, 3, None, None,
                                          api_name="/sample")
        with pytest.raises(Exception, match=r"steps must be between 1 and 1000 \(the model's num_timesteps\), got 0"):
            client.predict(img, "ema", RUN_SAMPLER, 0, DEFAULT_SCHEDULE, 2, 3, None, None, api_name="/sample")
    finally:
        app.close()
    assert text.startswith("3 samples: dpmpp_2m_sde, 2 steps")  # the run's train.sample_sampler and sample_steps
    assert main(["sample", img, "--n", "3", "--seed", "2", "--out", str(tmp_path / "cli.png"), "--no-progress"]) == 0
    assert np.array_equal(_png(picture), _png(tmp_path / "cli.png"))


# ------------------------------------------------------------------------------ hostile requests

def test_repaint_jumps_and_snapshots_are_bounded_in_one_line_and_the_next_request_works(runs_root, tmp_path,
                                                                                        monkeypatch):
    """RePaint's resampling jumps count as the steps they repeat (within --max-steps), snapshots within
    max_frames: a huge request is refused before anything is built or sampled, then a good one is served."""
    runs = Runs([runs_root / "img", runs_root / "toy"], resolve_device("cpu"), tmp_path / "out")
    img, toy, limits = str(runs_root / "img"), str(runs_root / "toy"), Limits(64, 200)
    drawn, drawing = [], act.draw_inpainting

    def draw(run, plan, *args, **kwargs):
        drawn.append(plan.options["jump_n_sample"])
        assert plan.options["jump_n_sample"] < 100, "a refused request began to sample"
        return drawing(run, plan, *args, **kwargs)

    monkeypatch.setattr(act, "draw_inpainting", draw)
    image, mask = act.training_image(runs, img, 0), tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    with pytest.raises(DDPMError, match=r"^RePaint with 50 steps, jump length 10 and jump n sample 10000000 takes "
                                        r"400000010 network evaluations, more than this page serves \(at most 200, "
                                        r"set by ddpm demo --max-steps\); ask for fewer steps or jumps$"):
        act.inpaint_image(runs, img, image, mask_file=mask, n=1, steps=50, jump_length=10, jump_n_sample=10**7,
                          limits=limits)
    res = act.inpaint_image(runs, img, image, mask_file=mask, n=1, steps=6, jump_length=2, jump_n_sample=2,
                            limits=limits)
    assert drawn == [2] and "1 inpaintings (RePaint, 6 steps, jumps 2 x 2" in res.text
    shown = []
    monkeypatch.setattr(act.viz, "viz_toy", lambda *a: shown.append(a[5]) or [None, None, "still", "gif"])
    with pytest.raises(DDPMError, match=r"^snapshots = 1000000000 is more than this page serves \(at most 100\)"):
        act.reverse(runs, toy, steps=3, frames=10**9, limits=limits)
    assert act.reverse(runs, toy, steps=3, frames=100, n=50, limits=limits) == ["still", "gif"] and shown == [100]


def test_use_a_training_image_decodes_that_one_file_not_the_folder(runs_root, tmp_path, monkeypatch):
    from PIL import ImageFile

    from ddpmlab.config import load_config

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    cfg = load_config(None, ["data.dataset=folder", f"data.path={folder}", "data.image_size=[8,8]", "data.channels=1"])
    runs = Runs([runs_root / "img"], resolve_device("cpu"), tmp_path / "out")
    monkeypatch.setattr(runs, "get", lambda *_: SimpleNamespace(is_image=True, cfg=cfg, dir="photos"))
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im, *a: decoded.append(im.filename) or load(im, *a))
    png = act.training_image(runs, "photos", 4)
    assert set(decoded) == {str(folder / "4.png")} and np.all(_png(png) == 160)
    with pytest.raises(DDPMError, match=r"training image 6 does not exist: the run's data has 6 images \(0..5\)"):
        act.training_image(runs, "photos", 6)


def test_the_page_writes_to_a_fresh_folder_and_keeps_the_newest_requests(runs_root, tmp_path):
    out = tmp_path / "runs"  # --out runs: a folder that already holds other things
    (out / "r1").mkdir(parents=True)
    (out / "r1" / "secret.txt").write_text("not for the page")
    runs = Runs([runs_root / "img"], resolve_device("cpu"), out, 3)
    assert runs.out_root.parent == out and runs.out_root.name.startswith("ddpm-demo-")
    assert list(runs.out_root.iterdir()) == []
    folders = [runs.new_folder("x") for _ in range(5)]
    assert sorted(runs.out_root.iterdir()) == folders[2:]  # the newest 3
    for _ in range(3):  # page loads draw the loss curve once while log.csv stays as it is
        text, loss, _ = act.run_info(runs, str(runs_root / "img"))
    assert loss.is_file() and len(list(runs.out_root.iterdir())) == 3 and loss.parent not in folders
    with pytest.raises(DDPMError, match="--keep-requests must be at least 1, got 0"):
        Runs([runs_root / "img"], resolve_device("cpu"), out, 0)


def test_a_page_on_the_network_without_auth_is_warned_of():
    from ddpmlab.demo.app import host_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert host_warning(host, None) is None
    for host in ("0.0.0.0", "192.168.1.5", "my-box"):
        warning = host_warning(host, None)
        assert warning.startswith(f"warning: ddpm demo listens on {host} without --auth") and "\n" not in warning
        assert host_warning(host, ("u", "p")) is None
    with pytest.raises(SystemExit):
        main(["demo", str(Path("run")), "--auth", "nopassword"])


def _post_upload(url: str, size: int) -> int:
    """The HTTP status of uploading a file of ``size`` bytes to the page, as its file fields do."""
    boundary = "ddpmlab-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_served_page_offers_only_its_own_pictures_bounds_uploads_and_asks_for_a_login(runs_root, tmp_path):
    try:
        import_gradio()
        from gradio_client import Client
    except (DDPMError, ImportError):
        pytest.skip(f"gradio is not installed ({INSTALL_HINT})")
    from ddpmlab.demo.app import RUN_SAMPLER

    img, out = str(runs_root / "img"), tmp_path / "runs"
    (out / "r1").mkdir(parents=True)
    (out / "r1" / "secret.txt").write_text("not for the page")
    port = _free_port()
    app = serve([img], port=port, device="cpu", out_root=out, block=False, quiet=True, max_upload_mb=1)
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"{url}/gradio_api/file={out / 'r1' / 'secret.txt'}", timeout=30)
        assert _post_upload(url, 2 * 2**20) == 413 and _post_upload(url, 1000) == 200
        picture = Client(url, verbose=False).predict(img, "ema", RUN_SAMPLER, 2, DEFAULT_SCHEDULE, 0, 1, None, None,
                                                     api_name="/sample")[1]
        assert Path(picture).is_file()
    finally:
        app.close()
    port = _free_port()
    app = serve([img], port=port, device="cpu", block=False, quiet=True, auth=("ada", "s3cret"))
    url = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False)
        text = Client(url, auth=("ada", "s3cret"), verbose=False).predict(
            img, "ema", RUN_SAMPLER, 2, DEFAULT_SCHEDULE, 0, 1, None, None, api_name="/sample")[0]
        assert text.startswith("1 samples: dpmpp_2m_sde, 2 steps")
    finally:
        app.close()


# ------------------------------------------------------------------------------ in the browser

def _browser():
    """A headless Chromium driven by the system chromedriver, or pytest.skip naming what is missing."""
    try:
        import_gradio()
    except DDPMError:
        pytest.skip(f"gradio is not installed ({INSTALL_HINT})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(a)
    opts.binary_location = chrome
    return webdriver.Chrome(service=Service(driver), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(runs_root, tmp_path_factory):
    browser = _browser()
    port = _free_port()
    app = serve([runs_root / "img", runs_root / "toy"], port=port, max_samples=64, max_steps=200, device="cpu",
                out_root=tmp_path_factory.mktemp("demo_out"), block=False, quiet=True)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(browser, lambda: _by(browser, "#s-go"))
        yield browser, f"http://127.0.0.1:{port}"
    finally:
        browser.quit()
        app.close()


def _wait(browser, cond, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except Exception:  # the page is re-rendering
            pass
        time.sleep(0.2)
    shot = Path(tempfile.mkdtemp(prefix="ddpm-demo-")) / "failure.png"  # a fresh temporary folder
    browser.save_screenshot(str(shot))
    raise AssertionError(f"the page did not get there in time (screenshot: {shot})")


def _by(browser, css):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, css)


def _text(browser, elem_id) -> str:
    return " ".join(e.get_attribute("textContent") or "" for e in _by(browser, f"#{elem_id}"))


def _type(browser, elem_id, value) -> None:
    box = _by(browser, f"#{elem_id} input")[0]
    box.clear()
    box.send_keys(str(value))


def _tab(browser, name) -> None:
    [t for t in _by(browser, "[role='tab']") if name in t.text][0].click()
    time.sleep(0.3)


def _src(browser, elem_id) -> str:
    imgs = _by(browser, f"#{elem_id} img")
    return imgs[0].get_attribute("src") if imgs else ""


def _fetch(url) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as r:
        return np.array(Image.open(io.BytesIO(r.read())))


def _expect_error(browser, click_id, needle) -> None:
    """Clicking ``click_id`` shows an error toast whose message is one line containing ``needle``; closed after."""
    if click_id:
        _by(browser, f"#{click_id}")[0].click()
    messages = []

    def shown():
        messages[:] = [t.text.split("\n") for t in _by(browser, "[data-testid='toast-body']")]
        return any(needle in " ".join(m) for m in messages)

    _wait(browser, shown, 20)
    body = next(m for m in messages if needle in " ".join(m))
    assert body[0] == "Error" and len([line for line in body[1:] if line.strip() not in ("", "×")]) == 1, body
    for close in _by(browser, ".toast-close"):
        close.click()
    _wait(browser, lambda: not _by(browser, "[data-testid='toast-body']"), 10)


def _tiles(row: np.ndarray, k: int, size: int = 8, scale: int = 4, pad: int = 2) -> np.ndarray:
    """The k tiles (k, size, size) of a one-row grid written by save_grid(nrow=k, scale=scale)."""
    y = pad * scale
    return np.stack([row[y:y + size * scale:scale, x:x + size * scale:scale]
                     for x in ((pad + i * (size + pad)) * scale for i in range(k))])


@pytest.mark.slow
def test_page_samples_what_the_cli_samples_and_survives_bad_input(page, runs_root, tmp_path):
    browser, url = page
    run = runs_root / "img"
    # Sample: the image shown has the pixels of `ddpm sample` with the same settings and seed
    _type(browser, "s-steps", 3)
    _type(browser, "s-n", 6)
    _type(browser, "s-seed", 5)
    _by(browser, "#s-go")[0].click()
    # no sampler named: as the run samples (its train.sample_sampler), as `ddpm sample` without --sampler
    _wait(browser, lambda: "6 samples: dpmpp_2m_sde, 3 steps" in _text(browser, "s-text") and _src(browser, "s-grid"))
    shown = _fetch(_src(browser, "s-grid"))
    assert main(["sample", str(run), "--n", "6", "--steps", "3", "--seed", "5",
                 "--out", str(tmp_path / "cli.png"), "--no-progress"]) == 0
    assert np.array_equal(shown, _png(tmp_path / "cli.png"))
    assert len(_by(browser, "#s-files a")) >= 7  # 6 PNGs and samples.npz to download
    # bad requests: one visible line each, and the page keeps serving
    _type(browser, "s-steps", 0)
    _expect_error(browser, "s-go", "steps must be between 1 and 1000 (the model's num_timesteps), got 0")
    _type(browser, "s-steps", 3)
    _type(browser, "s-n", 100000)
    _expect_error(browser, "s-go", "n = 100000 samples is more than this page serves (at most 64: --max-samples 64)"
                  "; ask for fewer")
    _type(browser, "s-n", 2)
    _by(browser, "#s-go")[0].click()
    _wait(browser, lambda: "2 samples: dpmpp_2m_sde, 3 steps" in _text(browser, "s-text"))

    # Inpaint: a training image, a brush stroke on the canvas; the kept pixels equal the input
    _tab(browser, "Inpaint")
    _by(browser, "#e-pick")[0].click()
    _wait(browser, lambda: any(c.size["width"] > 100 for c in _by(browser, "#e-editor canvas")))
    time.sleep(0.5)
    _draw(browser)
    _type(browser, "e-steps", 5)
    _type(browser, "e-n", 2)
    _by(browser, "#e-inpaint")[0].click()
    _wait(browser, lambda: "2 inpaintings" in _text(browser, "e-text") and _src(browser, "e-row"))
    tiles = _tiles(_fetch(_src(browser, "e-row")), 4)  # input, mask, 2 results
    data = build_dataset(load_run_config(run))
    assert np.array_equal(tiles[0], to_uint8(data[0][0][None])[0, :, :, 0])
    keep = tiles[1] == 0
    assert 0 < (~keep).sum() < keep.sum() and set(np.unique(tiles[1])) == {0, 255}
    assert all(np.array_equal(r[keep], tiles[0][keep]) for r in tiles[2:])

    # bad uploads: a file that is no image, a mask of another size; then a valid request succeeds
    (tmp_path / "notes.txt").write_text("not a picture")
    _by(browser, "#e-upload input[type=file]")[0].send_keys(str(tmp_path / "notes.txt"))
    _expect_error(browser, None, "is not a readable image")
    Image.new("L", (5, 5), 255).save(tmp_path / "mask5.png")
    _by(browser, "#e-mask input[type=file]")[0].send_keys(str(tmp_path / "mask5.png"))
    time.sleep(1.0)
    _expect_error(browser, "e-inpaint", "is 5x5 pixels but the model's images are 8x8")
    _type(browser, "e-n", 1)
    Image.new("L", (8, 8), 255).save(tmp_path / "mask8.png")
    _clear_file(browser, "e-mask")
    _by(browser, "#e-mask input[type=file]")[0].send_keys(str(tmp_path / "mask8.png"))
    time.sleep(1.0)
    _by(browser, "#e-inpaint")[0].click()
    _wait(browser, lambda: "1 inpaintings" in _text(browser, "e-text"))

    # the run picker: the 2-D toy run samples a scatter plot, the PNG `ddpm sample` writes; no class fields
    _pick_run(browser, "toy")
    _tab(browser, "Run")
    _wait(browser, lambda: "mlp model on toy (2-D points" in _text(browser, "i-text"))
    _tab(browser, "Sample")
    assert not _by(browser, "#s-guidance input")
    _type(browser, "s-n", 300)
    _by(browser, "#s-go")[0].click()
    _wait(browser, lambda: "300 samples: ddpm, 3 steps" in _text(browser, "s-text"))
    assert main(["sample", str(runs_root / "toy"), "--n", "300", "--steps", "3", "--seed", "5",
                 "--out", str(tmp_path / "toy.png"), "--no-progress"]) == 0
    with urllib.request.urlopen(_src(browser, "s-grid"), timeout=30) as r:
        assert r.read() == (tmp_path / "toy.png").read_bytes()

    # a guidance scale on an unconditional run (the page hides the field; the API still refuses it)
    from gradio_client import Client

    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="guidance scale needs a class-conditional run"):
        client.predict(str(run), "ema", "ddim", 3, DEFAULT_SCHEDULE, 0, 2, None, 2.0, api_name="/sample")
    out = client.predict(str(run), "ema", "ddim", 3, DEFAULT_SCHEDULE, 0, 2, None, None, api_name="/sample")
    assert out[0].startswith("2 samples: ddim, 3 steps")


def _draw(browser) -> None:
    """A brush stroke across the middle of the mask editor's canvas."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = max(_by(browser, "#e-editor canvas"), key=lambda c: c.size["width"])
    ActionChains(browser).move_to_element_with_offset(canvas, -30, -30).click_and_hold() \
        .move_by_offset(20, 0).move_by_offset(20, 20).move_by_offset(20, 20).release().perform()
    time.sleep(0.5)


def _pick_run(browser, name: str) -> None:
    """Choose the run whose folder name is ``name`` in the run picker (a Gradio dropdown)."""
    _by(browser, "#run input")[0].click()
    _wait(browser, lambda: [o for o in _by(browser, "[role=option]") if o.text.endswith(f"/{name}")], 10)
    [o for o in _by(browser, "[role=option]") if o.text.endswith(f"/{name}")][0].click()


def _clear_file(browser, elem_id) -> None:
    buttons = [b for b in _by(browser, f"#{elem_id} button")
               if (b.get_attribute("aria-label") or "").lower() in ("clear", "remove", "close")]
    for b in buttons:
        b.click()
    time.sleep(0.5)
