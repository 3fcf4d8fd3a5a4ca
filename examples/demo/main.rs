//! The patchbay demo, in one process and with no external services:
//!
//! 1. a small REST API with an in-memory task store ([`api`]), which also serves the demo
//!    page and the shim's modules ([`site`]) on the same origin,
//! 2. patchbay in front of it, configured with the manifests in `actions/` ([`bridge`]); the
//!    page can stop and start it to show the REST fallback and the reconnect,
//! 3. a scripted websocket client that shows the protocol step by step ([`client`]).
//!
//! Afterwards it keeps serving, so you can open the page or connect yourself, until ctrl-c.
//! `--once` exits right after the script instead: 0 when every step got its expected reply.
//! `--redis [URL]` runs patchbay with the Redis bus, and the API publishes task progress on
//! Redis as a task worker would; without a URL the demo runs a private `redis-server`.
//! `--api-listen ADDR` is the API's and the page's address (default 127.0.0.1:8000; a busy
//! one falls back to a free port).
//! `--no-bridge --bridge-addr ADDR` runs only the API and the page, for a patchbay started
//! separately on ADDR; the API then pushes progress with `--publish-token TOKEN` (its
//! `PATCHBAY_PUBLISH_TOKEN`) or on Redis with `--redis URL`.
//!
//! Environment: `PATCHBAY_LISTEN` (default 127.0.0.1:8080) and `PATCHBAY_LOG` (default info).

mod api;
mod bridge;
mod client;
mod redis_bus;
mod site;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::bridge::Bridge;
use crate::site::Site;

const USAGE: &str = "usage: demo [--once] [--redis [URL]] [--api-listen ADDR]\n   \
    or: demo --no-bridge --bridge-addr ADDR (--publish-token TOKEN | --redis URL) [--api-listen ADDR]";
const API_LISTEN: &str = "127.0.0.1:8000";

struct Args {
    once: bool,
    /// `Some(None)`: `--redis` without a URL, so run a private server.
    redis: Option<Option<String>>,
    api_listen: SocketAddr,
    /// `Some`: `--no-bridge`, with the address of the separately run patchbay.
    external: Option<External>,
}

struct External {
    bridge_addr: SocketAddr,
    publish_token: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut once = false;
    let mut redis = None;
    let mut api_listen = API_LISTEN.parse().expect("a valid address");
    let mut no_bridge = false;
    let mut bridge_addr = None;
    let mut publish_token = None;
    let mut argv = std::env::args().skip(1).peekable();
    while let Some(arg) = argv.next() {
        let mut value = |name: &str| argv.next().ok_or_else(|| format!("`{name}` needs a value"));
        let addr = |name: &str, v: String| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("{name}: `{v}` is not an address like 127.0.0.1:8000"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--once" => once = true,
            "--redis" => redis = Some(argv.next_if(|next| !next.starts_with("--"))),
            "--api-listen" => api_listen = addr("--api-listen", value("--api-listen")?)?,
            "--no-bridge" => no_bridge = true,
            "--bridge-addr" => bridge_addr = Some(addr("--bridge-addr", value("--bridge-addr")?)?),
            "--publish-token" => publish_token = Some(value("--publish-token")?),
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    let external = match (no_bridge, bridge_addr) {
        (false, None) if publish_token.is_none() => None,
        (false, _) => {
            return Err("`--bridge-addr` and `--publish-token` go with `--no-bridge`".into());
        }
        (true, None) => return Err("`--no-bridge` needs `--bridge-addr`".into()),
        (true, Some(_)) if once => {
            return Err("`--once` runs the scripted client against the demo's own patchbay, so not with `--no-bridge`".into());
        }
        (true, Some(bridge_addr)) => {
            match (&publish_token, &redis) {
                (Some(_), None) | (None, Some(Some(_))) => {}
                _ => return Err("`--no-bridge` needs either `--publish-token` or `--redis URL`, for task progress".into()),
            }
            Some(External {
                bridge_addr,
                publish_token,
            })
        }
    };
    Ok(Args {
        once,
        redis,
        api_listen,
        external,
    })
}

fn main() -> ExitCode {
    // Declared before the runtime, so dropped after it: redis-server stops only once
    // patchbay's Redis bus has stopped, instead of under it (which it would log as a loss).
    let mut private_redis = None;
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(demo(&mut private_redis))
}

async fn demo(private_redis: &mut Option<redis_bus::PrivateServer>) -> ExitCode {
    let Args {
        once,
        redis,
        api_listen,
        external,
    } = match parse_args() {
        Ok(args) => args,
        // No message: help was asked for.
        Err(e) if e.is_empty() => {
            println!("{USAGE}\n\nSee the comment at the top of examples/demo/main.rs for details.");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("demo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let log = std::env::var("PATCHBAY_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&log).unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr so that stdout shows only the conversation.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let listen: SocketAddr = match std::env::var("PATCHBAY_LISTEN") {
        Err(_) => "127.0.0.1:8080".parse().expect("a valid address"),
        Ok(v) => match v.parse() {
            Ok(a) => a,
            Err(_) => {
                eprintln!("PATCHBAY_LISTEN: `{v}` is not an address like 127.0.0.1:8080");
                return ExitCode::from(2);
            }
        },
    };

    let redis_url = match redis {
        None => None,
        Some(Some(url)) => Some(url),
        Some(None) => match redis_bus::PrivateServer::start().await {
            Ok(server) => Some(private_redis.insert(server).url.clone()),
            Err(e) => return fail(e),
        },
    };
    // The API's own Redis connection, opened first so that a wrong URL stops the demo at once.
    let redis_conn = match &redis_url {
        None => None,
        Some(url) => match redis_bus::connect(url).await {
            Ok(conn) => Some(conn),
            Err(e) => return fail(e),
        },
    };

    // The API and patchbay each need the other's address, so bind the API first and serve
    // it once patchbay is bound.
    let api_listener = match bind_api(api_listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("--api-listen: cannot listen on {api_listen}: {e}")),
    };
    let api_addr = api_listener
        .local_addr()
        .expect("a bound listener has an address");
    let api_url = format!("http://{api_addr}");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let actions_dir = root.join("actions");
    let site = |patchbay: SocketAddr, bridge: Option<Arc<Bridge>>| Site {
        page_dir: root.join("webapp-shim").join("demo"),
        shim_dir: root.join("webapp-shim").join("src"),
        actions_dir: actions_dir.clone(),
        patchbay_ws: format!("ws://{patchbay}/ws"),
        bridge,
    };

    if let Some(External {
        bridge_addr,
        publish_token,
    }) = external
    {
        let publisher = match (redis_conn, publish_token.clone()) {
            (Some(conn), _) => api::Publisher::Redis(conn),
            (None, token) => api::Publisher::Http {
                patchbay: bridge_addr,
                token: token.expect("checked with the arguments"),
            },
        };
        tokio::spawn(api::serve(api_listener, publisher, site(bridge_addr, None)));
        println!("patchbay demo: the REST API and the page; patchbay runs separately");
        println!("  page      open {api_url}/ in a browser");
        println!("  REST API  {api_url}  (in-memory tasks)");
        println!("  patchbay  expected at ws://{bridge_addr}/ws, started for example with");
        let push = match (&redis_url, &publish_token) {
            (Some(url), _) => format!("PATCHBAY_REDIS_URL={url}"),
            (None, token) => format!("PATCHBAY_PUBLISH_TOKEN={}", token.as_deref().unwrap_or("")),
        };
        println!(
            "            PATCHBAY_LISTEN={bridge_addr} PATCHBAY_API_URL={api_url} \
             PATCHBAY_ALLOWED_ORIGINS={} {push} patchbay",
            page_origins(api_addr).join(",")
        );
        println!("Press ctrl-c to stop.");
        shutdown_signal().await;
        return ExitCode::SUCCESS;
    }

    let publish_token = uuid::Uuid::new_v4().simple().to_string();
    let config = patchbay::Config {
        listen,
        actions_dir: actions_dir.clone(),
        api_url: Some(api_url.clone()),
        // With Redis the API publishes there; POST /publish stays off, as nothing uses it.
        publish_token: redis_url.is_none().then(|| publish_token.clone()),
        redis_url: redis_url.clone(),
        // The page comes from the API's origin and opens its websocket on patchbay's port.
        allowed_origins: patchbay::config::AllowedOrigins::List(page_origins(api_addr)),
        log,
        ..patchbay::Config::default()
    };
    let bridge = match Bridge::start(config) {
        Ok(b) => Arc::new(b),
        Err(e) => return fail(e),
    };
    let addr = bridge.addr();
    let publisher = match redis_conn {
        Some(conn) => api::Publisher::Redis(conn),
        None => api::Publisher::Http {
            patchbay: addr,
            token: publish_token,
        },
    };
    tokio::spawn(api::serve(
        api_listener,
        publisher,
        site(addr, Some(bridge.clone())),
    ));

    println!("patchbay demo");
    println!("  page      open {api_url}/ in a browser");
    println!("  REST API  {api_url}  (in-memory tasks)");
    println!("  patchbay  ws://{addr}/ws  (manifests: http://{addr}/actions)");
    let bus = match (&redis_url, &*private_redis) {
        (None, _) => "in-memory; the API pushes progress with POST /publish".to_string(),
        (Some(url), private) => format!(
            "Redis {url}{}; the API publishes progress on tasks.<id>",
            if private.is_some() {
                " (a private redis-server, stopped on exit)"
            } else {
                ""
            }
        ),
    };
    println!("  bus       {bus}\n");

    let script = match redis_url {
        None => client::run(addr, false).await,
        Some(_) => match redis_bus::wait_connected(addr).await {
            Ok(()) => client::run(addr, true).await,
            Err(e) => Err(e),
        },
    };
    let code = match &script {
        Ok(()) => {
            println!("\nthe scripted client is done: every step got its expected reply");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nthe scripted client FAILED: {e}");
            ExitCode::FAILURE
        }
    };

    if !once {
        println!("\nThe demo keeps running. Open {api_url}/ in a browser: start tasks and watch");
        println!("their progress; the page's buttons stop and start patchbay, so you can see it");
        println!("fall back to the REST API and reconnect.");
        println!("Or connect with any websocket client to ws://{addr}/ws");
        println!("and send one JSON object per message, for example:");
        println!(
            r#"  {{"type":"TASK_ENQUEUE_REQUEST","payload":{{"title":"my task","steps":10}},"meta":{{"requestId":"1"}}}}"#
        );
        println!(r#"  {{"type":"TASKS_FETCH_REQUEST","payload":{{"page":1}}}}"#);
        if let Some(url) = &redis_url {
            println!("Task workers publish progress on Redis; for a task you enqueued, try");
            println!("  cargo run --example worker -- --redis {url} --task <its id>");
        }
        println!("Press ctrl-c to stop.");
        shutdown_signal().await;
    }

    // Graceful shutdown: patchbay drains requests and closes websockets with 1001.
    bridge.stop().await;
    code
}

/// Binds the API's address, or a free port on the same interface when it is taken.
async fn bind_api(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            println!("{addr} is busy; the API and the page use a free port instead");
            TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
        }
        other => other,
    }
}

/// The origins a browser may show the page under: the bound address, and `localhost` for a
/// loopback one, since that is what people type.
fn page_origins(api: SocketAddr) -> Vec<String> {
    let mut origins = vec![format!("http://{api}")];
    if api.ip().is_loopback() {
        origins.push(format!("http://localhost:{}", api.port()));
    }
    origins
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("demo: {e}");
    ExitCode::FAILURE
}

/// Resolves on ctrl-c or, on Unix, SIGTERM (how test harnesses and service managers stop
/// processes), so that a private redis-server is stopped either way.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
