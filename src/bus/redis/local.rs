//! An in-process stand-in for Redis pub/sub, for tests: every [`LocalRedis`] clone is the
//! same server, so several buses (several "instances") can share it in one process. It can be
//! taken down and brought back, like a Redis restart.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt, ready};
use futures_util::stream::BoxStream;
use tokio::sync::mpsc;

use super::driver::{Driver, DriverError, Msg, Subscriptions};

/// An in-process pub/sub server.
#[derive(Clone, Default)]
pub struct LocalRedis {
    /// `std` lock: held to publish or change a subscription, never across an `.await`.
    server: Arc<Mutex<Server>>,
}

#[derive(Default)]
struct Server {
    down: bool,
    next_id: u64,
    connections: Vec<Connection>,
}

struct Connection {
    id: u64,
    patterns: Vec<String>,
    channels: HashSet<String>,
    tx: mpsc::UnboundedSender<Msg>,
}

impl LocalRedis {
    /// A new, empty server.
    pub fn new() -> LocalRedis {
        LocalRedis::default()
    }

    /// Takes the server down (every connection ends, every call fails) or brings it back.
    pub fn set_down(&self, down: bool) {
        let mut server = self.server.lock().unwrap();
        server.down = down;
        if down {
            server.connections.clear();
        }
    }

    /// How many pub/sub connections are open.
    pub fn connections(&self) -> usize {
        self.server.lock().unwrap().connections.len()
    }

    fn change(&self, id: u64, channels: Vec<String>, add: bool) -> Result<(), DriverError> {
        let mut server = self.server.lock().unwrap();
        if server.down {
            return Err(DriverError::unavailable("the local server is down"));
        }
        let conn = server
            .connections
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or_else(|| DriverError::unavailable("connection closed"))?;
        for channel in channels {
            if add {
                conn.channels.insert(channel);
            } else {
                conn.channels.remove(&channel);
            }
        }
        Ok(())
    }
}

/// Whether `channel` matches a glob `pattern` whose only special character is `*`.
fn glob(pattern: &str, channel: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == channel,
        Some((prefix, rest)) => {
            let Some(tail) = channel.strip_prefix(prefix) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

impl Driver for LocalRedis {
    fn connect(
        &self,
        patterns: Vec<String>,
        channels: Vec<String>,
    ) -> BoxFuture<'_, Result<(Box<dyn Subscriptions>, BoxStream<'static, Msg>), DriverError>> {
        let mut server = self.server.lock().unwrap();
        if server.down {
            return ready(Err(DriverError::unavailable("the local server is down"))).boxed();
        }
        server.next_id += 1;
        let id = server.next_id;
        let (tx, rx) = mpsc::unbounded_channel();
        server.connections.push(Connection {
            id,
            patterns,
            channels: channels.into_iter().collect(),
            tx,
        });
        let subscriptions = LocalSubscriptions {
            redis: self.clone(),
            id,
        };
        let stream = stream_of(rx);
        ready(Ok((
            Box::new(subscriptions) as Box<dyn Subscriptions>,
            stream,
        )))
        .boxed()
    }

    fn publish(
        &self,
        channels: Vec<String>,
        payload: String,
    ) -> BoxFuture<'_, Result<(), DriverError>> {
        let server = self.server.lock().unwrap();
        if server.down {
            return ready(Err(DriverError::unavailable("the local server is down"))).boxed();
        }
        let payload = Bytes::from(payload);
        for channel in &channels {
            for conn in &server.connections {
                let matched = conn.patterns.iter().find(|p| glob(p, channel));
                if conn.channels.contains(channel) || matched.is_some() {
                    let _ = conn.tx.send(Msg {
                        channel: channel.clone(),
                        pattern: matched
                            .filter(|_| !conn.channels.contains(channel))
                            .cloned(),
                        payload: payload.clone(),
                    });
                }
            }
        }
        ready(Ok(())).boxed()
    }
}

/// The messages of one connection, ending when the server drops it.
fn stream_of(mut rx: mpsc::UnboundedReceiver<Msg>) -> BoxStream<'static, Msg> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

struct LocalSubscriptions {
    redis: LocalRedis,
    id: u64,
}

impl Subscriptions for LocalSubscriptions {
    fn subscribe(&mut self, channels: Vec<String>) -> BoxFuture<'_, Result<(), DriverError>> {
        ready(self.redis.change(self.id, channels, true)).boxed()
    }

    fn unsubscribe(&mut self, channels: Vec<String>) -> BoxFuture<'_, Result<(), DriverError>> {
        ready(self.redis.change(self.id, channels, false)).boxed()
    }

    fn ping(&mut self) -> BoxFuture<'_, Result<(), DriverError>> {
        ready(self.redis.change(self.id, Vec::new(), true)).boxed()
    }
}

impl Drop for LocalSubscriptions {
    fn drop(&mut self) {
        self.redis
            .server
            .lock()
            .unwrap()
            .connections
            .retain(|c| c.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("tasks.*", "tasks.42"));
        assert!(glob("app:*:progress", "app:7:progress"));
        assert!(!glob("tasks.*", "other.42"));
        assert!(glob("exact", "exact"));
    }
}
