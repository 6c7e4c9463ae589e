"""`textspan explore`: the site of a toy-model store (and, slow, of a random ViT-B-16), opened
in a real browser (headless Chromium driven by Selenium): every page loads without console
errors, every link resolves, every image loads, the search box filters; screenshots of the
overview and of a head page are saved (to $TEXTSPAN_SCREENSHOTS, else the test's folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

import textspan
from textspan.cli import main
from textspan.explorer import make_server


def _install_browser() -> str | None:
    """Debian's chromium and chromium-driver, installed where missing and possible; None
    when they are there, else why not."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return "chromium and chromium-driver are missing, and apt-get cannot install them here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True)
        run = subprocess.run(install, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            return f"apt-get could not install chromium: {run.stderr[-300:]}"
    return None


@pytest.fixture(scope="session")
def browser():
    why = _install_browser()
    if why is not None:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def _toy_images(root: Path, n: int) -> Path:
    """Toy-world images in one folder per shape (so the store has labels)."""
    from textspan.toy import world as tw

    world = tw.generate(n, seed=3, size=48)
    for i, (image, shape) in enumerate(zip(world.images, world.names("shape"), strict=True)):
        (root / shape).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / shape / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explore")
    images = _toy_images(folder / "images", 240)
    store = textspan.extract(
        images,
        folder / "store",
        model="toy",
        engine=textspan.LocalEngine(workers=0, device="cpu"),
        progress=False,
    )
    argv = ["explore", str(store.path), "--out", str(folder / "site"), "--device", "cpu"]
    assert main([*argv, "--samples", "3"]) == 0
    return folder / "site"


def check_pages(driver, site: Path) -> dict[str, int]:
    """Opens every page of the site; returns how many pages, links and images it checked."""
    pages = sorted(site.rglob("*.html"))
    counts = {"pages": len(pages), "links": 0, "images": 0}
    for page in pages:
        driver.get_log("browser")  # drop what earlier pages logged
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, (page, errors)
        links = driver.execute_script("return Array.from(document.links).map(a => a.href)")
        for href in links:
            target = Path(unquote(urlparse(href).path))
            assert target.is_file(), (page, href)
        counts["links"] += len(links)
        broken = driver.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => i.src)"
        )
        assert not broken, (page, broken)
        counts["images"] += driver.execute_script("return document.images.length")
    return counts


def screenshot_folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TEXTSPAN_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_toy_site_loads_links_and_shows_every_image(browser, toy_site, tmp_path):
    counts = check_pages(browser, toy_site)
    assert counts["pages"] == 1 + 32 + 3  # overview, every head of the 4 layers, 3 samples
    assert counts["images"] > 32 * 20 and counts["links"] > 32
    shots = screenshot_folder(tmp_path)
    browser.get((toy_site / "index.html").as_uri())
    browser.save_screenshot(str(shots / "explorer-overview.png"))
    browser.get((toy_site / "heads" / "L3H1.html").as_uri())
    browser.save_screenshot(str(shots / "explorer-head.png"))
    assert (shots / "explorer-head.png").stat().st_size > 10_000


def test_the_overview_says_what_mean_ablation_does(toy_site):
    page = (toy_site / "index.html").read_text()
    assert "Zero-shot accuracy" in page and "mean-ablating one head at a time" in page
    assert "embedded" in page and "240 from" in page


def test_the_search_box_filters_heads_by_their_texts(browser, toy_site):
    from selenium.webdriver.common.by import By

    browser.get((toy_site / "index.html").as_uri())
    box = browser.find_element(By.ID, "search")
    cells = browser.find_elements(By.CSS_SELECTOR, ".cell")
    shown = [c for c in cells if "hidden" not in c.get_attribute("class")]
    assert len(shown) == len(cells) == 32
    box.send_keys("background")
    shown = [c for c in cells if "hidden" not in c.get_attribute("class")]
    assert 0 < len(shown) < len(cells)
    assert all("background" in c.get_attribute("data-texts") for c in shown)
    assert browser.find_element(By.ID, "count").text == f"{len(shown)} heads"
    box.clear()
    box.send_keys("zebra")
    assert all("hidden" in c.get_attribute("class") for c in cells)


def test_serve_binds_this_machine_and_only_reads(toy_site):
    server = make_server(toy_site, port=0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/index.html") as r:
            assert b"Heads of the model" in r.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{base}/index.html", b"x", method="PUT"))
        refused.value.close()
        assert refused.value.code == 501
        with pytest.raises(urllib.error.HTTPError) as outside:
            urllib.request.urlopen(f"{base}/../../etc/passwd")
        outside.value.close()
        assert outside.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_a_moved_image_folder_is_named(tmp_path, capsys):
    images = _toy_images(tmp_path / "images", 12)
    store = textspan.extract(
        images,
        tmp_path / "store",
        model="toy",
        engine=textspan.LocalEngine(workers=0, device="cpu"),
        progress=False,
    )
    images.rename(tmp_path / "elsewhere")
    assert main(["explore", str(store.path), "--device", "cpu"]) == 2
    assert "pass --images with their folder" in capsys.readouterr().err
    argv = ["explore", str(store.path), "--images", str(tmp_path / "elsewhere")]
    assert main([*argv, "--device", "cpu", "--samples", "1", "--layers", "1"]) == 0


@pytest.mark.slow
def test_the_site_of_a_random_vit_b_16(browser, tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.jpg")
    store = textspan.extract(
        tmp_path / "images",
        tmp_path / "store",
        model="ViT-B-16",
        batch_size=12,
        engine=textspan.LocalEngine(workers=0, device="cpu"),
        progress=False,
    )
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(textspan.default_pool()[:300]))
    argv = ["explore", str(store.path), "--out", str(tmp_path / "site"), "--pool", str(pool)]
    assert main([*argv, "--device", "cpu", "--samples", "2", "--templates", "simple"]) == 0
    counts = check_pages(browser, tmp_path / "site")
    assert counts["pages"] == 1 + 4 * 12 + 2


def test_a_site_rebuilt_from_other_images_shows_their_thumbnails_not_stale_ones(tmp_path):
    from textspan.explorer import _Thumbs

    site = tmp_path / "site" / "thumbs"
    shown = []
    for value in (0, 255):  # two stores of the same file names, other images
        root = tmp_path / f"images{value}"
        root.mkdir()
        Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(root / "0.png")
        link = _Thumbs(site, root, ["0.png"])(0)
        with Image.open(site.parent / link) as im:
            shown.append(np.asarray(im).mean())
    assert shown[0] < 10 and shown[1] > 245, shown


def test_a_busy_or_impossible_port_is_said_before_the_site_is_built(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for port in (str(taken), "99999"):
            # The store does not exist: the port is checked first, before any work.
            assert main(["explore", str(tmp_path / "no-store"), "--serve", "--port", port]) == 2
            err = capsys.readouterr().err
            assert f"cannot serve on 127.0.0.1:{port}" in err and "no-store" not in err
