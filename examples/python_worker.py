#!/usr/bin/env python3
"""A patchbay task worker in Python, written from the README's worker protocol alone.

    pip install redis
    python3 examples/python_worker.py --redis redis://127.0.0.1:6379 --queue exports

It runs the jobs of one queue. Its job counts to `params.steps` (default 3), reporting
progress after each step, and succeeds with {"steps": n, "worker": "python"}; with
`params.fail` it fails instead. Replace `work()` with your own.

SIGTERM or SIGINT: the running job is handed back to the queue (its attempt not counted),
the consumer deleted, and the worker exits 0.
"""

import argparse
import json
import os
import signal
import socket
import threading
import time

import redis

GROUP = "workers"


class Stale(Exception):
    """The job was given to another worker: stop it and report nothing more."""


class Cancelled(Exception):
    """A client asked to cancel the job."""


class Job:
    def __init__(self, r, prefix, task, token, lease_ms, timeout_ms):
        self.r = r
        self.key = f"{prefix}:task:{task['id']}"
        self.task = task
        self.token = token
        self.lease_ms = lease_ms
        self.deadline = time.monotonic() + timeout_ms / 1000
        self.cancel = threading.Event()
        self.stale = threading.Event()
        self.done = threading.Event()

    def renew_until_done(self):
        """Step 4: renew at least every leaseMs / 3 while the job runs."""
        every = min(self.lease_ms / 3000, 1.0)
        while not self.done.wait(every):
            try:
                answer = self.r.fcall("patchbay_renew", 1, self.key, self.token)
            except redis.ResponseError as e:
                if str(e).startswith(("STALE", "NOT_FOUND")):
                    self.stale.set()
                    return
                continue
            except (redis.ConnectionError, redis.TimeoutError):
                continue  # the lease gives us leaseMs to reconnect
            if int(answer) == 1:
                self.cancel.set()

    def check(self):
        if self.stale.is_set():
            raise Stale()
        if self.cancel.is_set():
            raise Cancelled()
        if time.monotonic() > self.deadline:
            raise TimeoutError()

    def progress(self, progress):
        """Step 5."""
        self.r.fcall("patchbay_progress", 1, self.key, self.token, json.dumps(progress))


def work(job, stopping):
    """The job itself: returns the result, or raises to fail."""
    params = job.task["params"] or {}
    steps = int(params.get("steps", 3))
    for step in range(1, steps + 1):
        for _ in range(10):
            if stopping.is_set():
                return None
            job.check()
            time.sleep(0.01)
        job.progress({"percent": step * 100 // steps, "message": f"step {step} of {steps}"})
    if params.get("fail"):
        raise RuntimeError("asked to fail")
    return {"steps": steps, "worker": "python"}


def run_one(r, prefix, queue, consumer, stopping):
    stream = f"{prefix}:q:{queue}"
    # Step 2: read a job.
    try:
        reply = r.xreadgroup(GROUP, consumer, {stream: ">"}, count=1, block=1000)
    except redis.ResponseError as e:
        if "NOGROUP" in str(e):
            create_group(r, stream)
            return
        raise
    if not reply:
        return
    entry_id, fields = reply[0][1][0]
    task_id = fields["id"]
    key = f"{prefix}:task:{task_id}"
    # Step 3: start it.
    started = r.fcall("patchbay_start", 2, key, stream, entry_id, consumer)
    if started is None:
        return
    task_json, token, lease_ms, timeout_ms = started
    job = Job(r, prefix, json.loads(task_json), token, int(lease_ms), int(timeout_ms))
    renewer = threading.Thread(target=job.renew_until_done, daemon=True)
    renewer.start()
    try:
        result = work(job, stopping)
        if stopping.is_set() and result is None:
            r.fcall("patchbay_handback", 1, key, token)
        else:
            r.fcall("patchbay_succeed", 1, key, token, json.dumps(result))
    except Stale:
        pass
    except Cancelled:
        r.fcall("patchbay_fail", 1, key, token, "failed", "cancelled")
    except TimeoutError:
        r.fcall("patchbay_fail", 1, key, token, "timeout", f"ran past {timeout_ms} ms")
    except redis.ResponseError as e:
        if not str(e).startswith("STALE"):
            raise
    except Exception as e:  # the job's own failure
        r.fcall("patchbay_fail", 1, key, token, "failed", str(e)[:4096])
    finally:
        job.done.set()
        renewer.join()


def create_group(r, stream):
    """Step 1."""
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=os.environ.get("PATCHBAY_REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--prefix", default=os.environ.get("PATCHBAY_REDIS_PREFIX", "patchbay"))
    parser.add_argument("--queue", required=True)
    args = parser.parse_args()

    r = redis.Redis.from_url(args.redis, decode_responses=True, socket_timeout=5)
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    stream = f"{args.prefix}:q:{args.queue}"
    while not stopping.is_set():
        try:
            create_group(r, stream)
            break
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.5)
    print(f"worker {consumer} on {stream}", flush=True)
    while not stopping.is_set():
        try:
            run_one(r, args.prefix, args.queue, consumer, stopping)
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.5)  # Redis restarting: reconnect and carry on
        except redis.ResponseError as e:
            if "Function not found" in str(e):
                time.sleep(0.5)  # no patchbay has loaded the functions yet
            else:
                raise
    # Step 7.
    try:
        r.fcall("patchbay_retire", 1, stream, consumer)
    except redis.RedisError:
        pass


if __name__ == "__main__":
    main()
