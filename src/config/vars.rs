//! The variables: their names and defaults in one table, reading them (an unset one is its
//! default), refusing unknown names, and the one line that tells an operator the effective
//! modes.

use std::collections::HashMap;

use serde::Deserialize;

use super::{AllowedOrigins, Config, ConfigError, non_empty};

/// One configuration variable: the only place its name and default are written down.
/// `.env.example` repeats each with a longer explanation (a test keeps the two in step).
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// `PATCHBAY_...`.
    pub name: &'static str,
    /// The value used when the variable is unset; empty means "none".
    pub default: &'static str,
    /// What it sets, in one line.
    pub help: &'static str,
}

const fn var(name: &'static str, default: &'static str, help: &'static str) -> Var {
    Var {
        name,
        default,
        help,
    }
}

/// Every variable patchbay reads, with its default. Any other `PATCHBAY_*` name stops
/// start-up: a misspelt variable must never silently turn a feature off
/// (`PATCHBAY_JWT_SECERT` would otherwise let everyone in).
#[rustfmt::skip]
pub const VARIABLES: [Var; 46] = [
    var("PATCHBAY_LISTEN", "127.0.0.1:8080", "address to bind; port 0 picks a free port"),
    var("PATCHBAY_API_URL", "", "base URL of the REST API that `http` actions call"),
    var("PATCHBAY_ACTIONS", "./actions", "directory of action manifests"),
    var("PATCHBAY_REDIS_URL", "", "unset: in-memory bus; set: the Redis bus"),
    var("PATCHBAY_REDIS_CA_FILE", "", "PEM CA certificates a rediss:// server is checked against instead of the platform's"),
    var("PATCHBAY_REDIS_SENTINEL_PASSWORD", "", "password of the Sentinels of a redis+sentinel:// URL"),
    var("PATCHBAY_REDIS_PREFIX", "patchbay", "prefix of every Redis channel patchbay owns"),
    var("PATCHBAY_TASK_CHANNELS", "tasks.*", "channel pattern of task progress; one `*`, the task id"),
    var("PATCHBAY_JWT_SECRET", "", "enables HS256 JWT authentication; at least 32 bytes"),
    var("PATCHBAY_JWT_LEEWAY_SECS", "5", "clock skew allowed on `exp` and `nbf`, seconds"),
    var("PATCHBAY_JWKS_URL", "", "enables JWTs signed by an identity provider's keys (RS256, ES256, ...) from this JWKS URL"),
    var("PATCHBAY_JWT_ISSUER", "", "the `iss` every JWT must carry; empty: not checked"),
    var("PATCHBAY_JWT_AUDIENCE", "", "an `aud` every JWT must carry; empty: not checked"),
    var("PATCHBAY_AUTH_URL", "", "enables delegated authentication"),
    var("PATCHBAY_AUTH_TIMEOUT_MS", "3000", "how long the auth service may take, milliseconds"),
    var("PATCHBAY_ALLOW_ANONYMOUS", "", "accept connections without credentials; empty: only when no auth method is set"),
    var("PATCHBAY_PUBLIC_ROOMS", "", "rooms anyone may join"),
    var("PATCHBAY_ALLOWED_ORIGINS", "", "extra allowed `Origin`s; `*` allows any"),
    var("PATCHBAY_TRUSTED_PROXIES", "", "addresses or networks of reverse proxies whose X-Forwarded-For/Forwarded/X-Forwarded-Host are believed"),
    var("PATCHBAY_PROXY_HEADER", "x-forwarded-for", "the header the trusted proxies list addresses in: x-forwarded-for or forwarded"),
    var("PATCHBAY_ROOM_SECRET", "", "key of room tokens, at least 16 bytes; empty: random per process"),
    var("PATCHBAY_FORWARD_HEADERS", "cookie,authorization", "handshake headers sent upstream"),
    var("PATCHBAY_PUBLISH_TOKEN", "", "enables `POST /publish`; at least 16 bytes"),
    var("PATCHBAY_MAX_FRAME_BYTES", "65536", "largest client message, bytes"),
    var("PATCHBAY_MAX_INFLIGHT", "32", "requests in flight per connection"),
    var("PATCHBAY_RATE_PER_SEC", "100", "frames per second per connection"),
    var("PATCHBAY_RATE_BURST", "200", "burst of the per-connection token bucket"),
    var("PATCHBAY_MAX_ROOMS", "256", "rooms per connection"),
    var("PATCHBAY_MAX_CONNECTIONS", "100000", "connections per instance"),
    var("PATCHBAY_MAX_PUBLISH_ROOMS", "1000", "target rooms of one published action"),
    var("PATCHBAY_SEND_QUEUE", "1024", "frames queued per connection before 4008"),
    var("PATCHBAY_SEND_QUEUE_BYTES", "8388608", "bytes queued per connection before 4008, at least 2 MiB"),
    var("PATCHBAY_PING_INTERVAL_SECS", "25", "websocket ping interval, seconds"),
    var("PATCHBAY_SSE_HEARTBEAT_SECS", "15", "seconds of silence on an SSE stream before a `: ping` comment"),
    var("PATCHBAY_IDLE_TIMEOUT_SECS", "60", "close a silent client after this long, seconds"),
    var("PATCHBAY_SHUTDOWN_GRACE_SECS", "10", "time for in-flight requests at shutdown, seconds"),
    var("PATCHBAY_HISTORY_ROOMS", "task:*,user:*", "rooms that keep history for recovery; empty: none"),
    var("PATCHBAY_HISTORY_SIZE", "100", "actions kept per history room"),
    var("PATCHBAY_HISTORY_TTL_SECS", "300", "a history room's actions expire this long after its last append, seconds"),
    var("PATCHBAY_RECOVER_MAX", "1000", "most actions replayed to one connection for one SUBSCRIBE"),
    var("PATCHBAY_PRESENCE_ROOMS", "", "rooms that track which users are in them; empty: none"),
    var("PATCHBAY_PRESENCE_GRACE_MS", "5000", "how long a dropped connection's user stays present, ms"),
    var("PATCHBAY_EMITTER_KEY", "", "socket.io emitter key to listen to (the emitters' `key`, usually socket.io); empty: off; needs PATCHBAY_REDIS_URL"),
    var("PATCHBAY_EMITTER_ROOMS", "", "socket.io room to patchbay room rules, e.g. user({id})=user:{id}; a room no rule matches is used as it is"),
    var("PATCHBAY_LOG", "info", "tracing filter"),
    var("PATCHBAY_LOG_FORMAT", "text", "log lines as text, or json: one JSON object per line"),
];

/// The variables as `envy` reads them (names lowercased, without the prefix);
/// [`Config::from_raw`] validates them. An unset variable reads as its [`VARIABLES`] default.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(super) struct Raw(HashMap<String, String>);

impl Raw {
    /// The value of `PATCHBAY_<NAME>` (`name` in lowercase), else its default.
    pub(super) fn get(&self, name: &str) -> &str {
        #[cfg(test)]
        READ.with(|read| read.borrow_mut().insert(name.to_ascii_uppercase()));
        self.0.get(name).map_or_else(
            || {
                VARIABLES
                    .iter()
                    .find(|v| v.name["PATCHBAY_".len()..].eq_ignore_ascii_case(name))
                    .map(|v| v.default)
                    .unwrap_or_else(|| panic!("{name} is not in VARIABLES"))
            },
            String::as_str,
        )
    }

    /// The value, trimmed, or `None` when it is empty.
    pub(super) fn opt(&self, name: &str) -> Option<String> {
        non_empty(Some(self.get(name).to_string()))
    }
}

#[cfg(test)]
thread_local! {
    /// The names `Raw::get` was asked for on this thread, so a test can prove that every
    /// variable in the table is read.
    static READ: std::cell::RefCell<std::collections::HashSet<String>> = Default::default();
}

/// Refuses any `PATCHBAY_*` name that is not in [`VARIABLES`], naming the closest known one
/// (or saying that a later version has it).
pub(super) fn check_names(vars: &[(String, String)]) -> Result<(), ConfigError> {
    if let Some((unknown, _)) = vars
        .iter()
        .find(|(k, _)| !VARIABLES.iter().any(|v| v.name == k))
    {
        return Err(ConfigError(format!(
            "unknown variable {unknown} (did you mean {}?)",
            closest(unknown)
        )));
    }
    Ok(())
}

impl Config {
    /// One line with the effective modes, logged once at start-up so an operator sees what
    /// this instance really does. Never includes a secret.
    pub fn summary(&self) -> String {
        let bus = match &self.redis_url {
            None => "memory".to_string(),
            Some(url) => format!("redis {}", redacted_redis(url)),
        };
        let mut auth = Vec::new();
        if self.jwt_secret.is_some() {
            auth.push("jwt-hs256");
        }
        if self.jwks_url.is_some() {
            auth.push("jwt-jwks");
        }
        if self.auth_url.is_some() {
            auth.push("delegated");
        }
        let origins = match &self.allowed_origins {
            AllowedOrigins::Any => "any".to_string(),
            AllowedOrigins::List(l) if l.is_empty() => "same-host".to_string(),
            AllowedOrigins::List(l) => format!("same-host,{}", l.join(",")),
        };
        let public: Vec<String> = self.public_rooms.iter().map(ToString::to_string).collect();
        format!(
            "patchbay {} modes: bus={bus} auth={} anonymous={} origins={origins} public_rooms={} publish={} room_secret={}",
            env!("CARGO_PKG_VERSION"),
            if auth.is_empty() {
                "none".to_string()
            } else {
                auth.join(",")
            },
            if self.allow_anonymous {
                "allowed"
            } else {
                "refused"
            },
            if public.is_empty() {
                "none".to_string()
            } else {
                public.join(",")
            },
            if self.publish_token.is_some() {
                "on"
            } else {
                "off"
            },
            if self.room_secret_is_random {
                "random"
            } else {
                "set"
            },
        )
    }
}

/// A Redis URL as it may be logged: scheme, host, port and database, never credentials.
fn redacted_redis(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(unparsable URL)".to_string();
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!(
        "{scheme}://{hosts}{}",
        path.split('?').next().unwrap_or_default()
    )
}

/// The known variable closest to `name` (edit distance), for "did you mean".
fn closest(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .map(|v| v.name)
        .min_by_key(|known| strsim::levenshtein(name, known))
        .expect("the list is not empty")
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn unknown_variables_are_refused_with_the_closest_name() {
        for (typo, meant) in [
            ("PATCHBAY_JWT_SECERT", "PATCHBAY_JWT_SECRET"),
            ("PATCHBAY_REDIS_ULR", "PATCHBAY_REDIS_URL"),
            ("PATCHBAY_PUBLISHTOKEN", "PATCHBAY_PUBLISH_TOKEN"),
            ("PATCHBAY_", "PATCHBAY_LOG"),
        ] {
            let e = cfg(&[(typo, "x")]).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("unknown variable {typo} (did you mean {meant}?)"),
                "{typo}"
            );
        }
        // Names without the prefix are none of patchbay's business.
        cfg(&[("PATCH_BAY", "x"), ("HOME", "/root")]).unwrap();
    }

    #[test]
    fn every_known_variable_is_read_and_listed_in_env_example_with_its_default() {
        // Every name `from_raw` reads must be in VARIABLES (`Raw::get` panics otherwise), and
        // every name in VARIABLES must be read: a row nothing reads would be a setting
        // silently ignored.
        READ.with(|read| read.borrow_mut().clear());
        Config::default();
        let read: Vec<String> = READ.with(|read| {
            let mut names: Vec<String> = read
                .borrow()
                .iter()
                .map(|n| format!("PATCHBAY_{n}"))
                .collect();
            names.sort_unstable();
            names
        });
        let mut table: Vec<String> = VARIABLES.iter().map(|v| v.name.to_string()).collect();
        table.sort_unstable();
        assert_eq!(read, table, "every variable in the table is read");
        let example = include_str!("../../.env.example");
        let mut listed: Vec<(&str, &str)> = example
            .lines()
            .filter(|l| l.starts_with("PATCHBAY_"))
            .filter_map(|l| l.split_once('='))
            .collect();
        listed.sort_unstable();
        let mut known: Vec<(&str, &str)> = VARIABLES.iter().map(|v| (v.name, v.default)).collect();
        known.sort_unstable();
        assert_eq!(
            listed, known,
            ".env.example lists exactly the known variables and defaults"
        );
    }

    #[test]
    fn the_summary_names_the_modes_and_no_secret() {
        let c = cfg(&[
            (
                "PATCHBAY_REDIS_URL",
                "redis://:hunter2hunter2@redis.internal:6380/2",
            ),
            ("PATCHBAY_JWT_SECRET", JWT_SECRET),
            ("PATCHBAY_PUBLISH_TOKEN", "publish token of 29 bytes!!!!"),
            ("PATCHBAY_PUBLIC_ROOMS", "lobby"),
        ])
        .unwrap();
        let line = c.summary();
        assert!(
            line.contains("bus=redis redis://redis.internal:6380/2"),
            "{line}"
        );
        assert!(
            line.contains("auth=jwt-hs256") && line.contains("anonymous=refused"),
            "{line}"
        );
        assert!(
            line.contains("public_rooms=lobby") && line.contains("publish=on"),
            "{line}"
        );
        for secret in ["hunter2", JWT_SECRET, "publish token"] {
            assert!(!line.contains(secret), "{line}");
        }
        assert!(Config::default().summary().contains("bus=memory"));
    }
}
