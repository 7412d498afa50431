"""Screenshot of the page ``fedfuse serve`` shows (README's docs/img/serve_page.png).

Usage: python scripts/page_screenshot.py [--run runs/ml100k-default] [--platform comedy]
       [--user 1] [--k 5] [--out docs/img/serve_page.png]

Starts the service on the run, opens its page in headless Chromium (Debian's, which
scripts/test.sh installs), asks for the user's top K and saves the whole page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from server.serving.service_process import REPO, running_service

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "ml100k-default")
    parser.add_argument("--platform", default="comedy")
    parser.add_argument("--user", default="1")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "serve_page.png")
    args = parser.parse_args()
    # the page's picture, on loopback only: no token to type into it
    service = running_service(args.run, args.platform, options=["--insecure-no-auth"])
    with service as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.fill("#user", args.user)
        page.fill("#k", str(args.k))
        page.click("#go")
        page.wait_for_selector(".rec")
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
