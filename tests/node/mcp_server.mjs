// A test MCP server built with the official TypeScript SDK, the way its documentation shows:
// createMcpExpressApp() (express.json() body parsing, localhost Host validation) and a
// stateless StreamableHTTPServerTransport per request, with low-level request handlers.
//
// Every handler accepts ANY name and records what it executed, so a test can tell which
// hostile request bodies made this server run a tool:
//   POST /mcp            MCP streamable HTTP (stateless: no Mcp-Session-Id)
//   GET  /calls?tag=T    the executed calls, as [{method, name, tag}], of requests that
//                        carried the header `x-test-tag: T` (all of them without ?tag)
//   GET  /requests?tag=T every HTTP request that reached this server, as [{method, url, tag}],
//                        recorded before Express sees it (so also those it refuses to parse)
// Each executed call is also written to stdout as one JSON line: {"executed": {...}}.
//
// Usage: node mcp_server.mjs PORT        (listens on 127.0.0.1:PORT, then prints a ready line)

import { createServer } from 'node:http';

import { createMcpExpressApp } from '@modelcontextprotocol/sdk/server/express.js';
import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import {
    CallToolRequestSchema,
    GetPromptRequestSchema,
    ListPromptsRequestSchema,
    ListResourcesRequestSchema,
    ListToolsRequestSchema,
    ReadResourceRequestSchema
} from '@modelcontextprotocol/sdk/types.js';

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
    console.error('usage: node mcp_server.mjs PORT');
    process.exit(2);
}

const executed = [];
const requests = [];

function tagOf(headers) {
    return typeof headers['x-test-tag'] === 'string' ? headers['x-test-tag'] : '';
}

function record(method, name, extra) {
    const tag = tagOf(extra?.requestInfo?.headers ?? {});
    const call = { method, name: typeof name === 'string' ? name : JSON.stringify(name ?? ''), tag };
    executed.push(call);
    process.stdout.write(JSON.stringify({ executed: call }) + '\n');
}

function buildServer() {
    const server = new Server(
        { name: 'authz-gateway-ts-test-server', version: '1.0.0' },
        { capabilities: { tools: {}, prompts: {}, resources: {} } }
    );
    server.setRequestHandler(ListToolsRequestSchema, async (request, extra) => {
        record(request.method, '', extra);
        return { tools: [] };
    });
    server.setRequestHandler(CallToolRequestSchema, async (request, extra) => {
        record(request.method, request.params.name, extra);
        return { content: [{ type: 'text', text: `ran ${request.params.name}` }] };
    });
    server.setRequestHandler(ListPromptsRequestSchema, async (request, extra) => {
        record(request.method, '', extra);
        return { prompts: [] };
    });
    server.setRequestHandler(GetPromptRequestSchema, async (request, extra) => {
        record(request.method, request.params.name, extra);
        return { messages: [] };
    });
    server.setRequestHandler(ListResourcesRequestSchema, async (request, extra) => {
        record(request.method, '', extra);
        return { resources: [] };
    });
    server.setRequestHandler(ReadResourceRequestSchema, async (request, extra) => {
        record(request.method, request.params.uri, extra);
        return { contents: [] };
    });
    return server;
}

const app = createMcpExpressApp();

app.post('/mcp', async (req, res) => {
    // Stateless: a new server and transport for each request, as the SDK's examples do.
    const server = buildServer();
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    res.on('close', () => {
        transport.close();
        server.close();
    });
    try {
        await server.connect(transport);
        await transport.handleRequest(req, res, req.body);
    } catch (error) {
        if (!res.headersSent) {
            res.status(500).json({ jsonrpc: '2.0', error: { code: -32603, message: String(error) }, id: null });
        }
    }
});

function byTag(records, req) {
    const tag = typeof req.query.tag === 'string' ? req.query.tag : undefined;
    return tag === undefined ? records : records.filter(record => record.tag === tag);
}

app.get('/calls', (req, res) => {
    res.json(byTag(executed, req));
});

app.get('/requests', (req, res) => {
    res.json(byTag(requests, req));
});

// The Express app is a plain request listener: record each request before it runs.
const listener = createServer((req, res) => {
    if (!req.url.startsWith('/calls') && !req.url.startsWith('/requests')) {
        requests.push({ method: req.method, url: req.url, tag: tagOf(req.headers) });
    }
    app(req, res);
});
listener.on('error', error => {
    console.error(`listen failed: ${error}`);
    process.exit(1);
});
listener.listen(port, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({ ready: `http://127.0.0.1:${port}/mcp` }) + '\n');
});

for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
        listener.close();
        process.exit(0);
    });
}
