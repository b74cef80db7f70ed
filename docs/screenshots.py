"""Screenshots of the Dagster UI for the README: the asset graph and the fid_report asset page.

Needs a running ``dagster dev`` on a root where the tiny graph has been built (``make demo``), Playwright
(``pip install playwright``) and a Chromium (``/usr/bin/chromium`` by default):

    dagster dev -m pipelines.definitions -p 3377 &
    python docs/screenshots.py --url http://127.0.0.1:3377 --out docs/img
"""
import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def dismiss_dialogs(page) -> None:
    # First visit: Dagster asks to join its community; skip it.
    for label in ("Skip", "Dismiss"):
        button = page.get_by_role("button", name=label)
        if button.count():
            button.first.click()
            page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:3377")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{args.url}/asset-groups", wait_until="networkidle")
        page.wait_for_timeout(3000)
        dismiss_dialogs(page)
        # The graph's "Expand all groups" command has the keyboard shortcut Alt+E.
        page.mouse.click(1000, 300)
        page.keyboard.press("Alt+e")
        page.wait_for_timeout(2500)
        page.screenshot(path=str(out / "asset-graph.png"))
        # The asset page scrolls inside its own pane: a tall viewport shows the whole metadata table.
        page.set_viewport_size({"width": 1600, "height": 3400})
        page.goto(f"{args.url}/assets/fid_report", wait_until="networkidle")
        page.wait_for_timeout(3000)
        dismiss_dialogs(page)
        page.screenshot(path=str(out / "fid-report.png"))
        # The sample grid travels as a small markdown image; open it.
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.get_by_text("Show Markdown").first.click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "sample-grid.png"))
        browser.close()


if __name__ == "__main__":
    main()
