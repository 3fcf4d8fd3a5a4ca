//! Typed configuration. `main` reads it from `PATCHBAY_*` variables with [`Config::from_env`];
//! library code only ever sees the validated [`Config`], never the environment.
//!
//! Every field documents its default and unit; `.env.example` mirrors this file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper::header::HeaderName;

use crate::rooms::RoomPattern;

mod vars;

use vars::Raw;
pub use vars::{VARIABLES, Var};

/// Headers about the connection itself, which would corrupt an upstream request.
const NOT_FORWARDABLE: [&str; 10] = [
    "host",
    "connection",
    "upgrade",
    "content-length",
    "content-type",
    "transfer-encoding",
    "keep-alive",
    "te",
    "trailer",
    "expect",
];
/// Shortest accepted `PATCHBAY_ROOM_SECRET` and `PATCHBAY_PUBLISH_TOKEN`.
const MIN_SECRET_BYTES: usize = 16;
/// Shortest accepted `PATCHBAY_JWT_SECRET`: an HS256 key should be as long as its hash.
const MIN_JWT_SECRET_BYTES: usize = 32;

/// Smallest accepted `PATCHBAY_SEND_QUEUE_BYTES`: a 1 MiB reply plus room for others.
const MIN_QUEUE_BYTES: usize = 2 * 1024 * 1024;
/// Longest accepted duration setting: one day. Longer is surely a mistake, and unbounded values
/// would overflow timers.
const MAX_SECS: u64 = 86_400;

/// Why the configuration cannot be used. The message always names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub(crate) String);

impl ConfigError {
    pub(crate) fn var(name: &str, msg: impl std::fmt::Display) -> Self {
        ConfigError(format!("PATCHBAY_{}: {msg}", name.to_ascii_uppercase()))
    }
}

/// Which origins may open a websocket besides same-host pages (contract section 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: any origin.
    Any,
    /// Exact `scheme://host[:port]` values, compared case-insensitively.
    List(Vec<String>),
}

/// Validated configuration of one patchbay instance. Defaults live in [`VARIABLES`] only.
#[derive(Debug, Clone)]
pub struct Config {
    /// `PATCHBAY_LISTEN`: the address to bind.
    pub listen: SocketAddr,
    /// `PATCHBAY_API_URL`: base URL of the REST API, without trailing slash.
    pub api_url: Option<String>,
    /// `PATCHBAY_ACTIONS`: manifest directory.
    pub actions_dir: PathBuf,
    /// `PATCHBAY_TRUSTED_PROXIES`.
    pub trusted_proxies: crate::client_addr::TrustedProxies,
    /// `PATCHBAY_REDIS_URL`: `None` is the in-memory bus.
    pub redis_url: Option<String>,
    /// `PATCHBAY_REDIS_CA_FILE` (its certificates) and `PATCHBAY_REDIS_SENTINEL_PASSWORD`.
    pub redis_options: crate::bus::RedisOptions,
    /// `PATCHBAY_REDIS_PREFIX`.
    pub redis_prefix: String,
    /// `PATCHBAY_TASK_CHANNELS`: a channel pattern with one `*`.
    pub task_channels: String,
    /// `PATCHBAY_JWT_SECRET`.
    pub jwt_secret: Option<String>,
    /// `PATCHBAY_JWT_LEEWAY_SECS`.
    pub jwt_leeway: Duration,
    /// `PATCHBAY_JWKS_URL`: the identity provider's signing keys (RS256, ES256, …).
    pub jwks_url: Option<String>,
    /// How soon a token with an unknown `kid` may fetch the key set again (one minute; tests
    /// shorten it).
    pub jwks_refetch_after: Duration,
    /// `PATCHBAY_JWT_ISSUER`: the `iss` every JWT must carry.
    pub jwt_issuer: Option<String>,
    /// `PATCHBAY_JWT_AUDIENCE`: an `aud` every JWT must carry.
    pub jwt_audience: Option<String>,
    /// `PATCHBAY_AUTH_URL`.
    pub auth_url: Option<String>,
    /// `PATCHBAY_AUTH_TIMEOUT_MS`: how long the auth service may take to answer a handshake.
    pub auth_timeout: Duration,
    /// `PATCHBAY_ALLOW_ANONYMOUS`: when unset, true only when no auth method is set.
    pub allow_anonymous: bool,
    /// `PATCHBAY_PUBLIC_ROOMS`: rooms any connection may join.
    pub public_rooms: Vec<RoomPattern>,
    /// `PATCHBAY_ALLOWED_ORIGINS`: origins allowed besides same-host pages.
    pub allowed_origins: AllowedOrigins,
    /// `PATCHBAY_ROOM_SECRET`: key of room tokens; random per process when unset.
    pub room_secret: Vec<u8>,
    /// Whether `room_secret` was set explicitly (a random one differs per instance).
    pub room_secret_is_random: bool,
    /// `PATCHBAY_FORWARD_HEADERS`.
    pub forward_headers: Vec<HeaderName>,
    /// `PATCHBAY_PUBLISH_TOKEN`: enables `POST /publish`.
    pub publish_token: Option<String>,
    /// `PATCHBAY_MAX_FRAME_BYTES`, bytes.
    pub max_frame_bytes: usize,
    /// `PATCHBAY_MAX_INFLIGHT`, requests per connection.
    pub max_inflight: usize,
    /// `PATCHBAY_RATE_PER_SEC`, frames per second per connection.
    pub rate_per_sec: f64,
    /// `PATCHBAY_RATE_BURST`, frames.
    pub rate_burst: u32,
    /// `PATCHBAY_MAX_ROOMS`, rooms per connection.
    pub max_rooms: usize,
    /// `PATCHBAY_MAX_CONNECTIONS`, per instance.
    pub max_connections: usize,
    /// `PATCHBAY_MAX_PUBLISH_ROOMS`, target rooms per published action.
    pub max_publish_rooms: usize,
    /// `PATCHBAY_SEND_QUEUE`: messages queued per connection before it is
    /// closed with 4008 as too slow.
    pub send_queue: usize,
    /// `PATCHBAY_SEND_QUEUE_BYTES`: bytes (at least 2 MiB) queued per connection
    /// before it is closed with 4008 as too slow.
    pub send_queue_bytes: usize,
    /// `PATCHBAY_PING_INTERVAL_SECS`: time between websocket pings.
    pub ping_interval: Duration,
    /// `PATCHBAY_SSE_HEARTBEAT_SECS`: silence on an SSE stream before a comment is written.
    pub sse_heartbeat: Duration,
    /// `PATCHBAY_IDLE_TIMEOUT_SECS`: time without any frame from the client.
    pub idle_timeout: Duration,
    /// `PATCHBAY_SHUTDOWN_GRACE_SECS`: time for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// `PATCHBAY_HISTORY_*` and `PATCHBAY_RECOVER_MAX`: `None` when no room keeps history
    /// (none listed, or the Redis bus, which keeps none yet).
    pub history: Option<crate::history::HistoryConfig>,
    /// `PATCHBAY_PRESENCE_*`: `None` when no room tracks presence (none listed, or the Redis
    /// bus, which tracks none yet).
    pub presence: Option<crate::presence::PresenceConfig>,
    /// `PATCHBAY_EMITTER_KEY` and `PATCHBAY_EMITTER_ROOMS`: the socket.io emitter key listened
    /// to and its room rules; `None` when off.
    pub emitter: Option<(String, crate::emitter::RoomRules)>,
    /// `PATCHBAY_LOG`: a tracing filter.
    pub log: String,
    /// `PATCHBAY_LOG_FORMAT`: log lines as JSON objects rather than text.
    pub log_json: bool,
}

impl Default for Config {
    /// The documented defaults, as if no variable were set (with a random room secret).
    fn default() -> Self {
        Config::from_raw(Raw::default()).expect("defaults are valid")
    }
}

impl Config {
    /// Reads `PATCHBAY_*` from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads `PATCHBAY_*` from the given pairs (names without the prefix are ignored; an
    /// unknown `PATCHBAY_*` name is an error naming the closest known one).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("PATCHBAY_"))
            .collect();
        vars::check_names(&vars)?;
        let raw: Raw = envy::prefixed("PATCHBAY_")
            .from_iter(vars)
            .map_err(|e| ConfigError(format!("configuration: {e}")))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        let listen = raw.get("listen").trim().parse().map_err(|_| {
            ConfigError::var(
                "listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:8080",
                    raw.get("listen")
                ),
            )
        })?;
        let api_url = raw
            .opt("api_url")
            .map(|u| parse_url("api_url", &u).map(|u| u.trim_end_matches('/').to_string()))
            .transpose()?;
        let redis_url = raw.opt("redis_url");
        let redis_options = redis_options(&raw, redis_url.as_deref())?;
        let jwt_secret = secret("jwt_secret", raw.opt("jwt_secret"), MIN_JWT_SECRET_BYTES)?;
        let jwks_url = raw
            .opt("jwks_url")
            .map(|u| parse_url("jwks_url", &u))
            .transpose()?;
        let (jwt_issuer, jwt_audience) = (raw.opt("jwt_issuer"), raw.opt("jwt_audience"));
        if jwt_secret.is_none() && jwks_url.is_none() {
            for name in ["jwt_issuer", "jwt_audience"] {
                if raw.opt(name).is_some() {
                    return Err(ConfigError::var(
                        name,
                        "is set but no JWTs are checked (set PATCHBAY_JWT_SECRET or PATCHBAY_JWKS_URL)",
                    ));
                }
            }
        }
        let publish_token = secret("publish_token", raw.opt("publish_token"), MIN_SECRET_BYTES)?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(raw.get("log")) {
            return Err(ConfigError::var(
                "log",
                format!("`{}` is not a tracing filter ({e})", raw.get("log")),
            ));
        }
        let auth_url = raw
            .opt("auth_url")
            .map(|u| parse_url("auth_url", &u))
            .transpose()?;
        let allow_anonymous = match raw.opt("allow_anonymous") {
            None => jwt_secret.is_none() && jwks_url.is_none() && auth_url.is_none(),
            Some(v) => parse_bool("allow_anonymous", &v)?,
        };
        let public_rooms: Vec<RoomPattern> = list(raw.get("public_rooms"))
            .map(|p| RoomPattern::parse(p).map_err(|e| ConfigError::var("public_rooms", e)))
            .collect::<Result<_, _>>()?;
        if let Some(p) = public_rooms.iter().find(|p| p.can_match_prefix("user:")) {
            return Err(ConfigError::var(
                "public_rooms",
                format!("`{p}` would let anyone join other users' `user:` rooms; name other rooms"),
            ));
        }
        let history_rooms: Vec<RoomPattern> = list(raw.get("history_rooms"))
            .map(|p| RoomPattern::parse(p).map_err(|e| ConfigError::var("history_rooms", e)))
            .collect::<Result<_, _>>()?;
        let history = crate::history::HistoryConfig {
            rooms: history_rooms,
            size: positive::<usize>("history_size", raw.get("history_size"))?.min(100_000),
            ttl: Duration::from_secs(positive("history_ttl_secs", raw.get("history_ttl_secs"))?),
            recover_max: positive("recover_max", raw.get("recover_max"))?,
        };
        let history = (!history.rooms.is_empty()).then_some(history);
        let presence_rooms: Vec<RoomPattern> = list(raw.get("presence_rooms"))
            .map(|p| RoomPattern::parse(p).map_err(|e| ConfigError::var("presence_rooms", e)))
            .collect::<Result<_, _>>()?;
        let grace_ms: u64 = raw.get("presence_grace_ms").trim().parse().map_err(|_| {
            ConfigError::var("presence_grace_ms", "must be a number of milliseconds")
        })?;
        let presence = (!presence_rooms.is_empty()).then(|| crate::presence::PresenceConfig {
            rooms: presence_rooms,
            grace: Duration::from_millis(grace_ms.min(3_600_000)),
        });
        let origins: Vec<String> = list(raw.get("allowed_origins"))
            .map(|o| o.to_ascii_lowercase())
            .collect();
        if let Some(bad) = origins
            .iter()
            .find(|o| *o != "*" && crate::auth::origin_host(o).is_none())
        {
            return Err(ConfigError::var(
                "allowed_origins",
                format!(
                    "`{bad}` is not an origin like https://app.example.com (scheme and host, optional port, nothing after)"
                ),
            ));
        }
        let allowed_origins = if origins.iter().any(|o| o == "*") {
            AllowedOrigins::Any
        } else {
            AllowedOrigins::List(origins)
        };
        let (room_secret, room_secret_is_random) = match raw.opt("room_secret") {
            Some(s) if s.len() < MIN_SECRET_BYTES => {
                return Err(ConfigError::var(
                    "room_secret",
                    format!("must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
            Some(s) => (s.into_bytes(), false),
            None => (
                uuid::Uuid::new_v4()
                    .as_bytes()
                    .iter()
                    .chain(uuid::Uuid::new_v4().as_bytes())
                    .copied()
                    .collect(),
                true,
            ),
        };
        let forward_headers = list(raw.get("forward_headers"))
            .map(|h| {
                let name = HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    ConfigError::var("forward_headers", format!("`{h}` is not a header name"))
                })?;
                let n = name.as_str();
                if NOT_FORWARDABLE.contains(&n) || n.starts_with("sec-websocket-") || n.starts_with("proxy-") {
                    return Err(ConfigError::var(
                        "forward_headers",
                        format!("`{h}` describes the websocket connection itself and cannot be forwarded"),
                    ));
                }
                Ok(name)
            })
            .collect::<Result<_, _>>()?;
        let task_channels = raw.get("task_channels").trim().to_string();
        if task_channels.matches('*').count() != 1
            || task_channels.contains(['?', '[', ']', '\\'])
            || task_channels.contains(char::is_whitespace)
        {
            return Err(ConfigError::var(
                "task_channels",
                format!(
                    "`{task_channels}` must contain exactly one `*` (the task id) and no other pattern characters"
                ),
            ));
        }
        if raw.get("redis_prefix").is_empty()
            || raw.get("redis_prefix").contains(char::is_whitespace)
        {
            return Err(ConfigError::var(
                "redis_prefix",
                "must be a non-empty word without spaces",
            ));
        }
        let ping_interval = seconds("ping_interval_secs", raw.get("ping_interval_secs"), 1)?;
        let sse_heartbeat = seconds("sse_heartbeat_secs", raw.get("sse_heartbeat_secs"), 1)?;
        let idle_timeout = seconds("idle_timeout_secs", raw.get("idle_timeout_secs"), 1)?;
        if idle_timeout <= ping_interval {
            return Err(ConfigError::var(
                "idle_timeout_secs",
                "must be longer than PATCHBAY_PING_INTERVAL_SECS, or every quiet client is closed before its pong can arrive",
            ));
        }
        let send_queue_bytes: usize = number("send_queue_bytes", raw.get("send_queue_bytes"))?;
        if send_queue_bytes < MIN_QUEUE_BYTES {
            return Err(ConfigError::var(
                "send_queue_bytes",
                format!("must be at least {MIN_QUEUE_BYTES} (replies can be 1 MiB)"),
            ));
        }
        if !allow_anonymous && jwt_secret.is_none() && jwks_url.is_none() && auth_url.is_none() {
            return Err(ConfigError::var(
                "allow_anonymous",
                "is false but no authentication method (PATCHBAY_JWT_SECRET, PATCHBAY_JWKS_URL, PATCHBAY_AUTH_URL) is set: nobody could connect",
            ));
        }
        let emitter = emitter(&raw, redis_url.is_some())?;
        let rate_per_sec: f64 = number("rate_per_sec", raw.get("rate_per_sec"))?;
        if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) {
            return Err(ConfigError::var(
                "rate_per_sec",
                "must be a positive number",
            ));
        }
        Ok(Config {
            listen,
            api_url,
            actions_dir: PathBuf::from(raw.get("actions")),
            trusted_proxies: crate::client_addr::TrustedProxies::new(
                raw.get("trusted_proxies"),
                crate::client_addr::ChainHeader::parse(raw.get("proxy_header"))
                    .map_err(|e| ConfigError::var("proxy_header", e))?,
            )
            .map_err(|e| ConfigError::var("trusted_proxies", e))?,
            redis_url,
            redis_options,
            redis_prefix: raw.get("redis_prefix").to_string(),
            task_channels,
            jwt_secret,
            jwt_leeway: seconds("jwt_leeway_secs", raw.get("jwt_leeway_secs"), 0)?,
            jwks_url,
            jwks_refetch_after: crate::auth::jwks::REFETCH_AFTER,
            jwt_issuer,
            jwt_audience,
            auth_url,
            auth_timeout: Duration::from_millis(
                positive::<u64>("auth_timeout_ms", raw.get("auth_timeout_ms"))?.min(60_000),
            ),
            allow_anonymous,
            public_rooms,
            allowed_origins,
            room_secret,
            room_secret_is_random,
            forward_headers,
            publish_token,
            max_frame_bytes: positive("max_frame_bytes", raw.get("max_frame_bytes"))?,
            max_inflight: positive("max_inflight", raw.get("max_inflight"))?,
            rate_per_sec,
            rate_burst: positive("rate_burst", raw.get("rate_burst"))?,
            max_rooms: positive("max_rooms", raw.get("max_rooms"))?,
            max_connections: positive("max_connections", raw.get("max_connections"))?,
            max_publish_rooms: positive("max_publish_rooms", raw.get("max_publish_rooms"))?,
            send_queue: positive("send_queue", raw.get("send_queue"))?,
            send_queue_bytes,
            ping_interval,
            sse_heartbeat,
            idle_timeout,
            shutdown_grace: seconds("shutdown_grace_secs", raw.get("shutdown_grace_secs"), 0)?,
            history,
            presence,
            emitter,
            log: raw.get("log").to_string(),
            log_json: match raw.get("log_format").trim() {
                "text" => false,
                "json" => true,
                other => {
                    return Err(ConfigError::var(
                        "log_format",
                        format!("`{other}` is neither text nor json"),
                    ));
                }
            },
        })
    }
}

/// A secret setting: unset or empty is `None`; a shorter one than `min` bytes is refused.
/// The CA file and the Sentinels' password, checked with the URL they go with (a URL the
/// Redis client cannot use stops start-up here, naming the variable).
fn redis_options(raw: &Raw, url: Option<&str>) -> Result<crate::bus::RedisOptions, ConfigError> {
    let ca = match raw.opt("redis_ca_file") {
        None => None,
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let pem = std::fs::read(&path).map_err(|e| {
                ConfigError::var("redis_ca_file", format!("cannot read `{path}`: {e}"))
            })?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ConfigError::var("redis_ca_file", format!("`{path}` is not PEM: {e}"))
                })?;
            if certs.is_empty() {
                return Err(ConfigError::var(
                    "redis_ca_file",
                    format!("`{path}` holds no PEM certificate"),
                ));
            }
            Some(pem)
        }
    };
    let options = crate::bus::RedisOptions {
        ca,
        sentinel_password: raw.opt("redis_sentinel_password"),
    };
    let Some(url) = url else {
        for name in ["redis_ca_file", "redis_sentinel_password"] {
            if raw.opt(name).is_some() {
                return Err(ConfigError::var(name, "is set without PATCHBAY_REDIS_URL"));
            }
        }
        return Ok(options);
    };
    if options.sentinel_password.is_some() && !url.contains("+sentinel://") {
        return Err(ConfigError::var(
            "redis_sentinel_password",
            "is set but PATCHBAY_REDIS_URL is not a redis+sentinel:// URL",
        ));
    }
    crate::bus::RedisTarget::open(url, &options)
        .map_err(|e| ConfigError::var("redis_url", e.to_string().replace("- ", "")))?;
    Ok(options)
}

fn secret(name: &str, v: Option<String>, min: usize) -> Result<Option<String>, ConfigError> {
    match non_empty(v) {
        Some(s) if s.len() < min => Err(ConfigError::var(
            name,
            format!("must be at least {min} bytes (it is {})", s.len()),
        )),
        v => Ok(v),
    }
}

pub(crate) fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `PATCHBAY_EMITTER_KEY` and `PATCHBAY_EMITTER_ROOMS`.
fn emitter(
    raw: &Raw,
    redis: bool,
) -> Result<Option<(String, crate::emitter::RoomRules)>, ConfigError> {
    let rules = crate::emitter::RoomRules::parse(raw.get("emitter_rooms"))
        .map_err(|e| ConfigError::var("emitter_rooms", e))?;
    let Some(key) = raw.opt("emitter_key") else {
        if raw.opt("emitter_rooms").is_some() {
            return Err(ConfigError::var(
                "emitter_rooms",
                "is set but PATCHBAY_EMITTER_KEY is not: nothing listens to the emitters",
            ));
        }
        return Ok(None);
    };
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::var(
            "emitter_key",
            format!("`{key}` must be printable ASCII without spaces"),
        ));
    }
    if !redis {
        return Err(ConfigError::var(
            "emitter_key",
            "needs PATCHBAY_REDIS_URL: the emitters publish through Redis",
        ));
    }
    Ok(Some((key, rules)))
}

/// Splits a comma list, dropping blanks.
fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| ConfigError::var(name, format!("`{v}` is not a valid number")))
}

fn seconds(name: &str, v: &str, min: u64) -> Result<Duration, ConfigError> {
    let n: u64 = number(name, v)?;
    if !(min..=MAX_SECS).contains(&n) {
        return Err(ConfigError::var(
            name,
            format!("`{v}` must be from {min} to {MAX_SECS} seconds"),
        ));
    }
    Ok(Duration::from_secs(n))
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    name: &str,
    v: &str,
) -> Result<T, ConfigError> {
    let n: T = number(name, v)?;
    if n <= T::default() {
        return Err(ConfigError::var(
            name,
            format!("`{v}` must be greater than 0"),
        ));
    }
    Ok(n)
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::var(
            name,
            format!("`{v}` is not true or false"),
        )),
    }
}

fn parse_url(name: &str, v: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(v)
        .map_err(|e| ConfigError::var(name, format!("`{v}` is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::var(
            name,
            format!("`{v}` must be an http:// or https:// URL"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::var(
            name,
            format!("`{v}` must not have a query or fragment"),
        ));
    }
    // Normalized: an international host in punycode, the path percent-encoded.
    Ok(url.to_string())
}

#[cfg(test)]
pub(super) mod test_support {
    use super::{Config, ConfigError};

    pub const JWT_SECRET: &str = "a jwt secret of at least 32 bytes";

    /// The configuration of these variables alone.
    pub fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.actions_dir, PathBuf::from("./actions"));
        assert_eq!(c.max_frame_bytes, 65536);
        assert_eq!(c.max_inflight, 32);
        assert_eq!(c.max_rooms, 256);
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.rate_burst, 200);
        assert!(c.allow_anonymous);
        assert!(c.room_secret_is_random);
        assert_eq!(
            c.forward_headers,
            vec![
                HeaderName::from_static("cookie"),
                HeaderName::from_static("authorization")
            ]
        );
        assert_eq!(c.allowed_origins, AllowedOrigins::List(vec![]));
    }

    /// A self-signed CA certificate (its key thrown away): something PATCHBAY_REDIS_CA_FILE
    /// can hold.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjjCCATOgAwIBAgIUTK4+GD/Nox5uI7Dmw2UXCuhMT7cwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQcGF0Y2hiYXktdGVzdC1jYTAgFw0yNjEyMDcxNzQ5MDNaGA8y
MTI2MTExMzE3NDkwM1owGzEZMBcGA1UEAwwQcGF0Y2hiYXktdGVzdC1jYTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABOfuxmXC3sGwfh/D/w3Wzs9QpQJoND74fZSy
RagcgJvB3dR6w11F2730mfJsGpfqV3iJlpgDrc74n1XiZwjGnRqjUzBRMB0GA1Ud
DgQWBBR/Oy2LvseIOHGqYvbsDC/1jNcbYzAfBgNVHSMEGDAWgBR/Oy2LvseIOHGq
YvbsDC/1jNcbYzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDD
vZapmO7bledC+ORzag55zrZV79+P8xRAXitLQypUYQIhAO775lH6/Ashi4V3RDRw
SsuaA3nTzHnyFOD6cUBx9i4n
-----END CERTIFICATE-----
";

    #[test]
    fn redis_urls_and_their_options_are_checked_at_start_up() {
        let dir = std::env::temp_dir().join(format!("patchbay-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, TEST_CA).unwrap();
        let garbled = dir.join("garbled.pem");
        std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let (missing, not_pem, pem, garbled) = (
            dir.join("missing.pem").display().to_string(),
            not_pem.display().to_string(),
            pem.display().to_string(),
            garbled.display().to_string(),
        );
        let tls = "rediss://redis.example.com:6380";
        for (vars, var, says) in [
            (
                vec![("PATCHBAY_REDIS_URL", "http://x")],
                "PATCHBAY_REDIS_URL",
                "",
            ),
            (
                vec![("PATCHBAY_REDIS_URL", "redis+sentinel://a:26379")],
                "PATCHBAY_REDIS_URL",
                "master",
            ),
            (
                vec![
                    ("PATCHBAY_REDIS_URL", tls),
                    ("PATCHBAY_REDIS_CA_FILE", &missing),
                ],
                "PATCHBAY_REDIS_CA_FILE",
                "cannot read",
            ),
            (
                vec![
                    ("PATCHBAY_REDIS_URL", tls),
                    ("PATCHBAY_REDIS_CA_FILE", &not_pem),
                ],
                "PATCHBAY_REDIS_CA_FILE",
                "no PEM",
            ),
            (
                vec![
                    ("PATCHBAY_REDIS_URL", tls),
                    ("PATCHBAY_REDIS_CA_FILE", &garbled),
                ],
                "PATCHBAY_REDIS_CA_FILE",
                "is not PEM",
            ),
            (
                vec![
                    ("PATCHBAY_REDIS_URL", "redis://x"),
                    ("PATCHBAY_REDIS_CA_FILE", &pem),
                ],
                "PATCHBAY_REDIS_URL",
                "not rediss",
            ),
            (
                vec![("PATCHBAY_REDIS_CA_FILE", &pem)],
                "PATCHBAY_REDIS_CA_FILE",
                "without PATCHBAY_REDIS_URL",
            ),
            (
                vec![
                    ("PATCHBAY_REDIS_URL", "redis://x"),
                    ("PATCHBAY_REDIS_SENTINEL_PASSWORD", "p"),
                ],
                "PATCHBAY_REDIS_SENTINEL_PASSWORD",
                "not a redis+sentinel",
            ),
        ] {
            let e = cfg(&vars).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{var}:")) && e.contains(says),
                "{vars:?}: {e}"
            );
        }
        let c = cfg(&[
            ("PATCHBAY_REDIS_URL", tls),
            ("PATCHBAY_REDIS_CA_FILE", &pem),
        ])
        .unwrap();
        assert!(c.redis_options.ca.is_some());
        let sentinel = "redis+sentinel://:pw@s1:26379,s2/mymaster/1";
        let c = cfg(&[
            ("PATCHBAY_REDIS_URL", sentinel),
            ("PATCHBAY_REDIS_SENTINEL_PASSWORD", "sp"),
        ])
        .unwrap();
        assert_eq!(c.redis_options.sentinel_password.as_deref(), Some("sp"));
        assert!(
            c.summary()
                .contains("bus=redis redis+sentinel://s1:26379,s2/mymaster/1 "),
            "{}",
            c.summary()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = cfg(&[("PATCHBAY_MAX_INFLIGHT", "lots")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_MAX_INFLIGHT:"), "{e}");
        let e = cfg(&[("PATCHBAY_MAX_ROOMS", "0")]).unwrap_err().to_string();
        assert!(e.starts_with("PATCHBAY_MAX_ROOMS:"), "{e}");
        let e = cfg(&[("PATCHBAY_LISTEN", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_LISTEN:"), "{e}");
        let e = cfg(&[("PATCHBAY_API_URL", "ftp://x")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_API_URL:"), "{e}");
        let e = cfg(&[("PATCHBAY_API_URL", "not a url")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_API_URL:"), "{e}");
        let e = cfg(&[("PATCHBAY_FORWARD_HEADERS", "cookie,bad header")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_FORWARD_HEADERS:"), "{e}");
        let e = cfg(&[("PATCHBAY_ALLOW_ANONYMOUS", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_ALLOW_ANONYMOUS:"), "{e}");
        let e = cfg(&[("PATCHBAY_PUBLIC_ROOMS", "lobby,bad room")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_PUBLIC_ROOMS:"), "{e}");
        for (var, value) in [
            ("PATCHBAY_IDLE_TIMEOUT_SECS", "18446744073709551615"),
            ("PATCHBAY_IDLE_TIMEOUT_SECS", "20"),
            ("PATCHBAY_SEND_QUEUE_BYTES", "1000"),
            ("PATCHBAY_ALLOW_ANONYMOUS", "false"),
            ("PATCHBAY_ALLOWED_ORIGINS", "https://app.example.com/"),
            ("PATCHBAY_FORWARD_HEADERS", "cookie,host"),
            ("PATCHBAY_FORWARD_HEADERS", "sec-websocket-key"),
            ("PATCHBAY_ROOM_SECRET", "short"),
            ("PATCHBAY_JWT_SECRET", "only 31 bytes, one too few....."),
            ("PATCHBAY_PUBLISH_TOKEN", "15 bytes token!"),
            ("PATCHBAY_LOG", "[[["),
            ("PATCHBAY_LOG", "patchbay=loud"),
            ("PATCHBAY_PUBLIC_ROOMS", "lobby,user:*"),
            ("PATCHBAY_PUBLIC_ROOMS", "user:42"),
            ("PATCHBAY_PUBLIC_ROOMS", "*"),
            ("PATCHBAY_PUBLIC_ROOMS", "us*"),
            ("PATCHBAY_MAX_PUBLISH_ROOMS", "0"),
        ] {
            let e = cfg(&[(var, value)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{var}:")), "{var}={value}: {e}");
        }
        let e = cfg(&[("PATCHBAY_TASK_CHANNELS", "tasks.*.*")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_TASK_CHANNELS:"), "{e}");
        let e = cfg(&[("PATCHBAY_TASK_CHANNELS", "tasks.42")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_TASK_CHANNELS:"), "{e}");
        let e = cfg(&[("PATCHBAY_RATE_PER_SEC", "NaN")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PATCHBAY_RATE_PER_SEC:"), "{e}");
    }

    #[test]
    fn the_emitter_needs_redis_and_valid_rules() {
        let redis = ("PATCHBAY_REDIS_URL", "redis://127.0.0.1:6379");
        assert_eq!(cfg(&[redis]).unwrap().emitter, None);
        let c = cfg(&[
            redis,
            ("PATCHBAY_EMITTER_KEY", "socket.io"),
            ("PATCHBAY_EMITTER_ROOMS", "user({id})=user:{id}"),
        ])
        .unwrap();
        let (key, rules) = c.emitter.unwrap();
        assert_eq!(key, "socket.io");
        assert_eq!(rules.map("user(3)").as_deref(), Some("user:3"));
        for (vars, var) in [
            (
                vec![("PATCHBAY_EMITTER_KEY", "socket.io")],
                "PATCHBAY_EMITTER_KEY:",
            ),
            (
                vec![redis, ("PATCHBAY_EMITTER_ROOMS", "user({id})=user:{id}")],
                "PATCHBAY_EMITTER_ROOMS:",
            ),
            (
                vec![
                    redis,
                    ("PATCHBAY_EMITTER_KEY", "socket.io"),
                    ("PATCHBAY_EMITTER_ROOMS", "user({id})"),
                ],
                "PATCHBAY_EMITTER_ROOMS:",
            ),
            (
                vec![redis, ("PATCHBAY_EMITTER_KEY", "two words")],
                "PATCHBAY_EMITTER_KEY:",
            ),
        ] {
            let e = cfg(&vars).unwrap_err().to_string();
            assert!(e.starts_with(var), "{e}");
        }
    }

    #[test]
    fn lists_and_urls_are_normalised() {
        let c = cfg(&[
            ("PATCHBAY_API_URL", "http://api.local:9000/v1/"),
            ("PATCHBAY_ALLOWED_ORIGINS", " https://App.example.com , "),
            ("PATCHBAY_PUBLIC_ROOMS", "lobby,news:*"),
            ("PATCHBAY_PUBLISH_TOKEN", ""),
            ("OTHER", "ignored"),
        ])
        .unwrap();
        assert_eq!(c.api_url.as_deref(), Some("http://api.local:9000/v1"));
        assert_eq!(
            c.allowed_origins,
            AllowedOrigins::List(vec!["https://app.example.com".into()])
        );
        assert_eq!(c.public_rooms.len(), 2);
        assert_eq!(c.publish_token, None);
        let c = cfg(&[("PATCHBAY_ALLOWED_ORIGINS", "https://a.example,*")]).unwrap();
        assert_eq!(c.allowed_origins, AllowedOrigins::Any);
    }

    #[test]
    fn anonymous_defaults_off_when_auth_is_configured() {
        assert!(
            !cfg(&[("PATCHBAY_JWT_SECRET", JWT_SECRET)])
                .unwrap()
                .allow_anonymous
        );
        assert!(
            cfg(&[
                ("PATCHBAY_JWT_SECRET", JWT_SECRET),
                ("PATCHBAY_ALLOW_ANONYMOUS", "true")
            ])
            .unwrap()
            .allow_anonymous
        );
    }
}
