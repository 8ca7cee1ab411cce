"""The interactive API page (/docs) in a real headless browser.

Debian's Chromium, driven by Playwright (CI installs both: .ci/run and the
`test` extra). The page must render from the server alone (Swagger UI's
scripts come from the fastapi-offline package, not a CDN), list every route
of the API and show the request models; a screenshot is saved.

    TWHIN_DOCS_SCREENSHOT=docs/serving_docs_page.png pytest tests/test_serve_docs_page.py

writes the screenshot there too (it is committed in docs/ for the record).
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from twhin_jax import serve

from conftest import train_tiny_demo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ROUTES = {("GET", "/health"), ("GET", "/version"), ("POST", "/neighbors"), ("POST", "/diverse"),
          ("POST", "/score"), ("POST", "/embedding"), ("POST", "/reload")}


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
  workdir = train_tiny_demo(str(tmp_path_factory.mktemp("docs_demo")))
  service = serve.Service(workdir, exact_below=500)
  httpd = serve.make_server(service, "127.0.0.1", 0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  service.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is absent: `apt-get install -y chromium` (as .ci/run does)")
def test_docs_page_lists_every_route(docs_server, tmp_path):
  from playwright.sync_api import sync_playwright  # the `test` extra; not skipped if missing

  url = f"http://127.0.0.1:{docs_server.server_address[1]}/docs"
  failed_requests = []
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      page.on("requestfailed", lambda request: failed_requests.append(request.url))
      response = page.goto(url, wait_until="networkidle", timeout=60_000)
      assert response is not None and response.status == 200
      # Swagger UI renders one block per operation once it has read /openapi.json.
      page.wait_for_selector(".opblock-summary", timeout=60_000)
      shown = set()
      for block in page.query_selector_all(".opblock-summary"):
        method = block.query_selector(".opblock-summary-method").inner_text().strip()
        path = block.query_selector(".opblock-summary-path").inner_text().strip()
        shown.add((method.upper(), path.replace("\u200b", "")))
      assert shown == ROUTES, shown
      title = page.query_selector(".info .title").inner_text()
      assert "twhin-jax service" in title
      # The request models are on the page (the schemas section).
      page.wait_for_selector("section.models", timeout=30_000)
      models_text = page.query_selector("section.models").inner_text()
      for model in ("NeighborsRequest", "ScoreRequest", "EmbeddingRequest", "Error"):
        assert model in models_text, models_text[:500]
      screenshot = tmp_path / "docs_page.png"
      page.screenshot(path=str(screenshot), full_page=True)
      # Open /neighbors: its request body schema names the fields.
      page.click("#operations-default-neighbors_neighbors_post .opblock-summary")
      page.wait_for_selector("#operations-default-neighbors_neighbors_post .body-param__example",
                             timeout=30_000)
      example = page.inner_text("#operations-default-neighbors_neighbors_post "
                                ".body-param__example")
      assert '"entity_type"' in example and '"relation"' in example
    finally:
      browser.close()
  assert not failed_requests, failed_requests  # nothing fetched from outside the server
  data = screenshot.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
  if os.environ.get("TWHIN_DOCS_SCREENSHOT"):
    shutil.copyfile(screenshot, os.environ["TWHIN_DOCS_SCREENSHOT"])
