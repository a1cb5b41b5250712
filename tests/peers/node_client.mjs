// Drive an MCP server with the official TypeScript SDK client (v1 `@modelcontextprotocol/sdk`
// or v2 `@modelcontextprotocol/client`) and print what it saw as JSON.
//
//   node node_client.mjs --sdk v1|v2 [--mode legacy|auto] [--call NAME --args JSON [--stream 1]] [--progress] [--token T]
//                        [--sampling-reply TEXT] [--elicit-accept JSON] [--roots URI[,URI]] URL
//
// With --sampling-reply, --elicit-accept or --roots the client declares that capability and
// answers such requests (counted in the output); v2 answers 2026-07-28 input requests with them too.
//
// With --stream (v1) the call goes through the SDK's task client, `callToolStream`, and `stream`
// lists what it yielded (repeated `taskStatus:working` counted once).
//
// A URL ending in /sse uses the legacy HTTP+SSE transport; any other, Streamable HTTP.
// Exits non-zero when a step fails.
import path from "node:path";
import { readFile } from "node:fs/promises";
import { pathToFileURL, fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const peers = process.env.CONDUCTOR_PEERS || path.join(here, "../../.peers");
const modules = path.join(peers, "node/node_modules/@modelcontextprotocol");
const load = (file) => import(pathToFileURL(file).href);

async function sdk(which) {
  if (which === "v2") {
    const base = path.join(modules, "client");
    const m = await load(path.join(base, "dist/index.mjs"));
    const pkg = JSON.parse(await readFile(path.join(base, "package.json"), "utf8"));
    return { label: `@modelcontextprotocol/client ${pkg.version}`, Client: m.Client, Http: m.StreamableHTTPClientTransport,
             Sse: m.SSEClientTransport, callTool: (c, params, opts) => c.callTool(params, opts),
             onRequest: (c, method, _schemaName, fn) => c.setRequestHandler(method, fn) };
  }
  const base = path.join(modules, "sdk");
  const pkg = JSON.parse(await readFile(path.join(base, "package.json"), "utf8"));
  const types = await load(path.join(base, "dist/esm/types.js"));
  return { label: `@modelcontextprotocol/sdk ${pkg.version}`,
           onRequest: (c, _method, schemaName, fn) => c.setRequestHandler(types[schemaName], fn),
           Client: (await load(path.join(base, "dist/esm/client/index.js"))).Client,
           Http: (await load(path.join(base, "dist/esm/client/streamableHttp.js"))).StreamableHTTPClientTransport,
           Sse: (await load(path.join(base, "dist/esm/client/sse.js"))).SSEClientTransport,
           callTool: (c, params, opts) => c.callTool(params, undefined, opts) };
}

function options(argv) {
  const o = { sdk: "v1", mode: "legacy", args: "{}", progress: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--progress") o.progress = true;
    else if (a.startsWith("--")) o[a.slice(2)] = argv[++i];
    else o.url = a;
  }
  return o;
}

const o = options(process.argv.slice(2));
const out = { progress: 0, sampling: 0, elicitation: 0, roots: 0 };
try {
  const s = await sdk(o.sdk);
  out.client = s.label;
  const url = new URL(o.url);
  const requestInit = o.token ? { headers: { Authorization: `Bearer ${o.token}` } } : undefined;
  const transport = url.pathname.endsWith("/sse")
    ? new s.Sse(url, { requestInit, eventSourceInit: o.token ? { fetch: (u, init) => fetch(u, { ...init, headers: { ...(init?.headers || {}), Authorization: `Bearer ${o.token}` } }) } : undefined })
    : new s.Http(url, { requestInit });
  const capabilities = {};
  if (o["sampling-reply"] !== undefined) capabilities.sampling = {};
  if (o["elicit-accept"] !== undefined) capabilities.elicitation = { form: {} };
  if (o.roots !== undefined) capabilities.roots = { listChanged: true };
  const clientOptions = { capabilities };
  if (o.sdk === "v2") clientOptions.versionNegotiation = { mode: o.mode };
  const client = new s.Client({ name: "conductor-node-test", version: "0.1.0" }, clientOptions);
  if (capabilities.sampling) {
    s.onRequest(client, "sampling/createMessage", "CreateMessageRequestSchema", async () => {
      out.sampling++;
      return { role: "assistant", content: { type: "text", text: o["sampling-reply"] }, model: "node-test-model", stopReason: "endTurn" };
    });
  }
  if (capabilities.elicitation) {
    const accept = JSON.parse(o["elicit-accept"]);
    s.onRequest(client, "elicitation/create", "ElicitRequestSchema", async () => {
      out.elicitation++;
      return { action: "accept", content: accept };
    });
  }
  if (capabilities.roots) {
    const roots = o.roots.split(",").map((uri) => ({ uri, name: uri.split("/").pop() || uri }));
    s.onRequest(client, "roots/list", "ListRootsRequestSchema", async () => { out.roots++; return { roots }; });
  }
  await client.connect(transport);
  out.protocol_version = client.getNegotiatedProtocolVersion?.() ?? transport.protocolVersion ?? null;
  out.server_name = client.getServerVersion?.()?.name ?? null;
  const tools = await client.listTools();
  out.tools = tools.tools.map((t) => t.name);
  out.task_tools = tools.tools.filter((t) => t.execution?.taskSupport).map((t) => `${t.name}:${t.execution.taskSupport}`);
  if (o.call && o.stream !== undefined) {
    // v1's task client: a task-augmented call when the server offers tasks and the tool takes
    // them, then `tasks/get` until it ends and `tasks/result`; every message is recorded.
    out.stream = [];
    for await (const message of client.experimental.tasks.callToolStream({ name: o.call, arguments: JSON.parse(o.args) })) {
      out.stream.push(message.type === "taskStatus" ? `taskStatus:${message.task.status}` : message.type);
      if (message.type === "result") out.call = { isError: message.result.isError ?? false, content: message.result.content };
      if (message.type === "error") out.call = { error: String(message.error) };
    }
    out.stream = out.stream.filter((type, i, all) => type !== "taskStatus:working" || all[i - 1] !== type);
  } else if (o.call) {
    const opts = o.progress ? { onprogress: () => { out.progress++; } } : {};
    const result = await s.callTool(client, { name: o.call, arguments: JSON.parse(o.args) }, opts);
    out.call = { isError: result.isError ?? false, content: result.content, structuredContent: result.structuredContent };
  }
  await client.close();
  console.log(JSON.stringify(out, null, 2));
} catch (error) {
  console.log(JSON.stringify({ error: String(error?.stack || error) }));
  process.exit(1);
}
