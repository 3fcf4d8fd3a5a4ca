//! The Redis queue: many instances, many workers in any language, nothing lost when a process
//! dies. Every step is one call of a Redis function from [`FUNCTIONS`] (the keys and the rules
//! are documented there), so patchbay and a worker written from the README do exactly the same
//! thing. Jobs to start travel on a stream per queue read through the consumer group
//! `workers`; a started job is held by a lease (a token and an end time, renewed by its
//! worker) rather than by the stream's pending list, so a worker's death, a reclaim and a
//! late report are all decided by one fenced step.
//!
//! Someone must move due retries back to the queue, give lapsed leases' jobs their next
//! attempt, re-queue entries a worker read but never started, and delete idle consumers:
//! [`RedisQueue::maintain`] does, on one instance at a time (a lock key with a short expiry,
//! so another instance takes over within seconds when the holder goes).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::MultiplexedConnection;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::{Status, Task};
use super::queue::{
    Finish, Lease, ListQuery, NewJob, Owner, Queue, QueueError, QueueStats, Renewal,
};
use crate::bus::{Commands, RedisTarget, connection_config};

/// The function library, loaded by patchbay at start-up and whenever Redis has lost it.
pub const FUNCTIONS: &str = include_str!("functions.lua");
/// The version `patchbay_version` returns; raise it with every change of [`FUNCTIONS`].
const FUNCTIONS_VERSION: i64 = 9;
/// The consumer group every worker reads a queue's stream through.
pub const GROUP: &str = "workers";

/// How often the maintainer runs.
const MAINTAIN_EVERY: Duration = Duration::from_millis(250);
/// How long the maintainer's lock lasts without renewal.
const LOCK_MS: u64 = 3_000;
/// An entry read but not started for this long is queued again (its reader died in between).
const RECLAIM_IDLE_MS: u64 = 10_000;
/// How often pending entries are looked at.
const RECLAIM_EVERY: Duration = Duration::from_secs(2);
/// A consumer with nothing pending, idle this long, is deleted (a live worker's next read
/// creates it again).
const SWEEP_IDLE_MS: u64 = 30_000;
/// How often consumers are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Takes or renews the maintainer's lock: 1 when this instance holds it.
const LOCK: &str = "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end \
    if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
    return 0";

/// Releases the maintainer's lock if this instance holds it.
const UNLOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Tasks on Redis.
pub struct RedisQueue {
    commands: Commands,
    target: RedisTarget,
    prefix: String,
    /// One connection per worker for its blocking reads (a blocked read would hold up every
    /// other command on a shared connection).
    blocking: tokio::sync::Mutex<HashMap<String, MultiplexedConnection>>,
}

impl RedisQueue {
    /// A queue on the Redis at `url` under `prefix` (nothing is connected yet).
    pub fn open(url: &str, prefix: &str) -> Result<RedisQueue, redis::RedisError> {
        Ok(Self::on(
            &RedisTarget::open(url, &Default::default())?,
            prefix,
        ))
    }

    /// A queue on the Redis `target` names, under `prefix` (nothing is connected yet).
    pub fn on(target: &RedisTarget, prefix: &str) -> RedisQueue {
        RedisQueue {
            commands: Commands::new(target.clone()),
            target: target.clone(),
            prefix: prefix.to_string(),
            blocking: tokio::sync::Mutex::default(),
        }
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}:{kind}:{rest}", self.prefix)
    }

    /// Loads the function library (see [`load_functions`]).
    pub async fn load_functions(&self) -> Result<(), QueueError> {
        load_functions(&self.commands).await.map_err(unavailable)
    }

    /// Creates `queue`'s consumer group (and stream) unless it exists.
    pub async fn create_group(&self, queue: &str) -> Result<(), QueueError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(self.key("q", queue))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.commands.query::<()>(&cmd).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Calls function `name` (see [`fcall`]).
    async fn fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, QueueError> {
        fcall(&self.commands, name, keys, args)
            .await
            .map_err(refused)
    }

    /// `get` or `cancel`: function `name` on task `id`, as `owner` may see it on `queue`.
    async fn owned_step(
        &self,
        name: &str,
        queue: Option<&str>,
        id: &str,
        owner: Owner<'_>,
    ) -> Result<Task, QueueError> {
        let json: String = self
            .fcall(
                name,
                &[&self.key("task", id)],
                &[queue.unwrap_or(""), owner.unwrap_or("")],
            )
            .await?;
        parse_task(&json)
    }

    /// A queue's counts.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, QueueError> {
        let v: Vec<u64> = self
            .fcall("patchbay_stats", &[&self.key("q", queue)], &[])
            .await?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Ok(QueueStats {
            queued: at(0),
            running: at(1),
            delayed: at(2),
            workers: at(3),
            succeeded: at(4),
            failed: at(5),
            cancelled: at(6),
            lost: at(7),
        })
    }

    /// The next job for `worker`: one blocking read of at most `wait`, then the start step.
    async fn read_one(
        &self,
        queue: &str,
        worker: &str,
        wait: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        let stream = self.key("q", queue);
        let mut conn = self.blocking_connection(worker).await?;
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(worker)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
        let reply: Reply = match read.query_async(&mut conn).await {
            Ok(reply) => reply,
            // Redis restarted without persistence, or the group was deleted: make it again
            // (the failure most reported of other Redis queues: workers that never recover).
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group(queue).await?;
                return Ok(None);
            }
            Err(e) => {
                self.blocking.lock().await.remove(worker);
                return Err(unavailable(e));
            }
        };
        let Some((entry, fields)) = reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .next()
        else {
            return Ok(None);
        };
        let Some(id) = fields
            .chunks(2)
            .find(|kv| kv[0] == "id")
            .and_then(|kv| kv.get(1))
        else {
            tracing::warn!(%stream, %entry, "a queue entry without an `id` field: dropped");
            let mut drop_it = redis::cmd("XACK");
            drop_it.arg(&stream).arg(GROUP).arg(&entry);
            let _ = self.commands.query::<()>(&drop_it).await;
            return Ok(None);
        };
        let started: Option<(String, String, u64, u64)> = self
            .fcall(
                "patchbay_start",
                &[&self.key("task", id), &stream],
                &[&entry, worker],
            )
            .await?;
        let Some((json, token, lease_ms, timeout_ms)) = started else {
            return Ok(None); // cancelled or expired before it started
        };
        Ok(Some(Lease {
            task: parse_task(&json)?,
            token: token
                .parse()
                .map_err(|_| QueueError::Unavailable(format!("a bad lease token {token}")))?,
            lease: Duration::from_millis(lease_ms),
            timeout: Duration::from_millis(timeout_ms),
        }))
    }

    async fn blocking_connection(&self, worker: &str) -> Result<MultiplexedConnection, QueueError> {
        let mut map = self.blocking.lock().await;
        if let Some(conn) = map.get(worker) {
            return Ok(conn.clone());
        }
        // The read blocks up to its wait: the response timeout must be longer.
        let config = connection_config().set_response_timeout(Some(Duration::from_secs(10)));
        let mut conn = async {
            self.target
                .client()
                .await?
                .get_multiplexed_async_connection_with_config(&config)
                .await
        }
        .await
        .map_err(unavailable)?;
        // Named after the worker, so `CLIENT LIST` shows who is reading (Redis 7.0 makes the
        // group's consumer only with the first entry it hands out).
        let mut name = redis::cmd("CLIENT");
        name.arg("SETNAME").arg(worker);
        if let Err(e) = name.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "cannot name the worker's connection");
        }
        map.insert(worker.to_string(), conn.clone());
        Ok(conn)
    }

    /// Keeps the queues moving until `stop`: promotes due retries, gives the jobs of lapsed
    /// leases their next attempt, re-queues entries read but never started, deletes idle
    /// consumers. One instance at a time does it; `instance` names this one in the lock.
    pub async fn maintain(&self, queues: Vec<String>, instance: String, stop: CancellationToken) {
        let lock = format!("{}:tasks:maintainer", self.prefix);
        let mut healthy_since: Option<Instant> = None;
        let mut last_reclaim = Instant::now();
        let mut last_sweep = Instant::now();
        let mut prepared = false;
        let mut every = tokio::time::interval(MAINTAIN_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // Hand the lock over at once rather than when it expires.
                    let mut cmd = redis::cmd("EVAL");
                    cmd.arg(UNLOCK).arg(1).arg(&lock).arg(&instance);
                    let _ = self.commands.query::<i64>(&cmd).await;
                    return;
                }
                _ = every.tick() => {}
            }
            let round = async {
                if !prepared {
                    self.load_functions().await?;
                    for queue in &queues {
                        self.create_group(queue).await?;
                    }
                    prepared = true;
                }
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(LOCK).arg(1).arg(&lock).arg(&instance).arg(LOCK_MS);
                let held: i64 = self.commands.query(&cmd).await.map_err(unavailable)?;
                let since = *healthy_since.get_or_insert_with(Instant::now);
                if held == 0 {
                    return Ok(());
                }
                let healthy_ms = since.elapsed().as_millis().to_string();
                for queue in &queues {
                    let delayed = self.key("delayed", queue);
                    let _: i64 = self.fcall("patchbay_promote", &[&delayed], &[]).await?;
                    let stream = self.key("q", queue);
                    let _: i64 = self.fcall("patchbay_trim", &[&stream], &[]).await?;
                    let leases = self.key("leases", queue);
                    let reaped: i64 = self
                        .fcall("patchbay_reap", &[&leases], &[&healthy_ms])
                        .await?;
                    if reaped > 0 {
                        tracing::info!(%queue, tasks = reaped, "lapsed leases: jobs given their next attempt");
                    }
                }
                if last_reclaim.elapsed() >= RECLAIM_EVERY {
                    last_reclaim = Instant::now();
                    for queue in &queues {
                        self.reclaim(queue).await?;
                    }
                }
                if last_sweep.elapsed() >= SWEEP_EVERY {
                    last_sweep = Instant::now();
                    for queue in &queues {
                        let stream = self.key("q", queue);
                        let idle = SWEEP_IDLE_MS.to_string();
                        let n: i64 = self.fcall("patchbay_sweep", &[&stream], &[&idle]).await?;
                        if n > 0 {
                            tracing::debug!(%queue, consumers = n, "idle consumers deleted");
                        }
                    }
                }
                Ok::<(), QueueError>(())
            };
            if let Err(e) = round.await {
                if healthy_since.is_some() {
                    tracing::warn!(error = %e, "task queue maintenance paused");
                }
                healthy_since = None;
                prepared = false;
            }
        }
    }

    /// Entries read but never started: follows the reclaim cursor through the whole pending
    /// list (one call scans only part of it).
    async fn reclaim(&self, queue: &str) -> Result<(), QueueError> {
        let stream = self.key("q", queue);
        let idle = RECLAIM_IDLE_MS.to_string();
        let mut cursor = "0-0".to_string();
        loop {
            let (next, handled): (String, i64) = self
                .fcall("patchbay_reclaim", &[&stream], &[&idle, &cursor])
                .await?;
            if handled > 0 {
                tracing::info!(%queue, entries = handled, "entries read by a worker that never started them: queued again");
            }
            if next == "0-0" {
                return Ok(());
            }
            cursor = next;
        }
    }
}

impl Queue for RedisQueue {
    fn enqueue<'a>(&'a self, job: NewJob<'a>) -> BoxFuture<'a, Result<Task, QueueError>> {
        async move {
            let s = job.settings;
            let params = job.params.to_string();
            let id = uuid::Uuid::new_v4().to_string();
            let numbers = [
                s.max_attempts.to_string(),
                s.timeout.as_millis().to_string(),
                s.lease.as_millis().to_string(),
                s.backoff.as_millis().to_string(),
                s.retention.as_secs().to_string(),
                s.per_user_limit.to_string(),
            ];
            let mut args = vec![
                job.queue,
                job.owner.unwrap_or(""),
                job.scope,
                job.request_id,
                &params,
                &id,
            ];
            args.extend(numbers.iter().map(String::as_str));
            let json: String = self
                .fcall("patchbay_enqueue", &[&self.key("q", job.queue)], &args)
                .await?;
            parse_task(&json)
        }
        .boxed()
    }

    fn get<'a>(
        &'a self,
        queue: Option<&'a str>,
        id: &'a str,
        owner: Owner<'a>,
    ) -> BoxFuture<'a, Result<Task, QueueError>> {
        self.owned_step("patchbay_get", queue, id, owner).boxed()
    }

    fn cancel<'a>(
        &'a self,
        queue: Option<&'a str>,
        id: &'a str,
        owner: Owner<'a>,
    ) -> BoxFuture<'a, Result<Task, QueueError>> {
        self.owned_step("patchbay_cancel", queue, id, owner).boxed()
    }

    fn list<'a>(
        &'a self,
        queue: &'a str,
        scope: &'a str,
        query: &'a ListQuery,
    ) -> BoxFuture<'a, Result<Vec<Task>, QueueError>> {
        async move {
            let statuses = query
                .statuses
                .iter()
                .map(|s| status_name(*s))
                .collect::<Vec<_>>()
                .join(",");
            let index = self.key("tasks", &format!("{queue}:{scope}"));
            let json: String = self
                .fcall(
                    "patchbay_list",
                    &[&index],
                    &[
                        &statuses,
                        &query.limit.to_string(),
                        query.before.as_deref().unwrap_or(""),
                    ],
                )
                .await?;
            serde_json::from_str(&json)
                .map_err(|e| QueueError::Unavailable(format!("a task list Redis returned: {e}")))
        }
        .boxed()
    }

    fn take<'a>(
        &'a self,
        queue: &'a str,
        worker: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, QueueError>> {
        async move {
            let deadline = Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Some(lease) = self.read_one(queue, worker, left).await? {
                    return Ok(Some(lease));
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
            }
        }
        .boxed()
    }

    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, QueueError>> {
        self.queue_stats(queue).boxed()
    }

    fn retire<'a>(&'a self, queue: &'a str, worker: &'a str) -> BoxFuture<'a, ()> {
        async move {
            self.blocking.lock().await.remove(worker);
            let stream = self.key("q", queue);
            if let Err(e) = self
                .fcall::<i64>("patchbay_retire", &[&stream], &[worker])
                .await
            {
                tracing::debug!(error = %e, "cannot delete this worker's consumer: the sweep will");
            }
        }
        .boxed()
    }

    fn renew<'a>(&'a self, id: &'a str, token: u64) -> BoxFuture<'a, Result<Renewal, QueueError>> {
        async move {
            let cancel: i64 = self
                .fcall(
                    "patchbay_renew",
                    &[&self.key("task", id)],
                    &[&token.to_string()],
                )
                .await?;
            Ok(Renewal {
                cancel_requested: cancel == 1,
            })
        }
        .boxed()
    }

    fn progress<'a>(
        &'a self,
        id: &'a str,
        token: u64,
        progress: Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        async move {
            let json = Value::Object(progress).to_string();
            let _: i64 = self
                .fcall(
                    "patchbay_progress",
                    &[&self.key("task", id)],
                    &[&token.to_string(), &json],
                )
                .await?;
            Ok(())
        }
        .boxed()
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        token: u64,
        end: Finish,
    ) -> BoxFuture<'a, Result<Task, QueueError>> {
        async move {
            let key = self.key("task", id);
            let token = token.to_string();
            let json: String = match end {
                Finish::Succeeded(result) => {
                    let result = result.to_string();
                    self.fcall("patchbay_succeed", &[&key], &[&token, &result])
                        .await?
                }
                Finish::Failed(error) => {
                    let code = serde_json::to_value(error.code).expect("codes serialize");
                    let code = code.as_str().unwrap_or("failed");
                    self.fcall("patchbay_fail", &[&key], &[&token, code, &error.message])
                        .await?
                }
                Finish::HandBack => self.fcall("patchbay_handback", &[&key], &[&token]).await?,
            };
            parse_task(&json)
        }
        .boxed()
    }
}

/// Loads the function library, unless Redis already has this version or a newer one
/// (during a rolling upgrade the newest library stays, instead of each instance putting back
/// its own).
pub async fn load_functions(commands: &Commands) -> Result<(), redis::RedisError> {
    let mut version = redis::cmd("FCALL");
    version.arg("patchbay_version").arg(0);
    if let Ok(loaded) = commands.query::<i64>(&version).await
        && loaded >= FUNCTIONS_VERSION
    {
        return Ok(());
    }
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(FUNCTIONS);
    commands.query::<String>(&cmd).await.map(drop)
}

/// Calls function `name` of the library; loads the library and tries again once when Redis
/// has lost it (a restart without persistence). `Ok(true)` in the second place when it was
/// loaded again.
pub async fn fcall_reloading<T: redis::FromRedisValue>(
    commands: &Commands,
    name: &str,
    keys: &[&str],
    args: &[&str],
) -> Result<(T, bool), redis::RedisError> {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(name).arg(keys.len()).arg(keys).arg(args);
    match commands.query::<T>(&cmd).await {
        Err(e) if function_missing(&e) => {
            tracing::info!("Redis has no patchbay functions (restarted?): loading them");
            load_functions(commands).await?;
            Ok((commands.query::<T>(&cmd).await?, true))
        }
        other => other.map(|v| (v, false)),
    }
}

/// [`fcall_reloading`], for callers that need not know about a reload.
pub async fn fcall<T: redis::FromRedisValue>(
    commands: &Commands,
    name: &str,
    keys: &[&str],
    args: &[&str],
) -> Result<T, redis::RedisError> {
    fcall_reloading(commands, name, keys, args)
        .await
        .map(|(v, _)| v)
}

fn status_name(status: Status) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn parse_task(json: &str) -> Result<Task, QueueError> {
    serde_json::from_str(json)
        .map_err(|e| QueueError::Unavailable(format!("a task Redis returned: {e}")))
}

pub(crate) fn function_missing(e: &redis::RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.contains("Function not found") || d.contains("function not found"))
        || e.to_string().contains("Function not found")
}

/// A Redis failure as the queue's error: a refusal by one of the functions, or Redis out of
/// reach.
fn refused(e: redis::RedisError) -> QueueError {
    match e.code() {
        Some("NOT_FOUND") => QueueError::NotFound,
        Some("CONFLICT") => QueueError::Conflict,
        Some("STALE") => QueueError::StaleLease,
        Some("LIMIT") => QueueError::LimitReached(
            e.detail()
                .and_then(|d| d.trim().parse().ok())
                .unwrap_or_default(),
        ),
        Some("INVALID") => QueueError::Invalid(e.detail().unwrap_or_default().to_string()),
        _ => unavailable(e),
    }
}

fn unavailable(e: redis::RedisError) -> QueueError {
    QueueError::Unavailable(crate::error::clip(&e.to_string()).into_owned())
}
