"""Open every HTML page of a folder (an atlas, reports, saved views) in headless Chromium and report what
went wrong: console errors, network requests, images that do not load, links to missing files; pages
also checked with JavaScript off must still have text. Exit 1 if any page has a problem.

    python scripts/check_site.py SITE [--screenshots DIR] [--no-js]
"""

import argparse
import sys
import time
from pathlib import Path

from tl_multimodal.views.browser import Chromium


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None, help="a PNG of each page into this folder")
    parser.add_argument("--no-js", action="store_true", help="also load every page with JavaScript off")
    args = parser.parse_args()
    pages = sorted(args.site.rglob("*.html"))
    if not pages:
        print(f"{args.site}: no HTML pages", file=sys.stderr)
        return 1
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_requests = n_links = n_images = n_warnings = 0
    bad, biggest = [], max(pages, key=lambda p: p.stat().st_size)
    with Chromium() as browser:
        for page in pages:
            shot = args.screenshots / (str(page.relative_to(args.site)).replace("/", "_") + ".png") \
                if args.screenshots else None
            runs = [browser.check(page, screenshot=shot)]
            if args.no_js:
                runs.append(browser.check(page, javascript=False))
                if not runs[-1].text.strip():
                    bad.append((page, ["no text without JavaScript"]))
            for check in runs:
                n_requests += len(check.requests)
                n_links += len(check.links)
                n_images += len([u for u in check.requests if u.endswith((".jpg", ".png"))])
                n_warnings += len(check.warnings)
                if check.problems:
                    bad.append((page, check.problems))
    print(f"{len(pages)} pages ({'with and without' if args.no_js else 'with'} JavaScript) in "
          f"{time.perf_counter() - start:.0f} s: {n_requests} requests ({n_images} image files), {n_links} links; "
          f"{sum(len(p) for _, p in bad)} problems on {len(bad)} pages; {n_warnings} console warnings; "
          f"largest page {biggest.relative_to(args.site)} {biggest.stat().st_size / 1e3:.0f} kB")
    for page, problems in bad[:20]:
        print(f"  {page.relative_to(args.site)}: " + "; ".join(problems[:3]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
