#!/usr/bin/env python3
"""Drive an MCP server with the official Python SDK client and print what it saw as JSON.

  python py_client.py [--mode auto|legacy] [--call NAME --args JSON [--cancel-after SECONDS]] [--read URI] [--progress] [--token T] [--log-level LEVEL]
                      [--sampling-reply TEXT] [--elicit-accept JSON] [--roots URI,...] -- COMMAND ARGS...
  python py_client.py [options] -- http://127.0.0.1:PORT/mcp    (or .../sse for legacy HTTP+SSE)

Connects over stdio, or Streamable HTTP for a URL (auto mode probes `server/discover` first, as the SDK does by default),
lists tools, prompts and resources, optionally calls one tool and reads one resource, and
prints one JSON object. Exits non-zero when any step fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters, types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


def parse() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: py_client.py [options] -- COMMAND ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--call")
    parser.add_argument("--args", default="{}")
    parser.add_argument("--repeat", type=int, default=1, help="make the call this many times; report the last")
    parser.add_argument("--read")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--cancel-after", type=float, help="give up the call after this many seconds (a cancel)")
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--token")
    parser.add_argument("--log-level", help="2026-07-28: ask for log messages at or above this level with each request")
    parser.add_argument("--sampling-reply", help="declare sampling; answer every request with this text")
    parser.add_argument("--elicit-accept", help="declare elicitation; accept every request with this JSON content")
    parser.add_argument("--roots", help="declare roots; answer roots/list with these comma-separated URIs")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def block(b: Any) -> dict[str, Any]:
    data = b.model_dump(by_alias=True, exclude_none=True)
    for key in ("data", "blob"):
        if key in data:
            data[key] = f"<{len(data[key])} chars>"
    return data


async def run(ns: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    env = dict(item.split("=", 1) for item in ns.env) or None
    headers = {"Authorization": f"Bearer {ns.token}"} if ns.token else None
    if len(command) == 1 and command[0].startswith("http") and command[0].rstrip("/").endswith("/sse"):
        # A URL ending in /sse: the legacy HTTP+SSE transport.
        target = sse_client(command[0], headers=headers)
    elif len(command) == 1 and command[0].startswith("http"):
        # Any other URL: Streamable HTTP, with an optional bearer token.
        target = streamable_http_client(command[0], http_client=httpx2.AsyncClient(headers=headers))
    else:
        target = StdioServerParameters(command=command[0], args=command[1:], env=env)
    out: dict[str, Any] = {"progress": 0, "sampling": 0, "elicitation": 0, "roots": 0, "logging": 0}
    kwargs: dict[str, Any] = {"mode": ns.mode, "read_timeout_seconds": 60}
    if ns.log_level:
        kwargs["log_level"] = ns.log_level
    if ns.sampling_reply is not None:
        async def sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            out["sampling"] += 1
            return types.CreateMessageResult(
                role="assistant",
                content=types.TextContent(type="text", text=ns.sampling_reply),
                model="py-client-test-model",
                stop_reason="endTurn",
            )

        kwargs["sampling_callback"] = sampling
    if ns.elicit_accept is not None:
        accept = json.loads(ns.elicit_accept)

        async def elicitation(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
            out["elicitation"] += 1
            return types.ElicitResult(action="accept", content=accept)

        kwargs["elicitation_callback"] = elicitation
    if ns.roots:
        roots = [types.Root(uri=uri, name=uri.rsplit("/", 1)[-1] or uri) for uri in ns.roots.split(",")]

        async def list_roots(ctx: Any) -> types.ListRootsResult:
            out["roots"] += 1
            return types.ListRootsResult(roots=roots)

        kwargs["list_roots_callback"] = list_roots

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        out["logging"] += 1

    kwargs["logging_callback"] = on_log
    async with Client(target, **kwargs) as client:
        out["protocol_version"] = client.session.protocol_version
        info = client.server_info
        out["server_name"] = info.name if info else None
        tools = await client.list_tools()
        out["tools"] = [tool.name for tool in tools.tools]
        prompts = await client.list_prompts()
        out["prompts"] = [prompt.name for prompt in prompts.prompts]
        resources = await client.list_resources()
        out["resources"] = [resource.uri for resource in resources.resources]
        if ns.call:
            async def progress(done: float, total: float | None, message: str | None) -> None:
                out["progress"] += 1

            call = client.call_tool(
                ns.call, json.loads(ns.args), progress_callback=progress if ns.progress else None
            )
            if ns.cancel_after is not None:
                # The SDK's own way to give up a call: its task is cancelled (a 2026-07-28
                # client over Streamable HTTP then closes the request's response stream).
                with anyio.move_on_after(ns.cancel_after) as scope:
                    await call
                out["cancelled"] = scope.cancelled_caught
                # Still connected: the cancel must reach the server before the client goes.
                await anyio.sleep(1)
                return out
            result = await call
            for _ in range(ns.repeat - 1):
                result = await client.call_tool(ns.call, json.loads(ns.args))
            out["call"] = {
                "isError": result.is_error,
                "content": [block(b) for b in result.content],
                "structuredContent": result.structured_content,
            }
        if ns.read:
            read = await client.read_resource(ns.read)
            out["read"] = [c.model_dump(by_alias=True, exclude_none=True) for c in read.contents]
    return out


def main() -> int:
    ns, command = parse()
    try:
        out = anyio.run(run, ns, command)
    except BaseException as error:  # report everything, including exception groups
        print(json.dumps({"error": repr(error)}))
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
