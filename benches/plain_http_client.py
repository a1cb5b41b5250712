#!/usr/bin/env python3
"""Calls through conductor over Streamable HTTP from a plain HTTP client (httpx, as the Python
SDK uses), one at a time: the figure rmcp's client in `gateway.rs` does not show.

  .peers/venv/bin/python benches/plain_http_client.py CONDUCTOR [CONDUCTOR...]

Each CONDUCTOR is a `conductor` binary (an earlier build copied aside, say); they are measured
in turn, twice over, in front of the test fixture `slow` (built by `cargo build --all-targets`):
a call answered as JSON, the same call with a progress token and one progress report (so an SSE
answer), a two-step `orchestrate` with a progress token, and the 2026-07-28 (stateless) forms.
Prints the p50 of 200 calls for each, in ms.
"""
from __future__ import annotations

import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx2 as httpx

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "target" / "debug" / "mcp-fixture"
CALLS = 200
META_2026 = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "0"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def serve(binary: str, config: pathlib.Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [binary, "serve", "--http", "127.0.0.1:0", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"serving Streamable HTTP at (\S+)", line)
        if found:
            # Keep reading: a full pipe would stall conductor's logging, and conductor with it.
            threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
            return process, found.group(1)
    raise SystemExit(f"{binary} did not serve")


def measure(binary: str, config: pathlib.Path) -> dict[str, float]:
    process, url = serve(binary, config)
    client = httpx.Client(
        headers={"accept": "application/json, text/event-stream", "content-type": "application/json"},
        timeout=30,
    )

    def post(body: dict, headers: dict) -> None:
        response = client.post(url, content=json.dumps(body), headers=headers)
        assert response.status_code == 200 and '"result"' in response.text, response.text

    opened = client.post(url, content=json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}))
    session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
    client.post(url, content=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), headers=session)
    stateless = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call"}

    def sleep_call(meta: dict | None, extra: dict) -> dict:
        params = {"name": "slow__sleep", "arguments": {"ms": 0, **extra}}
        if meta:
            params["_meta"] = meta
        return params

    steps = [{"id": "a", "tool": "slow__sleep", "args": {"ms": 0}},
             {"id": "b", "tool": "slow__sleep", "needs": ["a"], "args": {"ms": 0}}]
    rows = {
        "session: a call answered as JSON": (session, lambda i: sleep_call(None, {})),
        "session: with progress (an SSE answer)": (
            session, lambda i: sleep_call({"progressToken": i}, {"progress_burst": 1})),
        "session: two-step `orchestrate` with a progress token": (
            session, lambda i: {"name": "orchestrate", "_meta": {"progressToken": i}, "arguments": {"steps": steps}}),
        "2026-07-28: a call answered as JSON": (
            {**stateless, "mcp-name": "slow__sleep"}, lambda i: sleep_call(META_2026, {})),
        "2026-07-28: with progress (an SSE answer)": (
            {**stateless, "mcp-name": "slow__sleep"},
            lambda i: sleep_call({**META_2026, "progressToken": i}, {"progress_burst": 1})),
    }
    p50s = {}
    for label, (headers, params) in rows.items():
        times = []
        for i in range(CALLS + 20):
            started = time.perf_counter()
            post({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": params(i)}, headers)
            times.append(time.perf_counter() - started)
        p50s[label] = statistics.median(times[20:]) * 1000
    process.kill()
    return p50s


def main() -> None:
    binaries = sys.argv[1:]
    if not binaries:
        raise SystemExit(__doc__)
    with tempfile.TemporaryDirectory() as folder:
        config = pathlib.Path(folder) / "servers.toml"
        config.write_text(f'[servers.slow]\ncommand = "{FIXTURE}"\nargs = ["slow"]\n')
        results = {binary: [] for binary in binaries}
        for _ in range(2):
            for binary in binaries:
                results[binary].append(measure(binary, config))
    print("| call | " + " | ".join(f"`{b}` p50 ms (two runs)" for b in binaries) + " |")
    print("| --- |" + " ---: |" * len(binaries))
    for label in results[binaries[0]][0]:
        cells = [" / ".join(f"{run[label]:.2f}" for run in results[b]) for b in binaries]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
