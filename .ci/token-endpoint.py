#!/usr/bin/env python3
"""A token endpoint for the boot test (.ci/boot): Acumatica's
POST /identity/connect/token for the refresh_token grant, on the host's
loopback, which the nspawn guest shares.

Every answer rotates the refresh token (rt-1, rt-2, ...) and comes after
--delay seconds, so the guest can lock the store while a refresh is in
flight. Only the newest refresh token is accepted: one already presented is
refused with invalid_grant, as Acumatica does, and logged as a replay (the
daemon must never resend one). Each request is logged on arrival and each
answer when sent, one JSON object a line, to --log; the guest reads it.

Usage: token-endpoint.py --initial TOKEN --log FILE --port-file FILE [--delay S]
The port (chosen by the kernel) is written to --port-file once listening.
"""

import argparse
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--initial", required=True, help="the refresh token the connection starts with")
    p.add_argument("--log", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--delay", type=float, default=3.0)
    args = p.parse_args()

    lock = threading.Lock()
    state = {"live": args.initial, "seen": set(), "issued": 0}
    log_file = open(args.log, "a", buffering=1, encoding="utf-8")

    def log(**entry):
        entry["at"] = round(time.time(), 3)
        with lock:
            log_file.write(json.dumps(entry, sort_keys=True) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass  # the JSON log says everything

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            grant = form.get("grant_type", [""])[0]
            presented = form.get("refresh_token", [""])[0]
            path = self.path.split("?")[0]
            # Decided on arrival, under the lock: a resend in flight at the
            # same time is a replay too.
            with lock:
                if path != "/identity/connect/token" or grant != "refresh_token":
                    outcome, issued = "unsupported", None
                elif presented in state["seen"]:
                    outcome, issued = "replay", None
                elif presented != state["live"]:
                    outcome, issued = "unknown", None
                else:
                    state["seen"].add(presented)
                    state["issued"] += 1
                    issued = "rt-%d" % state["issued"]
                    state["live"] = issued
                    outcome = "rotated"
            log(event="request", path=path, grant_type=grant, refresh_token=presented, outcome=outcome)
            time.sleep(args.delay)
            if issued is None:
                self.answer(400, {"error": "invalid_grant" if grant == "refresh_token" else "unsupported_grant_type"})
                log(event="answer", status=400, refresh_token=presented)
                return
            self.answer(200, {
                "access_token": "at-%s" % issued,
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": issued,
                "scope": "api offline_access",
            })
            log(event="answer", status=200, refresh_token=presented, issued=issued)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = args.port_file + ".part"
    with open(tmp, "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.rename(tmp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
