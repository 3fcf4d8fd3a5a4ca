#!/usr/bin/env node
// Writes the golden emitter fixtures: what each installed version of socket.io's Redis
// emitter publishes (channel and bytes) for every scenario below, captured from a client
// object that records its `publish` calls. `--check` compares instead of writing, and fails
// when a checked-in fixture is not exactly what the emitter publishes.
//
//   npm ci && node generate.js          # rewrite fixtures/*.json
//   node generate.js --check            # the tests run this

'use strict';

const fs = require('fs');
const path = require('path');

const VERSIONS = [
  'socket.io-emitter-1.1',
  'socket.io-emitter-2.0',
  'socket.io-emitter-3.0',
  'socket.io-emitter-3.2',
  'redis-emitter-4.0',
  'redis-emitter-4.1',
  'redis-emitter-5.0',
  'redis-emitter-5.1',
];

const DATE = new Date('2026-12-02T10:00:00.000Z');

// Each scenario emits once; `null` where a version cannot express it (it throws).
const SCENARIOS = {
  message_date: (e) => e.in('user(1)').emit('message', DATE),
  no_args: (e) => e.to('lobby').emit('ping'),
  several_args: (e) =>
    e.to('lobby').emit('m', 1, -2, 1.5, 'two', true, false, null, { nested: { list: [1, 'x'] } }),
  undefined_arg: (e) => e.to('lobby').emit('m', undefined),
  action: (e) => e.to('user(7)').emit('action', { type: 'TODO_ADDED', payload: { id: 1, title: 'Milk' } }),
  two_rooms: (e) => e.to('user(1)').to('user(2)').emit('m', 'both'),
  except: (e) => {
    if (typeof e.except !== 'function') return null;
    return e.to('lobby').except('user(2)').emit('m', 1);
  },
  dates: (e) =>
    e.to('lobby').emit('dates', new Date(0), new Date(-1), new Date('2026-12-02T10:00:00.050Z'),
      new Date(253402300800000)),
  strings: (e) => e.to('lobby').emit('s', 'x'.repeat(40), 'y'.repeat(300), 'héllo ✓ 😀'),
  numbers: (e) => e.to('lobby').emit('n', 255, 65535, 4294967296, -129, -40000, 0.1),
  big_integer: (e) => e.to('lobby').emit('n', 2 ** 53),
  namespace: (e) => e.of('/admin').to('lobby').emit('m'),
  binary: (e) => e.to('lobby').emit('file', Buffer.from([1, 2, 3])),
  broadcast: (e) => e.emit('hello'),
  reserved: (e) => e.to('lobby').emit('disconnect'),
  unmapped: (e) => e.to('has space').emit('m'),
};

function capture(version) {
  const published = [];
  const client = {
    hset() {},
    on() {},
    publish(channel, message) {
      published.push({ channel, bytes: Buffer.from(message).toString('hex') });
    },
  };
  const mod = require(version);
  const make = mod.Emitter ? () => new mod.Emitter(client) : () => mod(client);
  const messages = [];
  for (const [scenario, run] of Object.entries(SCENARIOS)) {
    published.length = 0;
    try {
      if (run(make()) === null) continue;
    } catch (e) {
      continue; // this version refuses it (a reserved event name)
    }
    for (const p of published) messages.push({ scenario, ...p });
  }
  const { version: v, name } = require(`${version}/package.json`);
  return { package: `${name}@${v}`, messages };
}

const check = process.argv.includes('--check');
const dir = path.join(__dirname, 'fixtures');
let failed = 0;
for (const version of VERSIONS) {
  const file = path.join(dir, `${version}.json`);
  const text = JSON.stringify(capture(version), null, 1) + '\n';
  if (!check) {
    fs.writeFileSync(file, text);
    continue;
  }
  const have = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  if (have !== text) {
    console.error(`${path.relative(process.cwd(), file)} is not what ${version} publishes`);
    failed++;
  }
}
if (failed) process.exit(1);
console.log(`${VERSIONS.length} emitter versions: fixtures ${check ? 'match' : 'written'}`);
