#!/usr/bin/env node
// A command-line client for aimesh's Inference service, on @grpc/grpc-js with the
// @grpc/grpc-js-xds plugin registered: the target may be a plain address
// (127.0.0.1:PORT, dns:///host:port) or an xDS name (xds:///NAME, with a bootstrap file
// named by GRPC_XDS_BOOTSTRAP).
//
// Output, on stdout, one JSON object a line:
//   {"event":"ready"}                      once: the channel is READY (or a call succeeded)
//   {"t":..,"instance":..,"code":0,"ms":..} one per call, when it ends; `t` is the end time
//                                          in epoch ms, `instance` the `aimesh-instance`
//                                          trailer (null when absent), `ms` the latency;
//                                          streams add `tokens` and `chunks`; failed calls
//                                          add `details`
//   {"event":"summary","counts":{instance:n},"errors":{code:n},"calls":N}
//                                          last: successes per instance, failures per
//                                          status code, calls made
// Errors and diagnostics go to stderr (each distinct failure once). The exit code is 0
// when the run finished (whatever the calls' statuses), 2 for bad arguments, 1 when the
// client could not start (for an xds: target, also when the xDS bootstrap is missing or
// invalid: stderr then says why).
//
// --calls 0 runs until stdin closes or SIGTERM/SIGINT; then no new call starts, the ones in
// flight finish (bounded by their deadline), and the summary is printed. A second signal
// cancels the calls in flight.
'use strict';

const path = require('path');
const { parseArgs } = require('util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
require('@grpc/grpc-js-xds').register();

// AIMESH_CACHE_ORCA_PROTO=1: parse grpc-js's orca.proto once. grpc-js 1.14.7 parses it again
// for every call that ends under weighted_round_robin (build/src/orca.js: loadOrcaProto()
// never sets its `loadedOrcaProto` cache), tens of ms of CPU per call on the event loop,
// which caps a WRR client at a few dozen calls a second. Weights and picks are unchanged.
if (process.env.AIMESH_CACHE_ORCA_PROTO === '1') {
  const loadSync = protoLoader.loadSync;
  const parsed = new Map();
  protoLoader.loadSync = (file, options) => {
    if (file !== 'xds/service/orca/v3/orca.proto') return loadSync(file, options);
    const key = JSON.stringify(options);
    if (!parsed.has(key)) parsed.set(key, loadSync(file, options));
    return parsed.get(key);
  };
}

const USAGE = `usage: node client.js --target TARGET [options]
  --target T          127.0.0.1:PORT, dns:///host:port or xds:///NAME (required)
  --calls N           calls to make; 0 = until stdin closes or SIGTERM (default 1)
  --concurrency C     calls in flight at once (default 1)
  --method M          Generate or GenerateStream (default Generate)
  --model M           model to ask for (default gpt-4)
  --prompt TEXT       the user message (default "Why use a service mesh?")
  --max-tokens N      max_tokens of each request; 0 = backend default (default 0)
  --deadline-ms MS    per-call deadline (default 10000)
  --interval-ms MS    pause between one worker's calls (default 0)
  --header K=V        request metadata, repeatable (for xDS header-matching routes)
  --wait-for-ready    queue calls while the channel is not ready instead of failing them
  --protos DIR        include path of the .proto files (default: the repo's protos/)`;

const METHODS = ['Generate', 'GenerateStream'];
const INSTANCE_TRAILER = 'aimesh-instance';
const ERROR_PAUSE_MS = 20; // after a failed call, so a broken channel is not spun on

function fail(message) {
  process.stderr.write(`client.js: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function intOption(values, name, fallback, min) {
  const raw = values[name];
  if (raw === undefined) return fallback;
  if (!/^\d+$/.test(raw) || Number(raw) < min) fail(`--${name} must be an integer >= ${min}`);
  return Number(raw);
}

function parseOptions(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        target: { type: 'string' },
        calls: { type: 'string' },
        concurrency: { type: 'string' },
        method: { type: 'string' },
        model: { type: 'string' },
        prompt: { type: 'string' },
        'max-tokens': { type: 'string' },
        'deadline-ms': { type: 'string' },
        'interval-ms': { type: 'string' },
        header: { type: 'string', multiple: true },
        'wait-for-ready': { type: 'boolean' },
        protos: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    });
  } catch (err) {
    fail(err.message);
  }
  const v = parsed.values;
  if (v.help) {
    process.stdout.write(USAGE + '\n');
    process.exit(0);
  }
  if (!v.target) fail('--target is required');
  const method = v.method ?? 'Generate';
  if (!METHODS.includes(method)) fail(`--method must be one of ${METHODS.join(', ')}`);
  const headers = [];
  for (const h of v.header ?? []) {
    const eq = h.indexOf('=');
    if (eq <= 0) fail(`--header wants KEY=VALUE, got ${JSON.stringify(h)}`);
    headers.push([h.slice(0, eq).toLowerCase(), h.slice(eq + 1)]);
  }
  return {
    target: v.target,
    calls: intOption(v, 'calls', 1, 0),
    concurrency: intOption(v, 'concurrency', 1, 1),
    method,
    model: v.model ?? 'gpt-4',
    prompt: v.prompt ?? 'Why use a service mesh?',
    maxTokens: intOption(v, 'max-tokens', 0, 0),
    deadlineMs: intOption(v, 'deadline-ms', 10000, 1),
    intervalMs: intOption(v, 'interval-ms', 0, 0),
    headers,
    waitForReady: Boolean(v['wait-for-ready']),
    protos: v.protos ?? path.resolve(__dirname, '..', '..', 'protos'),
  };
}

function emit(obj) {
  // stdout to a pipe is synchronous on Linux: each line is out when write() returns.
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function loadInferenceClient(protos) {
  const definition = protoLoader.loadSync('aimesh/inference/v1/inference.proto', {
    includeDirs: [protos],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).aimesh.inference.v1.Inference;
}

function sleep(ms) {
  return new Promise(resolve => setTimeout(resolve, ms));
}

async function main() {
  const opts = parseOptions(process.argv.slice(2));
  if (/^xds:/i.test(opts.target)) {
    // grpc-js-xds 1.14.1 reports a missing or invalid bootstrap to the call as "Cannot read
    // properties of null (reading 'clientDefaultListenerResourceNameTemplate')" (its resolver
    // goes on after the real error): load the bootstrap here first, to say what is wrong. The
    // result is cached, so the resolver then uses the same.
    try {
      require('@grpc/grpc-js-xds/build/src/xds-bootstrap').loadBootstrapInfo();
    } catch (err) {
      process.stderr.write(`client.js: xDS bootstrap: ${err.message}\n`);
      process.exitCode = 1;
      return;
    }
  }
  let client;
  try {
    const Inference = loadInferenceClient(opts.protos);
    client = new Inference(opts.target, grpc.credentials.createInsecure());
  } catch (err) {
    process.stderr.write(`client.js: cannot create a client for ${opts.target}: ${err.message}\n`);
    process.exitCode = 1;
    return;
  }

  let ready = false;
  const markReady = () => {
    if (!ready) {
      ready = true;
      emit({ event: 'ready' });
    }
  };
  const channel = client.getChannel();
  const watch = () => {
    if (ready) return;
    const state = channel.getConnectivityState(true);
    if (state === grpc.connectivityState.READY) {
      markReady();
    } else if (state !== grpc.connectivityState.SHUTDOWN) {
      channel.watchConnectivityState(state, Infinity, watch);
    }
  };
  watch();

  const counts = {};
  const errors = {};
  const reported = new Set();
  const inflight = new Set();
  let started = 0;
  let stopping = false;

  const stop = () => {
    if (stopping) {
      for (const call of inflight) call.cancel(); // a second signal: do not wait
      return;
    }
    stopping = true;
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (opts.calls === 0) {
    process.stdin.on('end', stop);
    process.stdin.on('error', stop);
    process.stdin.resume();
  }

  const request = {
    model: opts.model,
    messages: [{ role: 'user', content: opts.prompt }],
    max_tokens: opts.maxTokens,
  };

  function callOnce() {
    return new Promise(resolve => {
      const metadata = new grpc.Metadata();
      for (const [k, val] of opts.headers) metadata.add(k, val);
      const options = { deadline: Date.now() + opts.deadlineMs, waitForReady: opts.waitForReady };
      const t0 = process.hrtime.bigint();
      let tokens = 0;
      let chunks = 0;
      let call;
      if (opts.method === 'Generate') {
        call = client.Generate(request, metadata, options, () => {}); // outcome read from 'status'
      } else {
        call = client.GenerateStream(request, metadata, options);
        call.on('data', chunk => {
          chunks += 1;
          tokens += chunk.token_count;
        });
        call.on('error', () => {}); // the status event below carries the outcome
      }
      inflight.add(call);
      call.on('status', status => {
        inflight.delete(call);
        const ms = Number(process.hrtime.bigint() - t0) / 1e6;
        const values = status.metadata ? status.metadata.get(INSTANCE_TRAILER) : [];
        const instance = values.length ? String(values[0]) : null;
        const record = { t: Date.now(), instance, code: status.code, ms: Math.round(ms * 100) / 100 };
        if (opts.method === 'GenerateStream') {
          record.tokens = tokens;
          record.chunks = chunks;
        }
        if (status.code === grpc.status.OK) {
          markReady();
          counts[instance] = (counts[instance] ?? 0) + 1;
        } else {
          record.details = status.details;
          errors[status.code] = (errors[status.code] ?? 0) + 1;
          const key = `${status.code} ${status.details}`;
          if (!reported.has(key)) {
            reported.add(key);
            process.stderr.write(
              `client.js: call failed: ${grpc.status[status.code] ?? status.code}: ${status.details}\n`
            );
          }
        }
        emit(record);
        resolve(status.code);
      });
    });
  }

  async function worker() {
    while (!stopping && (opts.calls === 0 || started < opts.calls)) {
      started += 1;
      const code = await callOnce();
      const pause = code === grpc.status.OK ? opts.intervalMs : Math.max(opts.intervalMs, ERROR_PAUSE_MS);
      if (pause > 0 && !stopping) await sleep(pause);
    }
  }

  const workers = [];
  const n = opts.calls === 0 ? opts.concurrency : Math.min(opts.concurrency, opts.calls);
  for (let i = 0; i < n; i++) workers.push(worker());
  await Promise.all(workers);

  emit({ event: 'summary', counts, errors, calls: started });
  client.close();
  process.stdin.pause();
  process.stdin.destroy();
  // Exit now: the xDS client and stdin may otherwise keep the event loop alive.
  process.exit(0);
}

main().catch(err => {
  process.stderr.write(`client.js: ${err.stack || err}\n`);
  process.exit(1);
});
