//! What the Redis bus needs from Redis, behind a small trait: a pub/sub connection whose
//! subscriptions it changes, and publishing. [`RedisDriver`] is Redis itself (through
//! `redis-rs`); [`super::LocalRedis`] is an in-process stand-in, so several instances can be
//! tested in one process besides the tests against a real `redis-server`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::BoxStream;
use redis::aio::{MultiplexedConnection, PubSubSink};

/// How long one Redis operation (connect, subscribe, ping, publish) may take before the
/// connection is considered dead.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Publishes `ARGV[1]` on every channel `ARGV[2..]`; returns the receivers. One call carries
/// the message once, however many channels it goes to.
const PUBLISH_ALL: &str =
    "local n = 0 for i = 2, #ARGV do n = n + redis.call('PUBLISH', ARGV[i], ARGV[1]) end return n";

/// A message received on the pub/sub connection.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The channel it was published on.
    pub channel: String,
    /// The pattern subscription it matched (task progress, the socket.io emitter), or `None`
    /// for a channel subscription.
    pub pattern: Option<String>,
    /// Its bytes.
    pub payload: Bytes,
}

/// Why a driver operation failed.
#[derive(Debug, Clone)]
pub struct DriverError {
    /// What happened, for the log.
    pub message: String,
    /// Set when Redis refuses patchbay (credentials, permissions) rather than being
    /// unreachable: what the operator must fix.
    pub refusal: Option<String>,
}

impl DriverError {
    /// A failure that is not a refusal.
    pub fn unavailable(message: impl Into<String>) -> Self {
        DriverError {
            message: message.into(),
            refusal: None,
        }
    }
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<redis::RedisError> for DriverError {
    fn from(e: redis::RedisError) -> Self {
        DriverError {
            message: e.to_string(),
            refusal: refusal(&e),
        }
    }
}

/// The subscriptions of one pub/sub connection.
pub trait Subscriptions: Send {
    /// Subscribes to `channels`; resolves once the server confirmed.
    fn subscribe(&mut self, channels: Vec<String>) -> BoxFuture<'_, Result<(), DriverError>>;
    /// Unsubscribes from `channels`.
    fn unsubscribe(&mut self, channels: Vec<String>) -> BoxFuture<'_, Result<(), DriverError>>;
    /// Checks that the connection still answers.
    fn ping(&mut self) -> BoxFuture<'_, Result<(), DriverError>>;
}

/// What the Redis bus needs from a Redis.
pub trait Driver: Send + Sync + 'static {
    /// Opens a pub/sub connection subscribed to `patterns` and `channels`: its subscriptions,
    /// and the stream of its messages (which ends when the connection is lost).
    #[allow(clippy::type_complexity)]
    fn connect(
        &self,
        patterns: Vec<String>,
        channels: Vec<String>,
    ) -> BoxFuture<'_, Result<(Box<dyn Subscriptions>, BoxStream<'static, Msg>), DriverError>>;

    /// Publishes `payload` on every one of `channels`, carrying it once.
    fn publish(
        &self,
        channels: Vec<String>,
        payload: String,
    ) -> BoxFuture<'_, Result<(), DriverError>>;
}

/// Redis itself: one pub/sub connection at a time, and a command connection that heals itself.
pub struct RedisDriver {
    target: super::RedisTarget,
    commands: Commands,
}

impl RedisDriver {
    /// A driver for `target` (nothing is connected yet).
    pub fn open(target: &super::RedisTarget) -> RedisDriver {
        RedisDriver {
            commands: Commands::new(target.clone()),
            target: target.clone(),
        }
    }
}

impl RedisDriver {
    /// A Sentinel or a read-only replica also answers PING and SUBSCRIBE, and would then
    /// deliver nothing: the URL is refused instead. (A user whose ACL lacks ROLE is not
    /// checked.)
    async fn check_role(&self) -> Result<(), DriverError> {
        let role = match self
            .commands
            .query::<redis::Value>(&redis::cmd("ROLE"))
            .await
        {
            Ok(redis::Value::Array(role)) => role,
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some("NOPERM") => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let refused = match role.first() {
            Some(redis::Value::BulkString(role)) if role == b"sentinel" => {
                "PATCHBAY_REDIS_URL points at a Redis Sentinel, not at Redis: use redis+sentinel://<host>:<port>/<master name>"
            }
            Some(redis::Value::BulkString(role)) if role == b"slave" => {
                "PATCHBAY_REDIS_URL points at a read-only replica: use the master, or redis+sentinel:// to follow it"
            }
            _ => return Ok(()),
        };
        Err(DriverError {
            message: refused.to_string(),
            refusal: Some(refused.to_string()),
        })
    }
}

impl Driver for RedisDriver {
    fn connect(
        &self,
        patterns: Vec<String>,
        channels: Vec<String>,
    ) -> BoxFuture<'_, Result<(Box<dyn Subscriptions>, BoxStream<'static, Msg>), DriverError>> {
        async move {
            self.check_role().await?;
            let client = tokio::time::timeout(OP_TIMEOUT, self.target.client())
                .await
                .map_err(|_| timed_out())??;
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.psubscribe(&patterns).await?;
            for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
                sink.subscribe(chunk).await?;
            }
            let stream = stream
                .map(|m| Msg {
                    channel: m.get_channel_name().to_string(),
                    pattern: m
                        .from_pattern()
                        .then(|| m.get_pattern::<String>().ok())
                        .flatten(),
                    payload: Bytes::copy_from_slice(m.get_payload_bytes()),
                })
                .boxed();
            Ok((
                Box::new(RedisSubscriptions(sink)) as Box<dyn Subscriptions>,
                stream,
            ))
        }
        .boxed()
    }

    fn publish(
        &self,
        channels: Vec<String>,
        payload: String,
    ) -> BoxFuture<'_, Result<(), DriverError>> {
        async move {
            let cmd = if let [channel] = channels.as_slice() {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(channel).arg(payload);
                cmd
            } else {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(PUBLISH_ALL).arg(0).arg(payload).arg(channels);
                cmd
            };
            self.commands.query::<i64>(&cmd).await?;
            Ok(())
        }
        .boxed()
    }
}

/// Channels per SUBSCRIBE command when subscribing many at once.
const RESUBSCRIBE_CHUNK: usize = 1000;

struct RedisSubscriptions(PubSubSink);

impl Subscriptions for RedisSubscriptions {
    fn subscribe(&mut self, channels: Vec<String>) -> BoxFuture<'_, Result<(), DriverError>> {
        async move { Ok(self.0.subscribe(channels).await?) }.boxed()
    }

    fn unsubscribe(&mut self, channels: Vec<String>) -> BoxFuture<'_, Result<(), DriverError>> {
        async move { Ok(self.0.unsubscribe(channels).await?) }.boxed()
    }

    fn ping(&mut self) -> BoxFuture<'_, Result<(), DriverError>> {
        // On a subscribed connection Redis answers PING with an array, not a string.
        async move { Ok(self.0.ping::<redis::Value>().await.map(drop)?) }.boxed()
    }
}

/// A command connection that heals itself: created on first use, replaced when found dead,
/// a command retried once on the new one when it cannot have run, failed connects answered
/// from memory for a second. Shared by the bus and the Redis task queue.
pub struct Commands {
    target: super::RedisTarget,
    /// `tokio` lock: held across a connect, so concurrent commands that find no connection
    /// wait for one new connection instead of each opening their own.
    slot: tokio::sync::Mutex<Slot>,
}

/// The command connection and what the last attempt to open one said.
#[derive(Default)]
struct Slot {
    /// The connection and its generation: a command that found generation `n` dead clears the
    /// slot only if it still holds `n`, never a newer connection another command just opened.
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    /// The last failed connect: commands arriving soon after get its error at once instead of
    /// each waiting out its own connect while Redis is unreachable.
    failed: Option<(tokio::time::Instant, redis::RedisError)>,
}

/// How long a failed connect is answered from memory.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);

impl Commands {
    /// Commands on `target` (nothing is connected yet).
    pub fn new(target: super::RedisTarget) -> Commands {
        Commands {
            target,
            slot: tokio::sync::Mutex::default(),
        }
    }

    /// The current connection with its generation, or a new one; `true` with a new one.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection, bool), redis::RedisError> {
        let mut slot = self.slot.lock().await;
        if let Some((generation, conn)) = slot.conn.as_ref() {
            return Ok((*generation, conn.clone(), false));
        }
        if let Some((at, e)) = &slot.failed
            && at.elapsed() < CONNECT_BACKOFF
        {
            return Err(e.clone());
        }
        let config = connection_config();
        let connect = tokio::time::timeout(OP_TIMEOUT, async {
            self.target
                .client()
                .await?
                .get_multiplexed_async_connection_with_config(&config)
                .await
        });
        match connect.await.map_err(|_| timed_out()).and_then(|r| r) {
            Ok(conn) => {
                slot.generation += 1;
                slot.conn = Some((slot.generation, conn.clone()));
                slot.failed = None;
                Ok((slot.generation, conn, true))
            }
            Err(e) => {
                slot.failed = Some((tokio::time::Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Forgets connection `generation` if it is still the current one.
    async fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            slot.conn = None;
        }
    }

    /// Runs `cmd` on the command connection. An existing connection found closed is replaced
    /// and the command tried once more on the new one: Redis closes idle connections by
    /// itself, and the command after that must not fail for it. A command that timed out is
    /// not tried again (Redis may have run it), but its connection is replaced.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, redis::RedisError> {
        let mut retried = false;
        loop {
            let mut used: Option<(u64, bool)> = None;
            let result = async {
                let (generation, mut conn, fresh) = self.connection().await?;
                used = Some((generation, fresh));
                tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<T>(&mut conn))
                    .await
                    .map_err(|_| timed_out())?
            }
            .await;
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if let Some((generation, fresh)) = used
                        && is_dead(&e)
                    {
                        self.discard(generation).await;
                        // Closed before we wrote: nothing ran, so trying again is safe.
                        if !fresh && !retried && !e.is_timeout() {
                            retried = true;
                            continue;
                        }
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// The error of an operation that took longer than [`OP_TIMEOUT`].
fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// Whether `e` means the connection must be replaced: gone, or to a master demoted to a
/// read-only replica (a Sentinel failover; the next connection finds the new master).
pub fn is_dead(e: &redis::RedisError) -> bool {
    e.is_connection_dropped()
        || e.is_io_error()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.code() == Some("READONLY")
}

/// What to tell the operator when `e` says Redis refuses patchbay itself (credentials,
/// permissions, a certificate it does not trust), as opposed to being unreachable: fixing it
/// needs a configuration change, not patience.
pub fn refusal(e: &redis::RedisError) -> Option<String> {
    use redis::{ErrorKind, ServerErrorKind};
    let detail = e.detail().map(|d| crate::error::clip(d).into_owned());
    match (e.kind(), e.code()) {
        (ErrorKind::AuthenticationFailed, _) | (_, Some("WRONGPASS")) => Some(
            "Redis refused patchbay's credentials: check the user and password in PATCHBAY_REDIS_URL"
                .to_string(),
        ),
        (_, Some("NOAUTH")) => Some(
            "Redis requires authentication: put the user and password in PATCHBAY_REDIS_URL"
                .to_string(),
        ),
        (ErrorKind::Server(ServerErrorKind::NoPerm), _) | (_, Some("NOPERM")) => Some(format!(
            "Redis refused a command for lack of an ACL permission: {}",
            detail.unwrap_or_default()
        )),
        _ if e.to_string().contains("invalid peer certificate") => Some(format!(
            "Redis's TLS certificate is not trusted ({}): check the host name in PATCHBAY_REDIS_URL, and set PATCHBAY_REDIS_CA_FILE to the CA of a private certificate",
            crate::error::clip(&e.to_string())
        )),
        _ => None,
    }
}

/// Connect and response timeouts of every Redis connection patchbay opens.
pub fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart_from_outages() {
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "nope"));
        assert!(refusal(&auth).unwrap().contains("credentials"));
        let io =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(refusal(&io), None);
        assert!(is_dead(&io));
        assert!(is_dead(&timed_out()));
        assert!(DriverError::from(auth).refusal.is_some());
    }
}
