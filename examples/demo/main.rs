//! The patchbay demo, in one process and with no external services:
//!
//! 1. a small REST API with an in-memory task store ([`api`]),
//! 2. patchbay in front of it, configured with the manifests in `actions/`,
//! 3. a scripted websocket client that shows the protocol step by step ([`client`]).
//!
//! Afterwards it keeps serving so you can connect yourself, until ctrl-c.
//! `--once` exits right after the script instead: 0 when every step got its expected reply.
//! `--redis [URL]` runs patchbay with the Redis bus, and the API publishes task progress on
//! Redis as a task worker would; without a URL the demo runs a private `redis-server`.
//!
//! Environment: `PATCHBAY_LISTEN` (default 127.0.0.1:8080) and `PATCHBAY_LOG` (default info).

mod api;
mod client;
mod redis_bus;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: demo [--once] [--redis [URL]]";

struct Args {
    once: bool,
    /// `Some(None)`: `--redis` without a URL, so run a private server.
    redis: Option<Option<String>>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        once: false,
        redis: None,
    };
    let mut argv = std::env::args().skip(1).peekable();
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--once" => args.once = true,
            "--redis" => args.redis = Some(argv.next_if(|next| !next.starts_with("--"))),
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    // Declared before the runtime, so dropped after it: redis-server stops only once
    // patchbay's Redis bus has stopped, instead of under it (which it would log as a loss).
    let mut private_redis = None;
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(demo(&mut private_redis))
}

async fn demo(private_redis: &mut Option<redis_bus::PrivateServer>) -> ExitCode {
    let Args { once, redis } = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("demo: {e} ({USAGE})");
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
    let api_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port for the API");
    let api_url = format!("http://{}", api_listener.local_addr().unwrap());
    let publish_token = uuid::Uuid::new_v4().simple().to_string();

    let config = patchbay::Config {
        listen,
        actions_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("actions"),
        api_url: Some(api_url.clone()),
        // With Redis the API publishes there; POST /publish stays off, as nothing uses it.
        publish_token: redis_url.is_none().then(|| publish_token.clone()),
        redis_url: redis_url.clone(),
        log,
        ..patchbay::Config::default()
    };
    let server = match patchbay::start(config.clone()) {
        Ok(s) => s,
        // A demo should run even when something else already uses the port.
        Err(patchbay::Error::Bind { source, .. })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            println!("{listen} is busy; using a free port instead");
            let config = patchbay::Config {
                listen: SocketAddr::new(listen.ip(), 0),
                ..config
            };
            match patchbay::start(config) {
                Ok(s) => s,
                Err(e) => return fail(e),
            }
        }
        Err(e) => return fail(e),
    };
    let addr = server.local_addr();
    let publisher = match redis_conn {
        Some(conn) => api::Publisher::Redis(conn),
        None => api::Publisher::Http {
            patchbay: addr,
            token: publish_token,
        },
    };
    tokio::spawn(api::serve(api_listener, publisher));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    println!("patchbay demo");
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
        println!("\npatchbay keeps running. Connect with any websocket client to ws://{addr}/ws");
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
        let _ = tokio::signal::ctrl_c().await;
    }

    // Graceful shutdown: patchbay drains requests and closes websockets with 1001.
    let _ = stop.send(());
    let _ = server.await;
    code
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("demo: {e}");
    ExitCode::FAILURE
}
