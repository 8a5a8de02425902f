"""The console's embedded store (SQLite): users, sessions, sign-in failures and the audit log.

Passwords are argon2id hashes (argon2-cffi). A session is a random token held by the browser in an
HttpOnly cookie; the database keeps only its SHA-256, with the user, a CSRF token and an expiry, so a
copy of the database signs nobody in. Five failed sign-ins for one user within 15 minutes lock that user
for 15 minutes. There are no default users: `fedxr console add-user` creates them.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedxr.errors import FedxrError

ROLES = ("coordinator", "hospital")
MAX_FAILURES, LOCK_WINDOW_S = 5, 15 * 60
SESSION_TTL_S = 12 * 3600
MIN_PASSWORD = 10
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, site TEXT, hash TEXT NOT NULL,
                                  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (token_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL,
                                     expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS failures (user TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (at REAL NOT NULL, user TEXT, event TEXT NOT NULL, detail TEXT, client TEXT);
"""


class LockedOut(FedxrError):
    """Too many failed sign-ins; ``seconds`` until the user may try again."""

    def __init__(self, user: str, seconds: int):
        self.seconds = seconds
        super().__init__(f"too many failed sign-ins for {user!r}; try again in {max(1, seconds // 60)} minute(s)")


@dataclass(frozen=True)
class User:
    name: str
    role: str
    site: str | None

    @property
    def is_coordinator(self) -> bool:
        return self.role == "coordinator"


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """Thread-safe access to the console database (one connection, serialised)."""

    def __init__(self, path: str | Path):
        from argon2 import PasswordHasher

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._sign_in_lock = threading.Lock()
        self._hasher = PasswordHasher()  # argon2id with the library's recommended parameters

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
            self._db.commit()
            return rows

    # --- users ----------------------------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str, site: str | None = None) -> User:
        if not _NAME.match(name):
            raise FedxrError(f"user name {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
        if role not in ROLES:
            raise FedxrError(f"--role {role!r}: use one of {', '.join(ROLES)}")
        if role == "hospital" and not site:
            raise FedxrError("a hospital user needs --site SITE (e.g. --site site-1): it sees that site's page only")
        if len(password) < MIN_PASSWORD:
            raise FedxrError(f"the password must have at least {MIN_PASSWORD} characters")
        if self.get_user(name):
            raise FedxrError(f"user {name!r} exists; remove it first (`fedxr console remove-user {name}`)")
        self._run("INSERT INTO users VALUES (?, ?, ?, ?, ?)",
                  (name, role, site if role == "hospital" else None, self._hasher.hash(password), time.time()))
        self.audit(name, "user-added", f"role {role}" + (f", site {site}" if site else ""))
        return User(name, role, site if role == "hospital" else None)

    def get_user(self, name: str) -> User | None:
        rows = self._run("SELECT name, role, site FROM users WHERE name = ?", (name,))
        return User(*rows[0]) if rows else None

    def list_users(self) -> list[User]:
        return [User(*r) for r in self._run("SELECT name, role, site FROM users ORDER BY name")]

    def remove_user(self, name: str) -> None:
        if not self.get_user(name):
            raise FedxrError(f"no user {name!r}; `fedxr console list-users` shows them")
        self._run("DELETE FROM users WHERE name = ?", (name,))
        self._run("DELETE FROM sessions WHERE user = ?", (name,))
        self.audit(name, "user-removed")

    # --- signing in -----------------------------------------------------------------------------------
    def sign_in(self, name: str, password: str, client: str = "") -> tuple[str, Session]:
        """A new session token (for the cookie) and the session; raises LockedOut or FedxrError. One sign-in at
        a time, so that parallel attempts cannot slip past the lock-out count."""
        if not _NAME.match(name or "") or len(password) > 1024:
            raise FedxrError("wrong user name or password")
        with self._sign_in_lock:
            return self._sign_in(name, password, client)

    def _sign_in(self, name: str, password: str, client: str) -> tuple[str, Session]:
        now = time.time()
        self._run("DELETE FROM failures WHERE at < ?", (now - LOCK_WINDOW_S,))
        recent = self._run("SELECT at FROM failures WHERE user = ? AND at > ? ORDER BY at", (name, now - LOCK_WINDOW_S))
        if len(recent) >= MAX_FAILURES:
            self.audit(name, "sign-in-refused", "locked", client)
            raise LockedOut(name, int(recent[-1][0] + LOCK_WINDOW_S - now))
        row = self._run("SELECT hash FROM users WHERE name = ?", (name,))
        ok = False
        if row:
            from argon2.exceptions import VerificationError

            try:
                ok = self._hasher.verify(row[0][0], password)
            except VerificationError:
                ok = False
        else:
            self._hasher.hash(password)  # the same work for an unknown name: timing does not tell names apart
        if not ok:
            self._run("INSERT INTO failures VALUES (?, ?)", (name, now))
            self.audit(name, "sign-in-failed", None, client)
            raise FedxrError("wrong user name or password")
        self._run("DELETE FROM failures WHERE user = ?", (name,))
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._run("INSERT INTO sessions VALUES (?, ?, ?, ?)", (_sha(token), name, csrf, now + SESSION_TTL_S))
        self.audit(name, "sign-in", None, client)
        user = self.get_user(name)
        assert user is not None  # its password was just checked against its row
        return token, Session(user, csrf)

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        rows = self._run("SELECT user, csrf, expires FROM sessions WHERE token_sha256 = ?", (_sha(token),))
        if not rows or rows[0][2] < time.time():
            return None
        user = self.get_user(rows[0][0])
        return Session(user, rows[0][1]) if user else None

    def sign_out(self, token: str | None) -> None:
        if token:
            rows = self._run("SELECT user FROM sessions WHERE token_sha256 = ?", (_sha(token),))
            self._run("DELETE FROM sessions WHERE token_sha256 = ?", (_sha(token),))
            if rows:
                self.audit(rows[0][0], "sign-out")

    # --- audit ----------------------------------------------------------------------------------------
    def audit(self, user: str | None, event: str, detail: str | None = None, client: str = "") -> None:
        self._run("INSERT INTO audit VALUES (?, ?, ?, ?, ?)", (time.time(), user, event, detail, client))

    def audit_log(self, limit: int = 100) -> list[dict]:
        rows = self._run("SELECT at, user, event, detail, client FROM audit ORDER BY at DESC LIMIT ?", (limit,))
        return [dict(zip(("at", "user", "event", "detail", "client"), r)) for r in rows]
