"""``fedfuse serve`` as a client sees it: a real server process on a tiny finished run, its JSON
API over HTTP (who may ask for what, answers, the errors' statuses and messages, serving on
after them), what it does with hostile connections, and its page in headless Chromium."""

from __future__ import annotations

import json
import logging
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from playwright.sync_api import ConsoleMessage, Page, expect, sync_playwright

from common.config import load_config
from common.errors import ConfigError
from common.platform_data import PlatformData, federation_platforms, read_platform
from server.cli import main
from server.federation.run_record import CONFIG_FILE
from server.serving import listener
from server.serving.access import RateLimit, Tokens, read_or_create_token
from server.serving.guards import ERROR_PACE, MAX_BODY, SECURITY_HEADERS
from server.serving.http_app import MAX_LIKED, MAX_TITLE, Busy, Lane, create_app
from server.serving.listener import listen, server_config
from server.serving.recommender import Recommender
from server.serving.service_process import running_service

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; scripts/test.sh installs it
PLATFORM = "p0"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve") / "serve.token"


@pytest.fixture(scope="module")
def service(finished_run: Path, token_file: Path) -> Iterator[str]:
    """``python -m server.cli serve`` on a free port; its base URL once /health answers."""
    options = ["--token-file", str(token_file)]
    with running_service(finished_run, PLATFORM, timeout=180, options=options) as url:
        yield url


@pytest.fixture(scope="module")
def operator(service: str, token_file: Path) -> dict[str, str]:
    """The operator's headers: the token the service made on its first start."""
    return {"Authorization": f"Bearer {token_file.read_text().strip()}"}


@pytest.fixture(scope="module")
def platform(finished_run: Path) -> PlatformData:
    """The served platform's data, read here independently of the service."""
    folders = dict(federation_platforms(load_config(finished_run / CONFIG_FILE).data))
    return read_platform(folders[PLATFORM], PLATFORM)


@pytest.fixture(scope="module")
def recommender(finished_run: Path) -> Recommender:
    """The same platform in this process, for the app under Starlette's test client."""
    return Recommender(finished_run, PLATFORM)


def _seen(platform: PlatformData, user: str) -> set[str]:
    return {str(item) for item in platform.items[platform.users == user]}


def _busiest_user(platform: PlatformData) -> str:
    return max({str(u) for u in platform.users}, key=lambda u: len(_seen(platform, u)))


def _user_headers(service: str, operator: dict[str, str], user: str) -> dict[str, str]:
    """A user token minted by the operator, as the platform's login service would."""
    response = httpx.post(f"{service}/api/tokens", json={"user": user}, headers=operator)
    assert response.status_code == 200, response.text
    assert response.json()["user"] == user
    return {"Authorization": f"Bearer {response.json()['token']}"}


TOKEN = "t" * 43


def _client(recommender: Recommender, **options: object) -> TestClient:
    """The app in this process; TestClient's Host is ``testserver``."""
    options = {"tokens": Tokens(TOKEN), "allowed_hosts": ["testserver"], "error_pace": 0, **options}
    app = create_app(recommender, **options)  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


# --- who may ask for whose recommendations --------------------------------------------------

CALLS = [  # every API call a stranger might make
    ("GET", "/api/session", None),
    ("GET", "/api/users", None),
    ("POST", "/api/history", {"user": "p0-u0"}),
    ("POST", "/api/recommend", {"user": "p0-u0"}),
    ("POST", "/api/recommend", {"liked": ["a film"]}),
    ("POST", "/api/tokens", {"user": "p0-u0"}),
]


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
def test_the_api_answers_nobody_without_a_valid_token(
    service: str, operator: dict[str, str], method: str, path: str, body: object
) -> None:
    forged = _user_headers(service, operator, "p0-u1")["Authorization"][:-4] + "AAAA"
    for headers in ({}, {"Authorization": "Bearer guess"}, {"Authorization": forged}):
        response = httpx.request(method, f"{service}{path}", json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert list(response.json()) == ["error"]


def test_a_user_token_answers_for_its_own_user_only(
    service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    user = _busiest_user(platform)
    other = next(u for u in sorted({str(u) for u in platform.users}) if u != user)
    mine = _user_headers(service, operator, user)
    own = httpx.post(f"{service}/api/recommend", json={"user": user, "k": 3}, headers=mine)
    assert own.status_code == 200 and own.json()["user"] == user
    history = httpx.post(f"{service}/api/history", json={}, headers=mine).json()
    assert history["user"] == user and history["seen"] == len(_seen(platform, user))
    session = httpx.get(f"{service}/api/session", headers=mine).json()
    assert session["role"] == "user" and session["user"] == user and session["users"] is None
    # another user, existing or not, is refused alike: a refusal says nothing about them
    for stranger in (other, "nobody"):
        for path in ("/api/recommend", "/api/history"):
            response = httpx.post(f"{service}{path}", json={"user": stranger}, headers=mine)
            assert response.status_code == 403
            assert response.json() == {"error": "a user token answers for its own user only"}
    for method, path, body in [
        ("GET", "/api/users", None),
        ("POST", "/api/tokens", {"user": other}),
    ]:
        response = httpx.request(method, f"{service}{path}", json=body, headers=mine)
        assert response.status_code == 403, response.text
    cold = httpx.post(f"{service}/api/recommend", json={"liked": ["a film"], "k": 2}, headers=mine)
    assert cold.status_code == 200 and cold.json()["user"] is None


def test_the_operator_lists_users_and_reads_any_history(
    service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    assert httpx.get(f"{service}/health").json() == {"status": "ok"}  # says nothing more
    users = sorted({str(u) for u in platform.users})
    session = httpx.get(f"{service}/api/session", headers=operator).json()
    assert session == {
        "role": "operator",
        "user": None,
        "open": False,
        "platform": PLATFORM,
        "items": len(platform.item_text),
        "users": len(users),
        "history_len": session["history_len"],
    }
    listed = httpx.get(f"{service}/api/users", headers=operator).json()
    assert listed == {"users": users, "total": len(users)}
    limited = httpx.get(f"{service}/api/users?limit=2", headers=operator).json()
    assert limited["users"] == users[:2]
    user = _busiest_user(platform)
    history = httpx.post(f"{service}/api/history", json={"user": user}, headers=operator).json()
    assert history["user"] == user and history["seen"] == len(_seen(platform, user))
    assert history["liked"] and {h["item"] for h in history["liked"]} <= _seen(platform, user)
    titles = {item: text.split(". ")[0] for item, text in platform.item_text.items()}
    assert all(h["title"] == titles[h["item"]] for h in history["liked"])


def test_user_ids_are_never_in_urls(recommender: Recommender, service: str) -> None:
    """The old ``GET /api/users/{user}`` put ids in every access log line; it is gone."""
    app = create_app(recommender, Tokens(TOKEN))
    assert not [route.path for route in app.routes if "{" in route.path]  # type: ignore[attr-defined]
    response = httpx.get(f"{service}/api/users/p0-u0")
    assert response.status_code == 404


def test_user_tokens_expire_and_cannot_be_altered() -> None:
    tokens = Tokens(TOKEN)
    token = tokens.mint("p0-u1", expires=2_000)
    assert tokens.verify(token, now=1_999) is not None
    assert tokens.verify(token, now=1_999).user == "p0-u1"  # type: ignore[union-attr]
    assert tokens.verify(token, now=2_000) is None  # expired
    user, expires, signature = token.split(".")
    assert tokens.verify(f"{user}.9999999999.{signature}", now=0) is None  # extended
    other = tokens.mint("p0-u2", expires=2_000).split(".")[0]
    assert tokens.verify(f"{other}.{expires}.{signature}", now=0) is None  # another user
    assert Tokens("u" * 43).verify(token, now=0) is None  # another deployment
    assert tokens.verify(TOKEN).user is None  # type: ignore[union-attr]  # the operator


def test_the_token_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "serve.token"
    token, made = read_or_create_token(path)
    assert made and len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_token(path) == (token, False)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_or_create_token(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="not a service token"):
        read_or_create_token(path)


def test_without_a_token_it_serves_loopback_only_and_when_told(
    recommender: Recommender, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["serve", str(finished_run), "--platform", PLATFORM, "--insecure-no-auth"]
    assert main([*args, "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "loopback only, not 0.0.0.0" in error[0]
    client = _client(recommender, tokens=None)  # what --insecure-no-auth on loopback serves
    session = client.get("/api/session").json()
    assert session["role"] == "operator" and session["open"] is True
    assert client.post("/api/tokens", json={"user": "p0-u1"}).status_code == 409


# --- a service that stays up ---------------------------------------------------------------


def test_a_foreign_host_header_is_refused(service: str, recommender: Recommender) -> None:
    """DNS rebinding: a page on attacker.example that resolves to 127.0.0.1 is not served."""
    response = httpx.get(f"{service}/health", headers={"Host": "attacker.example"})
    assert response.status_code == 400
    assert httpx.get(f"{service}/health").status_code == 200
    localhost = service.replace("127.0.0.1", "localhost")
    assert httpx.get(f"{localhost}/health").status_code == 200
    named = _client(recommender, allowed_hosts=["shop.example"])  # --allowed-host shop.example
    assert named.get("http://shop.example/health").status_code == 200
    assert named.get("http://testserver/health").status_code == 400


def test_every_response_carries_the_security_headers(
    service: str, operator: dict[str, str]
) -> None:
    responses = [
        httpx.get(f"{service}/"),
        httpx.get(f"{service}/page.js"),
        httpx.get(f"{service}/page.css"),
        httpx.get(f"{service}/health"),
        httpx.get(f"{service}/api/session"),  # 401
        httpx.get(f"{service}/nowhere"),  # 404
        httpx.get(f"{service}/health", headers={"Host": "attacker.example"}),  # 400
        httpx.post(f"{service}/api/recommend", content=b" " * (MAX_BODY + 1)),  # 413
        httpx.post(f"{service}/api/recommend", json={"liked": [], "k": 0}, headers=operator),
    ]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.url, name)
        assert "server" not in response.headers
    policy = SECURITY_HEADERS["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert responses[1].headers["content-type"].startswith("text/javascript")
    page = responses[0].text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>|<style|\sstyle=|\son\w+=", page)


def test_openapi_is_served_only_when_asked(service: str, recommender: Recommender) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{service}{path}").status_code == 404
    assert _client(recommender, openapi=True).get("/openapi.json").status_code == 200


def test_only_the_entries_the_model_reads_are_matched(recommender: Recommender) -> None:
    """A liked list is cut to ``history_len`` before matching: what lies beyond (here an
    entry that would be refused) costs nothing and changes nothing."""
    client = _client(recommender)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    items = list(recommender.data.item_text)[: recommender.history_len]
    full = client.post("/api/recommend", json={"liked": items, "k": 3}, headers=headers)
    longer = {"liked": [*items, " ", *items], "k": 3}
    response = client.post("/api/recommend", json=longer, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == full.json()


class _NoScans(dict):
    """An item-text mapping that refuses to be walked: look-ups only."""

    def items(self):  # noqa: ANN201
        raise AssertionError("the catalogue was scanned for a request")

    values = keys = __iter__ = items


def test_titles_are_matched_by_an_index_built_at_start(
    finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recommender = Recommender(finished_run, PLATFORM)
    item, text = next(iter(recommender.data.item_text.items()))
    monkeypatch.setattr(recommender.data, "item_text", _NoScans(recommender.data.item_text))
    title = recommender.titles[item]
    assert [h.key for h in recommender.resolve([title.upper(), text, item])] == [item] * 3


def test_a_caller_over_the_rate_limit_is_told_when_to_retry(recommender: Recommender) -> None:
    """Charged by cost: each title from elsewhere runs the encoder and costs more."""
    client = _client(recommender, rate_limit=RateLimit(rate=0.01, burst=3))
    tokens = Tokens(TOKEN)
    user = recommender.users[0]
    mine = {"Authorization": f"Bearer {tokens.mint(user, int(time.time()) + 60)}"}
    other = {"Authorization": f"Bearer {tokens.mint(recommender.users[1], int(time.time()) + 60)}"}
    cold = {"liked": ["a film", "another film"], "k": 2}
    assert client.post("/api/recommend", json=cold, headers=mine).status_code == 429  # costs 5
    for _ in range(3):
        assert client.post("/api/recommend", json={"user": user}, headers=mine).status_code == 200
    refused = client.post("/api/recommend", json={"user": user}, headers=mine)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"].startswith("rate limit: retry in")
    assert client.post("/api/recommend", json={"liked": []}, headers=other).status_code == 200
    operator = {"Authorization": f"Bearer {TOKEN}"}  # the platform itself is not limited
    for _ in range(5):
        response = client.post("/api/recommend", json={"user": user}, headers=operator)
        assert response.status_code == 200


def test_a_full_lane_turns_requests_away_at_once() -> None:
    lane = Lane(workers=1, waiting=1)
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lane.slot():
            inside.set()
            release.wait(10)

    holders = [threading.Thread(target=hold) for _ in range(2)]  # one runs, one waits
    for holder in holders:
        holder.start()
    assert inside.wait(10)
    time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(Busy), lane.slot():
        pass
    assert time.monotonic() - start < 1  # not after the 10 s the holders may take
    release.set()
    for holder in holders:
        holder.join(10)
    with lane.slot():  # free again
        pass


def test_the_encoder_lane_keeps_to_its_share_of_a_core() -> None:
    """After 0.2 s of work at a duty of 0.5 the lane rests 0.2 s: a flood of cold starts
    takes at most that share, whoever sends them."""
    lane = Lane(workers=1, waiting=0, duty=0.5)
    start = time.monotonic()
    with lane.slot():
        time.sleep(0.2)
    worked = time.monotonic() - start  # at least the rest the lane took (0.2 s or more)
    with pytest.raises(Busy), lane.slot():
        pass
    time.sleep(worked + 0.05)
    with lane.slot():
        pass


def test_a_busy_lane_answers_503(recommender: Recommender, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(recommender)
    monkeypatch.setattr(Lane, "slot", lambda self: (_ for _ in ()).throw(Busy()))
    response = client.post(
        "/api/recommend", json={"liked": []}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"error": "busy: retry shortly"}


@pytest.fixture
def in_process_server(
    recommender: Recommender, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, int]]:
    """The real uvicorn settings on a thread, with a request read deadline of 0.5 s."""
    monkeypatch.setattr(listener, "REQUEST_READ_TIMEOUT_S", 0.5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = listen("127.0.0.1", port)
    app = create_app(recommender, None)
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``connection`` (reading EOF) within ``seconds``."""
    connection.settimeout(seconds)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_unfinished_requests_are_cut_and_requests_are_not_logged(
    in_process_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    host, port = in_process_server
    caplog.set_level(logging.DEBUG)
    idle = socket.create_connection((host, port))  # connects and sends nothing
    loris = socket.create_connection((host, port))
    loris.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")  # and never ends it
    body = socket.create_connection((host, port))
    body.sendall(b"POST /api/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
    for connection in (idle, loris, body):
        assert _closed_within(connection, 5)
        connection.close()
    huge = socket.create_connection((host, port))  # a header that never ends, 1 MiB so far
    huge.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2**20)
    huge.settimeout(5)
    assert huge.recv(12).startswith(b"HTTP/1.1 4")  # refused once past MAX_HEAD, not read on
    huge.close()
    user = "p0-u1"
    response = httpx.post(f"http://{host}:{port}/api/recommend", json={"user": user})
    assert response.status_code == 200 and "server" not in response.headers
    assert not [r for r in caplog.records if r.name == "uvicorn.access"]
    assert user not in caplog.text


def test_a_bad_port_is_one_line(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before the run is loaded: 70000 is refused (uvicorn served 4464), a port in
    use is one line with exit 2 (uvicorn logged and exited 1)."""
    args = ["serve", str(finished_run), "--platform", PLATFORM]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for port, message in [
            ("70000", "port 70000: give one from 1 to 65535"),
            ("0", "port 0: give one from 1 to 65535"),
            (str(taken.getsockname()[1]), "Address already in use"),
        ]:
            assert main([*args, "--port", port]) == 2
            error = capsys.readouterr().err.strip().splitlines()
            assert len(error) == 1 and error[0].startswith("fedfuse: error: ")
            assert message in error[0]


# --- answers ---------------------------------------------------------------------------------


def test_recommend_excludes_seen_items_and_respects_k(
    service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    user = _busiest_user(platform)
    seen = _seen(platform, user)
    for k in (1, 5):
        response = httpx.post(
            f"{service}/api/recommend", json={"user": user, "k": k}, headers=operator
        )
        assert response.status_code == 200, response.text
        document = response.json()
        items = document["recommendations"]
        assert len(items) == k and not {r["item"] for r in items} & seen
        assert [r["score"] for r in items] == sorted((r["score"] for r in items), reverse=True)
        for item in items:  # each explanation is the score's own breakdown, rounded
            parts = sum(s["value"] for s in item["because"]) + item["prior"] + item["text"]
            assert parts + item["base"] == pytest.approx(item["score"], abs=0.01)
            assert all(len(str(s["value"]).partition(".")[2]) <= 3 for s in item["because"])
            assert item["explanation"] and item["because"]
        assert document["platform"] == PLATFORM and document["user"] == user
    body = {"user": user, "k": 100}
    everything = httpx.post(f"{service}/api/recommend", json=body, headers=operator).json()
    assert len(everything["recommendations"]) == len(platform.item_text) - len(seen)


def test_recommend_for_titles_liked_here_and_elsewhere(
    service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    """Cold start: a catalogue id is matched and excluded; other text is used as liked."""
    item = next(iter(platform.item_text))
    liked = [item, "space rocket galaxy documentary"]
    body = {"liked": liked, "k": 3}
    response = httpx.post(f"{service}/api/recommend", json=body, headers=operator)
    assert response.status_code == 200, response.text
    document = response.json()
    assert [(h["item"], h["elsewhere"]) for h in document["history"]] == [
        (item, False),
        (liked[1], True),
    ]
    assert document["history"][0]["title"] == platform.item_text[item].split(". ")[0]
    assert document["user"] is None and len(document["recommendations"]) == 3
    assert item not in {r["item"] for r in document["recommendations"]}


def test_a_maximal_cold_start_names_each_title_once(
    service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    """Every recommendation repeated every history item's title: 20 titles of 1,000
    characters made one answer at k = 100 about 2 MB, and building and sending it slowed
    everyone's requests (docs/serving.md, measured with hostile clients). Now a share names
    its history item by place, and a sentence cuts a long title."""
    liked = [f"{n:02d} " + "long foreign title " * 60 for n in range(20)]
    liked = [title[:MAX_TITLE] for title in liked]
    body = {"liked": liked, "k": 100}
    response = httpx.post(f"{service}/api/recommend", json=body, headers=operator)
    assert response.status_code == 200, response.text
    document = response.json()
    history = document["history"]
    assert [h["title"] for h in history] == liked[: len(history)] and len(history) > 1
    recommendations = document["recommendations"]
    assert len(recommendations) == len(platform.item_text)
    named = []  # the titles the sentences name, cut to 80 characters
    for item in recommendations:
        assert sorted(s["history"] for s in item["because"]) == list(range(len(history)))
        assert "title" not in item["because"][0]
        named += re.findall(r"“(.+?)”", item["explanation"])
    assert named and all(len(title) <= 80 and title.endswith("…") for title in named)
    for title in liked[: len(history)]:  # in the history (its id and title), nowhere else
        assert response.text.count(title) == 2


def test_no_history_gets_the_platforms_popular_items(
    service: str, operator: dict[str, str]
) -> None:
    response = httpx.post(f"{service}/api/recommend", json={"liked": []}, headers=operator)
    assert response.status_code == 200, response.text
    document = response.json()
    assert len(document["recommendations"]) == 10 and document["history"] == []
    assert all(not r["because"] for r in document["recommendations"])


def test_concurrent_requests_all_answer_the_same(
    service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    """8 clients at once all get the answer one client alone gets; cold starts (the encoder's
    lane: one at a time, a quarter of a core) get it too, or a 503 to retry."""
    bodies = [{"user": _busiest_user(platform), "k": 5}, {"liked": ["laugh party joke"], "k": 5}]
    url = f"{service}/api/recommend"
    alone = [httpx.post(url, json=b, headers=operator).json() for b in bodies]

    def ask(index: int) -> str:
        response = httpx.post(url, json=bodies[index % 2], headers=operator, timeout=60)
        if response.status_code == 503 and index % 2:
            return "busy"
        return "same" if response.json() == alone[index % 2] else response.text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(48)))
    assert set(answers[::2]) == {"same"}
    assert set(answers[1::2]) <= {"same", "busy"} and "same" in answers[1::2]


def _chunks(size: int) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length), so only the bytes received can tell its size."""
    for _ in range(size // 4096 + 1):
        yield b" " * 4096


def _raw(text: str) -> dict[str, object]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


ERRORS = [  # (method, path, request options, status, what the message says)
    ("POST", "/api/recommend", {"json": {"user": "nobody"}}, 404, "has no user 'nobody'"),
    ("POST", "/api/history", {"json": {"user": "nobody"}}, 404, "has no user 'nobody'"),
    ("POST", "/api/history", {"json": {}}, 422, "the operator names the user"),
    ("POST", "/api/recommend", {"json": {"user": "x", "liked": ["y"]}}, 422, "either 'user'"),
    ("POST", "/api/recommend", {"json": {"k": 3}}, 422, "either 'user' or 'liked'"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": 0}}, 422, "k: Input should be greater"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": 101}}, 422, "k: Input should be less"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": "ten"}}, 422, "k: Input should be"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": True}}, 422, "k: Input should be"),
    ("POST", "/api/recommend", {"json": {"liked": [], "k": 2.0}}, 422, "k: Input should be"),
    ("POST", "/api/recommend", {"json": {"users": "x"}}, 422, "users: Extra inputs"),
    ("POST", "/api/recommend", {"json": {"liked": [" "]}}, 422, "an empty liked title or id"),
    (
        "POST",
        "/api/recommend",
        {"json": {"liked": ["x"] * (MAX_LIKED + 1)}},
        422,
        f"liked: List should have at most {MAX_LIKED} items",
    ),
    (
        "POST",
        "/api/recommend",
        {"json": {"liked": ["x" * (MAX_TITLE + 1)]}},
        422,
        f"liked.0: String should have at most {MAX_TITLE} characters",
    ),
    ("POST", "/api/recommend", {"json": {"user": "u" * 257}}, 422, "user: String should have"),
    ("POST", "/api/recommend", _raw('{"liked": ["\\ud800"]}'), 422, "liked.0: Input should be"),
    ("POST", "/api/recommend", _raw('{"liked": ["a\\udfffb"]}'), 422, "liked.0: Input should be"),
    ("POST", "/api/recommend", _raw('{"user": "\\ud800"}'), 422, "user: Input should be"),
    ("POST", "/api/recommend", {"json": ["x"]}, 422, "body: expected a JSON object"),
    ("POST", "/api/recommend", _raw('{"user": '), 422, "malformed JSON: Expecting value at"),
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
    service: str,
    operator: dict[str, str],
    method: str,
    path: str,
    options: dict,
    status: int,
    message: str,
) -> None:
    headers = {**operator, **options.get("headers", {})}
    sent = {name: value for name, value in options.items() if name != "headers"}
    response = httpx.request(method, f"{service}{path}", timeout=30, headers=headers, **sent)
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
        history_for=lambda user, liked: ([], set()),
        recommend=broken,
    )
    app = create_app(stub, None, allowed_hosts=["testserver"])  # type: ignore[arg-type]
    client = TestClient(app, raise_server_exceptions=False)
    response = client.post("/api/recommend", json={"user": "u"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (logged by the service)"}
    assert client.get("/health").status_code == 200


def test_refusals_are_answered_late_and_valid_requests_at_once() -> None:
    """A client repeating refused requests made the service answer hundreds a second, and
    the people asking valid ones waited behind them (bench_serve: normal p50 109 ms beside 8
    hostile clients); each refusal now costs its sender ERROR_PACE, a valid request nothing."""
    stub = SimpleNamespace(platform="p", users=["u"], history_len=5)
    app = create_app(stub, Tokens(TOKEN), allowed_hosts=["testserver"])  # type: ignore[arg-type]
    client = TestClient(app, raise_server_exceptions=False)

    def timed(method: str, path: str, **options: object) -> tuple[int, float]:
        started = time.perf_counter()
        response = client.request(method, path, **options)  # type: ignore[arg-type]
        return response.status_code, time.perf_counter() - started

    for status, seconds in (
        timed("POST", "/api/recommend", json={"user": "u"}),  # no token
        timed("GET", "/health", headers={"Host": "attacker.example"}),
        timed("POST", "/api/recommend", content=b"x" * (MAX_BODY + 1)),
    ):
        assert status in (400, 401, 413) and seconds >= ERROR_PACE, (status, seconds)
    status, seconds = timed("GET", "/health")
    assert status == 200 and seconds < ERROR_PACE


# --- the page ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_service(finished_run: Path) -> Iterator[str]:
    """The same run served with ``--insecure-no-auth`` (loopback)."""
    with running_service(finished_run, PLATFORM, 180, ["--insecure-no-auth"]) as url:
        yield url


def _watched_page(browser: object) -> tuple[Page, list[str]]:
    """A new page and the console errors it logs, such as a CSP violation or a script error
    (failed loads aside: a 401 signed out, a 404 for an unknown user or the favicon)."""
    page = browser.new_page()  # type: ignore[attr-defined]
    errors: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def _pick_and_recommend(page: Page, platform: PlatformData, user: str) -> None:
    page.fill("#k", "4")
    page.click("#go")
    recs = page.locator("#recs .rec")
    expect(recs).to_have_count(4)
    expect(page.locator("#recs-heading")).to_have_text(f"Top 4 on {PLATFORM} for user {user}")
    titles = {text.split(". ")[0] for text in platform.item_text.values()}
    for index in range(4):
        rec = recs.nth(index)
        assert rec.locator(".title").inner_text().strip()
        assert rec.locator(".explanation").inner_text().strip()
        expect(rec.locator(".breakdown tr")).to_have_count(5)  # 4 parts and the score
    liked = page.locator("#history-list li:not(.empty)")
    assert liked.count() >= 1
    assert all(text in titles for text in liked.all_inner_texts())
    shown = {t.split("score")[0].strip() for t in recs.locator(".title").all_inner_texts()}
    seen_titles = {platform.item_text[i].split(". ")[0] for i in _seen(platform, user)}
    assert shown <= titles and not shown & seen_titles


@pytest.mark.browser
def test_the_page_works_with_tokens_and_without(
    service: str, open_service: str, operator: dict[str, str], platform: PlatformData
) -> None:
    """A person's path through the page in a real browser, under the page's CSP: signed out,
    then as the operator (any user), as one user (their own only), and on an open service."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test.sh (installs Debian's chromium)")
    user = _busiest_user(platform)
    user_token = _user_headers(service, operator, user)["Authorization"].removeprefix("Bearer ")
    operator_token = operator["Authorization"].removeprefix("Bearer ")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page, errors = _watched_page(browser)
            page.goto(service)
            expect(page.locator("#signin")).to_be_visible()
            page.fill("#token", operator_token)
            page.click("#signin-go")
            expect(page.locator("#heading")).to_have_text(f"{PLATFORM}: your homepage")
            expect(page.locator("#user-list option")).to_have_count(len(set(platform.users)))
            page.fill("#user", user)
            _pick_and_recommend(page, platform, user)
            page.fill("#user", "nobody")
            page.click("#go")
            expect(page.locator("#error")).to_contain_text("has no user 'nobody'")
            page.click("#mode-liked")
            page.fill("#liked", "laugh party joke\n")
            page.click("#go")
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#history-list .tag")).to_have_text(["from elsewhere"])
            expect(page.locator("#recs .rec")).to_have_count(4)
            assert not errors, errors

            page, errors = _watched_page(browser)
            page.goto(f"{service}/#token={user_token}")
            expect(page.locator("#user")).to_have_value(user)
            assert "token" not in page.url
            expect(page.locator("#user-list option")).to_have_count(0)
            _pick_and_recommend(page, platform, user)
            assert not errors, errors

            page, errors = _watched_page(browser)
            page.goto(open_service)
            expect(page.locator("#signin")).to_be_hidden()
            expect(page.locator("#user-list option")).to_have_count(len(set(platform.users)))
            page.fill("#user", user)
            _pick_and_recommend(page, platform, user)
            assert not errors, errors
        finally:
            browser.close()
