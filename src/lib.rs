//! patchbay carries redux actions between a webapp and its backend over one websocket.
//!
//! A client dispatches `X_REQUEST`; patchbay looks `X` up in the [`registry`], runs it
//! ([`dispatch`]: a REST call on the user's behalf) and answers `X_SUCCESS` or `X_FAILURE`.
//! Server-fired actions published on the [`bus`] reach every connection in their rooms.
//!
//! The binary only reads [`Config`], sets up logging and calls [`start`]; tests do the same
//! with a listener on port 0.

pub mod app;
pub mod auth;
pub mod bus;
pub mod client_addr;
pub mod cmd;
pub mod config;
pub mod dispatch;
pub mod emitter;
pub mod error;
pub mod handshake;
pub mod history;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod ratelimit;
pub mod recovery;
pub mod registry;
pub mod rooms;
pub mod server;
pub mod session;
pub mod sse;
pub mod task;
pub mod template;
pub mod upstream;
pub mod writer;
pub mod ws;

use std::future::Future;
use std::sync::Arc;

pub use app::App;
pub use config::Config;
pub use registry::Registry;

/// Why patchbay could not start. Each message names the variable or manifest at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad variable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A bad manifest.
    #[error(transparent)]
    Manifest(#[from] registry::ManifestError),
    /// A configuration this version cannot run.
    #[error(transparent)]
    Start(#[from] app::StartError),
    /// The listen address could not be bound.
    #[error("PATCHBAY_LISTEN: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A bound, ready instance.
pub struct Server {
    /// The instance's shared state.
    pub app: Arc<App>,
    listener: tokio::net::TcpListener,
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tracing::info!("listening on {}", self.local_addr());
        tracing::info!("{}", self.app.config.summary());
        self.app.prepare().await;
        server::run(self.listener, self.app, shutdown).await
    }
}

/// Loads the manifests, builds the instance and binds `config.listen`.
pub fn start(config: Config) -> Result<Server, Error> {
    let registry = Registry::load_dir(&config.actions_dir)?;
    tracing::info!(actions = registry.len(), dir = %config.actions_dir.display(), "loaded action manifests");
    if config.room_secret_is_random {
        tracing::info!(
            "PATCHBAY_ROOM_SECRET is not set: room tokens are valid on this process only"
        );
    }
    if config.allowed_origins == config::AllowedOrigins::Any
        && config.forward_headers.contains(&hyper::header::COOKIE)
    {
        tracing::warn!(
            "PATCHBAY_ALLOWED_ORIGINS=* with cookies forwarded: any web page can open a websocket that rides its visitors' cookies; list your origins instead"
        );
    }
    let mut config = config;
    if let Ok((nofile, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let cap = server::connection_cap(config.max_connections, nofile);
        if cap < config.max_connections {
            tracing::warn!(
                "PATCHBAY_MAX_CONNECTIONS is {} but the open-file limit is {nofile}: at most {cap} connections are accepted (then 503 too_many_connections); raise the limit (LimitNOFILE, ulimit -n)",
                config.max_connections
            );
            config.max_connections = cap;
        }
    }
    let addr = config.listen;
    let app = App::new(config, registry)?;
    let listener = server::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    app.start_background();
    Ok(Server { app, listener })
}
