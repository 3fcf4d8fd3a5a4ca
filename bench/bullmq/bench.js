// BullMQ side of `patchbay-bench tasks`: the same no-op jobs on the same private Redis.
//
//   node bench.js <redis-url> throughput <jobs> <concurrency>
//   node bench.js <redis-url> latency <rate per second> <seconds> <concurrency>
//
// Prints one JSON line: {"jobs", "seconds", "jobsPerSec"} or {"jobs", "p50Ms", "p99Ms"}.
// Jobs are kept a day after completion (as patchbay keeps a finished task for its retention).
'use strict';

const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

const [url, mode, a, b, c] = process.argv.slice(2);
const connection = () => new IORedis(url, { maxRetriesPerRequest: null });
const keep = { removeOnComplete: { age: 86400 }, removeOnFail: { age: 86400 } };

async function throughput(jobs, concurrency) {
  const queue = new Queue('bench', { connection: connection() });
  let done = 0;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const started = process.hrtime.bigint();
  const worker = new Worker('bench', async () => null, { connection: connection(), concurrency });
  worker.on('completed', () => {
    done += 1;
    if (done === jobs) finish();
  });
  for (let i = 0; i < jobs; i += 1000) {
    const batch = [];
    for (let j = i; j < Math.min(jobs, i + 1000); j += 1) batch.push({ name: 'noop', data: { i: j }, opts: keep });
    await queue.addBulk(batch);
  }
  await finished;
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  console.log(JSON.stringify({ jobs, seconds, jobsPerSec: jobs / seconds }));
  await worker.close();
  await queue.close();
}

async function latency(rate, seconds, concurrency) {
  const queue = new Queue('bench', { connection: connection() });
  const samples = [];
  const worker = new Worker(
    'bench',
    async (job) => {
      samples.push(performance.now() - job.data.t);
      return null;
    },
    { connection: connection(), concurrency },
  );
  await worker.waitUntilReady();
  const total = Math.round(rate * seconds);
  const t0 = performance.now();
  for (let i = 0; i < total; i += 1) {
    const due = t0 + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    await queue.add('noop', { t: performance.now() }, keep);
  }
  while (samples.length < total) await new Promise((r) => setTimeout(r, 10));
  samples.sort((x, y) => x - y);
  const at = (q) => samples[Math.min(samples.length - 1, Math.floor(q * samples.length))];
  console.log(JSON.stringify({ jobs: total, p50Ms: at(0.5), p99Ms: at(0.99) }));
  await worker.close();
  await queue.close();
}

(mode === 'throughput' ? throughput(Number(a), Number(b)) : latency(Number(a), Number(b), Number(c)))
  .then(() => process.exit(0))
  .catch((e) => {
    console.error(e);
    process.exit(1);
  });
