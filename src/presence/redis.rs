//! Presence in Redis, across every instance (contract section 9): each step is one call of
//! the function library (`patchbay_presence_*`, documented in `functions.lua`), so a user's
//! connections on several instances count as one presence, and versions are the same
//! everywhere. Each instance holds a lease, renewed every [`RENEW_EVERY`]; every instance
//! sweeps lapsed leases as often, so the users of an instance that died leave with `timeout`
//! once, within [`LEASE`] + [`RENEW_EVERY`] of its death.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Leave, PresenceConfig, SetError};
use crate::bus::{Commands, RedisTarget};
use crate::rooms::ConnId;
use crate::task::redis::fcall;

/// How long an instance's lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often the lease is renewed and lapsed leases swept.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);

/// Presence in Redis.
pub struct RedisPresence {
    commands: Commands,
    /// `<prefix>:plive`, the leases: the key every function is called with.
    key: String,
    /// This instance's name in the leases.
    instance: String,
    config: PresenceConfig,
    /// The presences of this instance's connections, `(room, connection) → user`: joined
    /// again when its lease had lapsed (and others swept them) or Redis lost them.
    local: std::sync::Mutex<std::collections::HashMap<(String, ConnId), String>>,
}

impl RedisPresence {
    /// Presence on the Redis `target` names, under `prefix` (nothing is connected yet).
    pub fn open(target: &RedisTarget, prefix: &str, config: PresenceConfig) -> RedisPresence {
        RedisPresence {
            commands: Commands::new(target.clone()),
            key: format!("{prefix}:plive"),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            config,
            local: Default::default(),
        }
    }

    /// What it tracks.
    pub fn config(&self) -> &PresenceConfig {
        &self.config
    }

    /// Calls function `name` of the library (loaded again when Redis lost it).
    async fn fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        args: &[&str],
    ) -> Result<T, redis::RedisError> {
        fcall(&self.commands, name, &[&self.key], args).await
    }

    fn parse(json: String) -> Result<Value, redis::RedisError> {
        serde_json::from_str(&json).map_err(|_| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a presence snapshot Redis returned is not JSON",
            ))
        })
    }

    /// Connection `conn` of `user` is in `room`: the snapshot after the join.
    pub async fn join(
        &self,
        room: &str,
        user: &str,
        conn: ConnId,
    ) -> Result<Value, redis::RedisError> {
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((room.to_string(), conn), user.to_string());
        let conn = conn.to_string();
        let args = [room, user, self.instance.as_str(), conn.as_str()];
        Self::parse(self.fcall("patchbay_presence_join", &args).await?)
    }

    /// Connection `conn` of `user` left `room`; a dropped one after the grace. Runs in the
    /// background.
    pub fn leave(self: &Arc<Self>, room: &str, user: &str, conn: ConnId, how: Leave) {
        let (presence, room, user) = (self.clone(), room.to_string(), user.to_string());
        tokio::spawn(async move {
            let reason = match how {
                Leave::Left => "left",
                Leave::Timeout => {
                    tokio::time::sleep(presence.config.grace).await;
                    "timeout"
                }
            };
            presence
                .local
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(room.clone(), conn));
            let conn = conn.to_string();
            let args = [
                room.as_str(),
                user.as_str(),
                presence.instance.as_str(),
                conn.as_str(),
                reason,
            ];
            if let Err(e) = presence
                .fcall::<u64>("patchbay_presence_leave", &args)
                .await
            {
                // The lease sweep takes it out should this instance die; until then the
                // user stays listed.
                tracing::warn!(%room, error = %e, "a presence leave failed");
            }
        });
    }

    /// `user` sets its state (`state`, checked JSON text) in `room`.
    pub async fn set(&self, room: &str, user: &str, state: &str) -> Result<u64, SetError> {
        match self
            .fcall::<u64>("patchbay_presence_set", &[room, user, state])
            .await
        {
            Ok(version) => Ok(version),
            Err(e) if e.code() == Some("NOTIN") => Err(SetError::NotIn),
            Err(e) => {
                tracing::warn!(%room, error = %e, "a presence state update failed");
                Err(SetError::Unavailable)
            }
        }
    }

    /// The snapshot of `room`.
    pub async fn snapshot(&self, room: &str) -> Result<Value, redis::RedisError> {
        Self::parse(self.fcall("patchbay_presence_get", &[room]).await?)
    }

    /// Joins every presence of this instance's connections again: its lease had lapsed (Redis
    /// was out of reach for longer than [`LEASE`], and another instance swept them) or Redis
    /// lost them. Users not present any more get a JOIN.
    async fn rejoin(&self) {
        let local: Vec<((String, ConnId), String)> = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tracing::warn!(
            presences = local.len(),
            "this instance's presence lease had lapsed: joining its presences again"
        );
        for ((room, conn), user) in local {
            if let Err(e) = self.join(&room, &user, conn).await {
                tracing::warn!(%room, error = %e, "a presence could not be joined again");
            }
        }
    }

    /// Renews this instance's lease and sweeps lapsed ones, every [`RENEW_EVERY`] until
    /// `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(RENEW_EVERY);
        let lease = LEASE.as_millis().to_string();
        let mut failing = false;
        let mut registered = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let renewed = self
                .fcall::<i64>("patchbay_presence_renew", &[&self.instance, &lease])
                .await;
            if renewed == Ok(1) && registered {
                self.rejoin().await;
            }
            registered |= renewed.is_ok();
            let swept = match renewed {
                Ok(_) => self.fcall::<u64>("patchbay_presence_sweep", &[]).await,
                Err(e) => Err(e),
            };
            match swept {
                Ok(left) => {
                    failing = false;
                    if left > 0 {
                        tracing::info!(
                            users = left,
                            "swept the presences of an instance that stopped renewing its lease"
                        );
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot renew the presence lease; retrying");
                }
                Err(_) => {}
            }
        }
    }
}
