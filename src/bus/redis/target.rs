//! Where Redis is: one server (`redis://`, `rediss://`, `unix://`), or the master a set of
//! Sentinels names (`redis+sentinel://`, `rediss+sentinel://`), looked up again on every new
//! connection so that a failover is followed without a restart. TLS trusts the platform's
//! store, or only the private CA of `PATCHBAY_REDIS_CA_FILE`.

use std::sync::Arc;

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, RedisError, TlsCertificates, TlsMode};

/// Where every Redis connection of this process goes. Cheap to clone.
#[derive(Clone)]
pub struct Target(Arc<Kind>);

enum Kind {
    Server(redis::Client),
    /// `tokio` lock: a lookup asks the Sentinels in turn; lookups wait for each other.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// TLS and Sentinel settings beside the URL.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// PEM certificates to trust instead of the platform's store (`PATCHBAY_REDIS_CA_FILE`).
    pub ca: Option<Vec<u8>>,
    /// The Sentinels' own password (`PATCHBAY_REDIS_SENTINEL_PASSWORD`).
    pub sentinel_password: Option<String>,
}

/// A Sentinel URL taken apart.
#[derive(Debug, PartialEq)]
struct SentinelUrl {
    tls: bool,
    username: Option<String>,
    password: Option<String>,
    sentinels: Vec<(String, u16)>,
    master: String,
    db: i64,
}

impl Target {
    /// The target `url` names (nothing is connected yet). Errors say what is wrong with it.
    pub fn open(url: &str, options: &Options) -> Result<Target, RedisError> {
        if url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://") {
            let parsed = parse_sentinel(url).map_err(invalid)?;
            return Ok(Target(Arc::new(Kind::Sentinel(tokio::sync::Mutex::new(
                sentinel_client(parsed, options)?,
            )))));
        }
        let client = match &options.ca {
            Some(ca) if url.starts_with("rediss://") => {
                redis::Client::build_with_tls(url, certificates(ca))?
            }
            Some(_) => {
                return Err(invalid(
                    "PATCHBAY_REDIS_CA_FILE is set but the URL is not rediss:// (nothing would use it)".into(),
                ));
            }
            None => redis::Client::open(url)?,
        };
        Ok(Target(Arc::new(Kind::Server(client))))
    }

    /// A client for the server to connect to now: for Sentinel, the master they name at this
    /// moment (checked to be one by asking it its role).
    pub async fn client(&self) -> Result<redis::Client, RedisError> {
        match &*self.0 {
            Kind::Server(client) => Ok(client.clone()),
            Kind::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }
}

fn certificates(ca: &[u8]) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

fn invalid(message: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "invalid Redis URL",
        message,
    ))
}

fn sentinel_client(url: SentinelUrl, options: &Options) -> Result<SentinelClient, RedisError> {
    let addrs = url.sentinels.iter().map(|(host, port)| match url.tls {
        true => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        },
        false => ConnectionAddr::Tcp(host.clone(), *port),
    });
    let mut builder = SentinelClientBuilder::new(addrs, &url.master, SentinelServerType::Master)?
        .set_client_to_redis_db(url.db);
    if let Some(username) = &url.username {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = &url.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(password) = &options.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if url.tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(ca) = &options.ca {
            builder = builder
                .set_client_to_redis_certificates(certificates(ca))
                .set_client_to_sentinel_certificates(certificates(ca));
        }
    } else if options.ca.is_some() {
        return Err(invalid(
            "PATCHBAY_REDIS_CA_FILE is set but the URL is not rediss+sentinel:// (nothing would use it)".into(),
        ));
    }
    builder.build()
}

/// `redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]` (`rediss+` for
/// TLS). The credentials are the master's; the port defaults to 26379.
fn parse_sentinel(url: &str) -> Result<SentinelUrl, String> {
    let (tls, rest) = match url.split_once("://") {
        Some(("redis+sentinel", rest)) => (false, rest),
        Some(("rediss+sentinel", rest)) => (true, rest),
        _ => {
            return Err(
                "a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://".into(),
            );
        }
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "the credentials are not UTF-8 once decoded".to_string())
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(userinfo) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let user = Some(decode(user)?).filter(|u| !u.is_empty());
            let password = Some(decode(password)?).filter(|p| !p.is_empty());
            (user, password)
        }
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("`{host}`: the port is not a number from 1 to 65535"))?;
                (name, port)
            }
            _ => (host, 26379),
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if name.is_empty() || port == 0 {
            return Err(format!("`{host}` is not a Sentinel's host:port"));
        }
        sentinels.push((name.to_string(), port));
    }
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let master = segments
        .next()
        .ok_or("the URL names no master: redis+sentinel://host:26379/<master>")?;
    let master = decode(master)?;
    let db = match segments.next() {
        None => 0,
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or(format!("`{db}` is not a database number"))?,
    };
    if segments.next().is_some() {
        return Err("a Sentinel URL's path is /<master>[/<db>]".into());
    }
    Ok(SentinelUrl {
        tls,
        username,
        password,
        sentinels,
        master,
        db,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let url = parse_sentinel("redis+sentinel://:p%40ss@a:26379,b:26380,c/mymaster/2").unwrap();
        assert_eq!(
            url,
            SentinelUrl {
                tls: false,
                username: None,
                password: Some("p@ss".into()),
                sentinels: vec![
                    ("a".into(), 26379),
                    ("b".into(), 26380),
                    ("c".into(), 26379)
                ],
                master: "mymaster".into(),
                db: 2,
            }
        );
        let url = parse_sentinel("rediss+sentinel://app:secret@[::1]:5000/m").unwrap();
        assert!(url.tls);
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.sentinels, vec![("::1".into(), 5000)]);
        assert_eq!(url.db, 0);
    }

    #[test]
    fn bad_sentinel_urls_say_why() {
        for (url, says) in [
            ("redis+sentinel://a:26379", "names no master"),
            ("redis+sentinel://a:x/m", "port"),
            ("redis+sentinel://a:0/m", "host:port"),
            ("redis+sentinel://,a/m", "host:port"),
            ("redis+sentinel://a/m/-1", "database"),
            ("redis+sentinel://a/m/0/x", "path"),
        ] {
            let err = parse_sentinel(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn a_ca_file_without_tls_is_refused() {
        let options = Options {
            ca: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            sentinel_password: None,
        };
        for url in ["redis://127.0.0.1:6379", "redis+sentinel://a/m"] {
            let err = Target::open(url, &options).err().expect("refused");
            assert!(err.to_string().contains("PATCHBAY_REDIS_CA_FILE"), "{err}");
        }
    }
}
