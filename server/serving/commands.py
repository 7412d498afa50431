"""``fedfuse recommend`` and ``fedfuse serve``: their arguments and what they print (the
recommender is ``recommender.py``, the service ``http_app.py`` and ``listener.py``)."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from common.errors import FedFuseError

# Loading a run takes half a minute on ML-1M (imports, the catalogue's frozen-layer cache and
# item vectors): after this many seconds, and as often again, a line says it is still going.
LOADING_NOTICE_EVERY = 10.0


def add_serving_parsers(commands: Any) -> None:
    """Registers ``fedfuse recommend`` and ``fedfuse serve`` (called by server/cli.py)."""
    recommend = commands.add_parser(
        "recommend", help="top-K items for a user of one platform from a finished run, explained"
    )
    _add_served_platform(recommend)
    recommend.add_argument("--user", help="a user of that platform (their history is its data)")
    recommend.add_argument(
        "--history",
        nargs="+",
        metavar="TITLE_OR_ID",
        help="liked items, newest first: this platform's ids or titles, or titles liked on "
        "another platform (cold start; used as text, stored nowhere)",
    )
    recommend.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of text")
    recommend.set_defaults(run=_recommend)

    serve = commands.add_parser(
        "serve", help="one platform's recommendations over HTTP: a JSON API and a page at /"
    )
    _add_served_platform(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port, 1-65535 (default 8000)")
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="the operator token (0600; made if missing; default: the platform state folder's "
        "serve.token); user tokens are derived from it (docs/serving.md)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="answer every caller as the operator, without a token (loopback hosts only)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header to accept besides 127.0.0.1, localhost and --host "
        "(the name a gateway or browser uses; repeatable)",
    )
    serve.add_argument(
        "--openapi", action="store_true", help="serve the API schema at /openapi.json"
    )
    serve.set_defaults(run=_serve)


def _add_served_platform(parser: argparse.ArgumentParser) -> None:
    """A finished run and the platform whose recommendations it gives (recommend, serve)."""
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--platform", required=True, help="the platform to recommend on")
    parser.add_argument(
        "--platform-state",
        metavar="DIR",
        help="the platform's state folder (default: the run's dp.state_dir/PLATFORM)",
    )


@contextlib.contextmanager
def still_loading(what: str, every: float = LOADING_NOTICE_EVERY) -> Iterator[None]:
    """Prints ``[fedfuse] WHAT: N s so far`` every ``every`` seconds while the block runs; a
    block shorter than that prints nothing. The block's own output follows only after it."""
    done = threading.Event()
    started = time.monotonic()

    def speak() -> None:
        while not done.wait(every):
            print(f"[fedfuse] {what}: {time.monotonic() - started:.0f} s so far", flush=True)

    speaker = threading.Thread(target=speak, daemon=True)
    speaker.start()
    try:
        yield
    finally:
        done.set()
        speaker.join()


def _loading(args: argparse.Namespace) -> str:
    return f"loading {args.platform} from {args.run_dir} (model, data, item vectors)"


def _recommend(args: argparse.Namespace) -> None:
    import json

    if bool(args.user) == bool(args.history):
        raise FedFuseError("give either --user or --history")
    # with --json, stdout is the document alone
    notice = contextlib.nullcontext() if args.json else still_loading(_loading(args))
    with notice:
        from server.serving.recommender import Recommender  # torch, transformers, peft: 15 s

        recommender = Recommender(args.run_dir, args.platform, args.platform_state)
    if args.json:
        document = recommender.document(args.user, args.history, args.k)
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return
    shown, recommendations = recommender.request(args.user, args.history, args.k)
    who = f"user {args.user}" if args.user else "the liked titles given"
    print(f"Top {len(recommendations)} on {args.platform} for {who}")
    liked = "; ".join(
        recommender.title(h) + ("" if h.row is not None else " (from elsewhere)") for h in shown
    )
    print(f"history, newest first: {liked or '(none: popularity only)'}\n")
    for rank, item in enumerate(recommendations, start=1):
        print(f"{rank:2d}. {item.title}  [score {item.score:.3f}]")
        print(f"    {item.explanation()}")


def _serve(args: argparse.Namespace) -> None:
    """Checks what can fail fast (the host and --insecure-no-auth, the port) before the run
    is loaded, then the token, then serves until interrupted."""
    import ipaddress
    from pathlib import Path

    from server.serving.access import TOKEN_FILE, Tokens, read_or_create_token
    from server.serving.listener import is_loopback, listen, serve

    if args.insecure_no_auth and not is_loopback(args.host):
        raise FedFuseError(
            f"--insecure-no-auth answers anyone who connects: loopback only, not {args.host}"
        )
    sock = listen(args.host, args.port)
    try:
        with still_loading(_loading(args)):
            from server.serving.http_app import LOOPBACK_NAMES, create_app
            from server.serving.recommender import Recommender

            recommender = Recommender(args.run_dir, args.platform, args.platform_state)
        tokens = None
        if not args.insecure_no_auth:
            path = Path(args.token_file) if args.token_file else recommender.state / TOKEN_FILE
            token, made = read_or_create_token(path)
            print(f"operator token {'made in' if made else 'read from'} {path} (keep it secret)")
            tokens = Tokens(token)
        hosts = [*LOOPBACK_NAMES, *args.allowed_host]
        try:
            wildcard = ipaddress.ip_address(args.host).is_unspecified
        except ValueError:  # a name
            wildcard = False
        if not wildcard and args.host not in hosts:
            hosts.append(args.host)
        app = create_app(recommender, tokens, hosts, openapi=args.openapi)
        size = f"{len(recommender.data.item_text)} items, {len(recommender.users)} users"
        mode = "NO AUTHENTICATION (loopback)" if tokens is None else "bearer tokens"
        print(f"serving {args.platform} ({size}; {mode}) at http://{args.host}:{args.port}/")
        serve(app, sock)
    finally:
        sock.close()
