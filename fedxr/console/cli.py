"""`fedxr console …`: serve the web application, and manage its users."""

from __future__ import annotations

import argparse
import getpass
import sys

from fedxr.errors import FedxrError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_DB = ".fedxr/console.sqlite"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, help=f"the console's user database (default {DEFAULT_DB})")
    p.add_argument("--runs", default="runs", help="run folders to show (what `fedxr run` writes)")
    p.add_argument("--exports", default="export", help="export folders to list and serve")
    p.add_argument("--recipes", default="recipes", help="recipes a coordinator may start")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--startup-kit", help="an NVFlare admin startup kit: also show the federation's jobs and sites")
    p.add_argument("--tls-cert", help="certificate (PEM) for HTTPS, e.g. the one NVFlare provisioned for this site")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--insecure-http", action="store_true", help="serve plain HTTP on a non-loopback address")
    p.set_defaults(func=serve)
    sub = p.add_subparsers(dest="console_command", metavar="ACTION")
    # --db may also follow the action (`fedxr console add-user bob --db X`).
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", default=argparse.SUPPRESS, help="the console's user database")
    a = sub.add_parser("add-user", parents=[db], help="add a user (the password is asked for, or read with --password-stdin)")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=["coordinator", "hospital"])
    a.add_argument("--site", help="for --role hospital: the site this user belongs to (e.g. site-1)")
    a.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    a.set_defaults(func=add_user)
    sub.add_parser("list-users", parents=[db], help="users, roles and sites").set_defaults(func=list_users)
    r = sub.add_parser("remove-user", parents=[db], help="remove a user and end their sessions")
    r.add_argument("name")
    r.set_defaults(func=remove_user)


def _store(args):
    try:
        from fedxr.console.store import Store
    except ModuleNotFoundError as exc:
        raise FedxrError(f"the console needs its extra (module {exc.name!r} is missing): pip install 'fedxr[console]'") from None
    return Store(args.db)


def add_user(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise FedxrError("the two passwords differ; nothing was changed")
    user = store.add_user(args.name, args.role, password, args.site)
    print(f"added {user.name} ({user.role}{', ' + user.site if user.site else ''}) to {args.db}")
    return 0


def list_users(args: argparse.Namespace) -> int:
    users = _store(args).list_users()
    for u in users:
        print(f"{u.name:<32}{u.role:<13}{u.site or ''}")
    if not users:
        print(f"no users in {args.db}; add one with `fedxr console add-user NAME --role coordinator`")
    return 0


def remove_user(args: argparse.Namespace) -> int:
    _store(args).remove_user(args.name)
    print(f"removed {args.name}")
    return 0


def serve(args: argparse.Namespace) -> int:
    if args.host not in LOOPBACK and not (args.tls_cert and args.tls_key) and not args.insecure_http:
        raise FedxrError(f"--host {args.host} makes the console reachable from other machines: give --tls-cert and "
                         "--tls-key (the certificate NVFlare provisioned for this site will do), or --insecure-http")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise FedxrError("--tls-cert and --tls-key go together")
    store = _store(args)
    if not store.list_users():
        raise FedxrError(f"no users in {args.db}: add one first, e.g. "
                         "`fedxr console add-user alice --role coordinator` (there are no default accounts)")
    try:
        import uvicorn

        from fedxr.console.app import create_app
    except ModuleNotFoundError as exc:
        raise FedxrError(f"the console needs its extra (module {exc.name!r} is missing): pip install 'fedxr[console]'") from None
    app = create_app(args.runs, args.db, args.exports, args.recipes, args.startup_kit, secure_cookies=bool(args.tls_cert),
                     warm_up=True)
    scheme = "https" if args.tls_cert else "http"
    print(f"fedxr console on {scheme}://{args.host}:{args.port}/  (runs: {args.runs}, models: {args.exports}; Ctrl-C stops)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                    log_level="warning", limit_concurrency=64, timeout_keep_alive=5)
    finally:
        app.state.console.launcher.stop()
    return 0
