#!/usr/bin/env node
// A backend service written for socket.io's Redis emitter, as the tests run it against a
// real Redis:
//
//   node emit.js <redis port> <emitter package> messaging      # the Messaging service's call
//   node emit.js <redis port> <emitter package> ticks <n> <room>  # `tick` 0..n-1 to one room
//
// It prints `done` once Redis has taken every message.

'use strict';

const redis = require('redis');

const [port, version, scenario, ...rest] = process.argv.slice(2);
const client = redis.createClient({ port: Number(port), host: '127.0.0.1' });
client.on('error', (e) => {
  console.error(e.message);
  process.exit(1);
});
const mod = require(version);
const io = mod.Emitter ? new mod.Emitter(client) : mod(client);

if (scenario === 'messaging') {
  io.in('user(1)').emit('message', new Date('2026-12-02T10:00:00.000Z'));
} else if (scenario === 'ticks') {
  const [n, room] = rest;
  for (let i = 0; i < Number(n); i++) io.to(room).emit('tick', i);
} else {
  console.error(`unknown scenario ${scenario}`);
  process.exit(2);
}
// QUIT is answered after every PUBLISH before it.
client.quit(() => console.log('done'));
