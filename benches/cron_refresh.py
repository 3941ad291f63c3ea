#!/usr/bin/env python3
"""The baseline of acutoken's catch-up benchmark: refresh tokens renewed the
way a cron job would, with nothing but the standard library.

    cron_refresh.py DB seed < ROWS   create the table and insert ROWS, one per
                                     line: name, token URL, client id, client
                                     secret, refresh token (tab-separated)
    cron_refresh.py DB run [WORKERS] refresh every due row (64 workers)

`run` reads the due rows, POSTs grant_type=refresh_token with the client's id
and secret in the body (client_secret_post, as acutoken sends it) to each
token URL from a thread pool, and commits each new refresh token in its own
transaction (WAL, synchronous=FULL) as its answer arrives. It prints one JSON
line: {"due": N, "ok": N, "failed": N}. Secrets are stored in plain text:
this is the script acutoken is measured against, not a way to run it.
`benches/scale` (`scale catchup64`) seeds it and runs it against the same
simulator as the daemon.
"""

import concurrent.futures
import json
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (
    name TEXT PRIMARY KEY,
    token_url TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret TEXT NOT NULL,
    refresh_token TEXT NOT NULL,
    next_refresh_at REAL NOT NULL,
    last_refresh_at REAL,
    last_error TEXT
)"""

# When a renewed connection is due again (a daily cron run would pick it up).
NEXT_AFTER_S = 12 * 3600


def open_db(path):
    # Autocommit: every statement below is its own transaction.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=10000")
    db.execute(SCHEMA)
    return db


def seed(db, lines):
    rows = []
    for n, line in enumerate(lines, 1):
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 5:
            sys.exit(f"error: line {n} has {len(fields)} fields, not 5 (name, url, id, secret, token)")
        rows.append((*fields, 0.0))
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO connections (name, token_url, client_id, client_secret, refresh_token,"
        " next_refresh_at) VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.execute("COMMIT")
    print(json.dumps({"seeded": len(rows)}))


def refresh(url, client_id, secret, token):
    body = urllib.parse.urlencode(
        {
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": secret,
            "refresh_token": token,
        }
    ).encode()
    req = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as answer:
        return json.load(answer)


def run(db, workers):
    now = time.time()
    due = db.execute(
        "SELECT name, token_url, client_id, client_secret, refresh_token FROM connections"
        " WHERE next_refresh_at <= ?",
        (now,),
    ).fetchall()
    ok = failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(refresh, *row[1:]): row[0] for row in due}
        for done in concurrent.futures.as_completed(pending):
            name = pending[done]
            try:
                grant = done.result()
                token = grant["refresh_token"]
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                failed += 1
                db.execute(
                    "UPDATE connections SET last_error = ? WHERE name = ?",
                    (f"{type(e).__name__}: {e}", name),
                )
                continue
            at = time.time()
            db.execute(
                "UPDATE connections SET refresh_token = ?, last_refresh_at = ?,"
                " next_refresh_at = ?, last_error = NULL WHERE name = ?",
                (token, at, at + NEXT_AFTER_S, name),
            )
            ok += 1
    print(json.dumps({"due": len(due), "ok": ok, "failed": failed}))


def main():
    if len(sys.argv) < 3 or sys.argv[2] not in ("seed", "run"):
        sys.exit(__doc__)
    db = open_db(sys.argv[1])
    if sys.argv[2] == "seed":
        seed(db, sys.stdin)
    else:
        run(db, int(sys.argv[3]) if len(sys.argv) > 3 else 64)


if __name__ == "__main__":
    main()
