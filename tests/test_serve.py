"""``fedfuse serve`` as a client sees it: a real server process on a tiny finished run, its JSON
API over HTTP (answers, the errors' statuses and messages, serving on after them) and its page
in headless Chromium."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import expect, sync_playwright

from common.config import load_config
from common.platform_data import PlatformData, federation_platforms, read_platform
from server.federation.run_record import CONFIG_FILE
from server.serving.http_app import MAX_BODY, create_app
from server.serving.service_process import running_service

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; scripts/test.sh installs it
PLATFORM = "p0"


@pytest.fixture(scope="module")
def service(finished_run: Path) -> Iterator[str]:
    """``python -m server.cli serve`` on a free port; its base URL once /health answers."""
    with running_service(finished_run, PLATFORM, timeout=180) as url:
        yield url


@pytest.fixture(scope="module")
def platform(finished_run: Path) -> PlatformData:
    """The served platform's data, read here independently of the service."""
    folders = dict(federation_platforms(load_config(finished_run / CONFIG_FILE).data))
    return read_platform(folders[PLATFORM], PLATFORM)


def _seen(platform: PlatformData, user: str) -> set[str]:
    return {str(item) for item in platform.items[platform.users == user]}


def _busiest_user(platform: PlatformData) -> str:
    return max({str(u) for u in platform.users}, key=lambda u: len(_seen(platform, u)))


def test_health_and_users(service: str, platform: PlatformData) -> None:
    health = httpx.get(f"{service}/health").json()
    users = sorted({str(u) for u in platform.users})
    assert health == {
        "status": "ok",
        "platform": PLATFORM,
        "items": len(platform.item_text),
        "users": len(users),
    }
    assert httpx.get(f"{service}/api/users").json() == {"users": users, "total": len(users)}
    assert httpx.get(f"{service}/api/users?limit=2").json()["users"] == users[:2]
    user = _busiest_user(platform)
    history = httpx.get(f"{service}/api/users/{user}").json()
    assert history["user"] == user and history["seen"] == len(_seen(platform, user))
    assert history["liked"] and {h["key"] for h in history["liked"]} <= _seen(platform, user)
    assert all(h["text"] == platform.item_text[h["key"]] for h in history["liked"])


def test_recommend_excludes_seen_items_and_respects_k(service: str, platform: PlatformData) -> None:
    user = _busiest_user(platform)
    seen = _seen(platform, user)
    for k in (1, 5):
        response = httpx.post(f"{service}/api/recommend", json={"user": user, "k": k})
        assert response.status_code == 200, response.text
        document = response.json()
        items = document["recommendations"]
        assert len(items) == k and not {r["item"] for r in items} & seen
        assert [r["score"] for r in items] == sorted((r["score"] for r in items), reverse=True)
        for item in items:  # each explanation is the score's own breakdown
            parts = sum(s["value"] for s in item["because"]) + item["prior"] + item["text"]
            assert parts + item["bias"] == pytest.approx(item["score"], abs=1e-4)
            assert item["explanation"].startswith("Because") and item["because"]
        assert document["platform"] == PLATFORM and document["user"] == user
    everything = httpx.post(f"{service}/api/recommend", json={"user": user, "k": 100}).json()
    assert len(everything["recommendations"]) == len(platform.item_text) - len(seen)


def test_recommend_for_titles_liked_here_and_elsewhere(
    service: str, platform: PlatformData
) -> None:
    """Cold start: a catalogue id is matched and excluded; other text is used as liked."""
    item = next(iter(platform.item_text))
    liked = [item, "space rocket galaxy documentary"]
    response = httpx.post(f"{service}/api/recommend", json={"liked": liked, "k": 3})
    assert response.status_code == 200, response.text
    document = response.json()
    assert [(h["key"], h["row"] is None) for h in document["history"]] == [
        (item, False),
        (liked[1], True),
    ]
    assert document["user"] is None and len(document["recommendations"]) == 3
    assert item not in {r["item"] for r in document["recommendations"]}


def test_no_history_gets_the_platforms_popular_items(service: str) -> None:
    response = httpx.post(f"{service}/api/recommend", json={"liked": []})
    assert response.status_code == 200, response.text
    document = response.json()
    assert len(document["recommendations"]) == 10 and document["history"] == []
    assert all(not r["because"] for r in document["recommendations"])


def test_concurrent_requests_all_answer_the_same(service: str, platform: PlatformData) -> None:
    """Rankings are serialised: 8 clients at once (cold-start titles tokenised too) all get
    the answer one client alone gets."""
    bodies = [{"user": _busiest_user(platform), "k": 5}, {"liked": ["laugh party joke"], "k": 5}]
    alone = [httpx.post(f"{service}/api/recommend", json=b).json() for b in bodies]

    def ask(index: int) -> bool:
        response = httpx.post(f"{service}/api/recommend", json=bodies[index % 2], timeout=60)
        return response.status_code == 200 and response.json() == alone[index % 2]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(ask, range(48)))


def _chunks(size: int) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length), so only the bytes received can tell its size."""
    for _ in range(size // 4096 + 1):
        yield b" " * 4096


ERRORS = [  # (method, path, request options, status, what the message says)
    ("POST", "/api/recommend", {"json": {"user": "nobody"}}, 404, "has no user 'nobody'"),
    ("GET", "/api/users/nobody", {}, 404, "has no user 'nobody'"),
    ("POST", "/api/recommend", {"json": {"user": "x", "liked": ["y"]}}, 422, "either 'user'"),
    ("POST", "/api/recommend", {"json": {"k": 3}}, 422, "either 'user' or 'liked'"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": 0}}, 422, "k: Input should be greater"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": 101}}, 422, "k: Input should be less"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": "ten"}}, 422, "k: Input should be"),
    ("POST", "/api/recommend", {"json": {"users": "x"}}, 422, "users: Extra inputs"),
    ("POST", "/api/recommend", {"json": {"liked": [" "]}}, 422, "an empty liked title or id"),
    ("POST", "/api/recommend", {"json": ["x"]}, 422, "body: expected a JSON object"),
    (
        "POST",
        "/api/recommend",
        {"content": b'{"user": ', "headers": {"content-type": "application/json"}},
        422,
        "malformed JSON: Expecting value at character 9",
    ),
    (
        "POST",
        "/api/recommend",
        {"content": json.dumps({"liked": ["a" * MAX_BODY]})},
        413,
        "request body over 64 KiB",
    ),
    ("POST", "/api/recommend", {"content": _chunks(MAX_BODY)}, 413, "request body over 64 KiB"),
    ("GET", "/api/users?limit=0", {}, 422, "limit: Input should be greater than or equal to 1"),
    ("GET", "/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize(("method", "path", "options", "status", "message"), ERRORS)
def test_errors_are_one_line_with_their_status_and_the_service_serves_on(
    service: str, method: str, path: str, options: dict, status: int, message: str
) -> None:
    response = httpx.request(method, f"{service}{path}", timeout=30, **options)
    assert response.status_code == status
    body = response.json()
    assert list(body) == ["error"] and message in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert httpx.get(f"{service}/health").json()["status"] == "ok"


def test_a_bug_answers_500_without_its_details() -> None:
    """Anything unexpected is the service's fault: a fixed message, never the exception."""

    def broken(*_: object) -> None:
        raise RuntimeError("secret internals")

    stub = SimpleNamespace(
        platform="p",
        users=["u"],
        data=SimpleNamespace(item_text={"i": "an item"}),
        history_len=5,
        user_history=lambda user: ([], set()),
        recommend=broken,
    )
    client = TestClient(create_app(stub), raise_server_exceptions=False)  # type: ignore[arg-type]
    response = client.post("/api/recommend", json={"user": "u"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (logged by the service)"}
    assert client.get("/health").status_code == 200


def test_page_shows_history_recommendations_and_explanations(
    service: str, platform: PlatformData
) -> None:
    """A person's path through the page in a real browser: pick a user, recommend, read."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test.sh (installs Debian's chromium)")
    user = _busiest_user(platform)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(service)
            expect(page.locator("#heading")).to_have_text(f"{PLATFORM}: your homepage")
            expect(page.locator("#user-list option")).to_have_count(len(set(platform.users)))
            page.fill("#user", user)
            page.fill("#k", "4")
            page.click("#go")
            recs = page.locator("#recs .rec")
            expect(recs).to_have_count(4)
            expect(page.locator("#recs-heading")).to_have_text(
                f"Top 4 on {PLATFORM} for user {user}"
            )
            for index in range(4):
                rec = recs.nth(index)
                assert rec.locator(".title").inner_text().strip()
                expect(rec.locator(".explanation")).to_contain_text("Because")
                expect(rec.locator(".breakdown tr")).to_have_count(5)  # 4 parts and the score
            liked = page.locator("#history-list li:not(.empty)")
            assert liked.count() >= 1
            titles = set(platform.item_text.values())
            assert all(text in titles for text in liked.all_inner_texts())
            shown = {t.split("score")[0].strip() for t in recs.locator(".title").all_inner_texts()}
            seen_titles = {platform.item_text[i] for i in _seen(platform, user)}
            assert shown <= titles and not shown & seen_titles

            page.fill("#user", "nobody")
            page.click("#go")
            expect(page.locator("#error")).to_contain_text("has no user 'nobody'")

            page.click("#mode-liked")
            page.fill("#liked", "laugh party joke\n")
            page.click("#go")
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#history-list .tag")).to_have_text(["from elsewhere"])
            expect(recs).to_have_count(4)
        finally:
            browser.close()
