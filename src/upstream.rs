//! The process's one HTTP client to the REST API and the auth endpoint: keep-alive HTTP/1.1
//! connections pooled per host, `http://` and `https://` (rustls with the platform's trust
//! store), redirects never followed.
//!
//! It is hyper's pooled client without further layers: request URIs are built from a base
//! parsed once ([`Base`]), so no request pays for URL parsing, proxy matching or redirect
//! policies, which were a fifth of the server's instructions per request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How long an unused pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A cheap handle to the process's pool.
#[derive(Clone, Debug)]
pub struct Client {
    pool: Pool<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// Why a call did not produce a whole response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No response: refused, reset, TLS or DNS failure.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The body is larger than allowed; the status is the one the response had.
    #[error("the response ({status}) is larger than {max} bytes")]
    TooLarge { max: usize, status: StatusCode },
    /// The body broke off.
    #[error("the response broke off: {0}")]
    Broken(String),
}

impl Client {
    /// A new pool. Must be called inside a tokio runtime only when used.
    pub fn new() -> Client {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(rustls::crypto::ring::default_provider())
            .expect("ring supports the default protocol versions")
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let pool = Pool::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(tls);
        Client { pool }
    }

    /// Sends `req` (an absolute URI) and reads the whole response body, refusing bodies over
    /// `max_body` bytes. The status and headers come back with the body.
    pub async fn call(
        &self,
        req: Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<(hyper::http::response::Parts, Bytes), CallError> {
        let resp: Response<Incoming> = self
            .pool
            .request(req)
            .await
            .map_err(|e| CallError::Unreachable(describe(&e)))?;
        let (parts, body) = resp.into_parts();
        let declared = hyper::body::Body::size_hint(&body).exact();
        let too_large = CallError::TooLarge {
            max: max_body,
            status: parts.status,
        };
        if declared.is_some_and(|n| n > max_body as u64) {
            return Err(too_large);
        }
        match Limited::new(body, max_body).collect().await {
            Ok(collected) => Ok((parts, collected.to_bytes())),
            Err(e) if e.is::<LengthLimitError>() => Err(too_large),
            Err(e) => Err(CallError::Broken(describe(&*e))),
        }
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// An error and its sources, `outer: inner: ...` (hyper's own messages are terse).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An `http(s)://host[:port][/prefix]` URL parsed once; [`Base::uri`] appends a path.
#[derive(Clone, Debug)]
pub struct Base {
    scheme: Scheme,
    authority: Authority,
    /// The base's path without a trailing slash (`""` or `/v1`).
    prefix: String,
}

impl Base {
    /// Parses a URL validated by the configuration (`http`/`https`, a host, no query).
    pub fn parse(url: &str) -> Result<Base, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a URL ({e})"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(format!("`{url}` must be an absolute http(s) URL"));
        };
        if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
            return Err(format!("`{url}` must be an http:// or https:// URL"));
        }
        if uri.query().is_some() {
            return Err(format!("`{url}` must not have a query"));
        }
        Ok(Base {
            scheme: scheme.clone(),
            authority: authority.clone(),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The base's prefix, to which `path_and_query` (starting with `/`, already encoded) is
    /// appended.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, String> {
        let pq = if self.prefix.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", self.prefix))
        }
        .map_err(|e| format!("`{path_and_query}` is not a valid path ({e})"))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| e.to_string())
    }

    /// The base itself, as a URI.
    pub fn as_uri(&self) -> Uri {
        self.uri(if self.prefix.is_empty() { "/" } else { "" })
            .expect("a parsed base is a valid URI")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_keep_their_prefix() {
        let b = Base::parse("http://api.local:9000/v1").unwrap();
        assert_eq!(
            b.uri("/tasks/1?x=2").unwrap().to_string(),
            "http://api.local:9000/v1/tasks/1?x=2"
        );
        let b = Base::parse("https://api.example.com").unwrap();
        assert_eq!(
            b.uri("/tasks").unwrap().to_string(),
            "https://api.example.com/tasks"
        );
        assert_eq!(b.as_uri().to_string(), "https://api.example.com/");
        let b = Base::parse("http://auth.local/check").unwrap();
        assert_eq!(b.as_uri().to_string(), "http://auth.local/check");
        for bad in ["ftp://x/", "/relative", "http://x/?q=1", "not a url"] {
            assert!(Base::parse(bad).is_err(), "{bad}");
        }
    }
}
