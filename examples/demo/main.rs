//! The patchbay demo, in one process and with no external services:
//!
//! 1. patchbay, configured with the manifests in `actions/` ([`bridge`]): tasks are `task`
//!    actions, queued and run by patchbay's task manager (a small shell command per job);
//!    notes are `http` actions, answered by
//! 2. a small REST API with an in-memory board of notes ([`api`]), which also serves the demo
//!    page and the shim's modules ([`site`]) on the same origin; the page can stop and start
//!    patchbay to show the REST fallback and the reconnect,
//! 3. a scripted websocket client that shows the protocol step by step ([`client`]).
//!
//! Afterwards it keeps serving, so you can open the page or connect yourself, until ctrl-c.
//! `--once` exits right after the script instead: 0 when every step got its expected reply.
//! `--redis [URL]` runs patchbay with Redis: its bus, its task queue, and a separate worker
//! process per queue ([`workers`]); the API publishes notes on Redis as any service would.
//! Without a URL the demo runs a private `redis-server`.
//! `--api-listen ADDR` is the API's and the page's address (default 127.0.0.1:8000; a busy
//! one falls back to a free port).
//! `--allow-origin ORIGIN` (repeatable) lets pages of another origin, such as an app's dev
//! server, use the demo's patchbay (`PATCHBAY_ALLOWED_ORIGINS`) and its API (CORS).
//! `--no-bridge --bridge-addr ADDR` runs only the API and the page, for a patchbay started
//! separately on ADDR; the API then pushes notes with `--publish-token TOKEN` (its
//! `PATCHBAY_PUBLISH_TOKEN`) or on Redis with `--redis URL`. It prints every variable that
//! patchbay needs, the room secret included.
//! `demo worker …` is `patchbay worker …` (the `--redis` demo runs itself so).
//!
//! Environment: `PATCHBAY_LISTEN` (default 127.0.0.1:8080) and `PATCHBAY_LOG` (default info).

mod api;
mod bridge;
mod client;
mod redis_bus;
mod site;
mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::bridge::Bridge;
use crate::site::Site;

const USAGE: &str = "usage: demo [--once] [--redis [URL]] [--api-listen ADDR] [--allow-origin ORIGIN]...\n   \
    or: demo --no-bridge --bridge-addr ADDR (--publish-token TOKEN | --redis URL) [--api-listen ADDR] [--allow-origin ORIGIN]...";
const API_LISTEN: &str = "127.0.0.1:8000";
/// The rooms a page joins to say it is watching a task, and to see who else is.
const WATCH_ROOMS: &str = "watch:*";
/// How long a tab that went away stays listed as watching.
const PRESENCE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

struct Args {
    once: bool,
    /// `Some(None)`: `--redis` without a URL, so run a private server.
    redis: Option<Option<String>>,
    api_listen: SocketAddr,
    /// `Some`: `--no-bridge`, with the address of the separately run patchbay.
    external: Option<External>,
    /// `--allow-origin`: pages of these origins (an app's dev server) may use patchbay and
    /// the API too.
    allow_origins: Vec<String>,
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
    let mut allow_origins = Vec::new();
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
            "--allow-origin" => {
                let origin = value("--allow-origin")?;
                let ok = url::Url::parse(&origin).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.origin().ascii_serialization() == origin.trim_end_matches('/')
                });
                if !ok {
                    return Err(format!(
                        "--allow-origin: `{origin}` is not an origin like http://localhost:5173"
                    ));
                }
                allow_origins.push(origin.trim_end_matches('/').to_string());
            }
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
        allow_origins,
    })
}

fn main() -> ExitCode {
    // The demo binary doubles as `patchbay worker` and as the job watchdog, as the
    // `patchbay` binary does.
    let mut argv = std::env::args().skip(1);
    match argv.next().as_deref() {
        Some("worker") => return worker(argv),
        Some(patchbay::task::watchdog::ARG) => {
            return ExitCode::from(patchbay::task::watchdog::serve() as u8);
        }
        _ => {}
    }
    if let Ok(program) = std::env::current_exe() {
        patchbay::task::watchdog::use_program(program);
    }
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
        allow_origins,
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
    // The page's visitors get a name and a token signed with this secret, so that patchbay
    // can tell them apart in the rooms that track presence (who is watching a task). A
    // patchbay run separately must be given the same one.
    let jwt_secret = std::env::var("PATCHBAY_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    // The page's origins, and those `--allow-origin` adds (an app's dev server).
    let origins: Vec<String> = page_origins(api_addr)
        .into_iter()
        .chain(allow_origins.iter().cloned())
        .collect();
    // One room secret for the demo's run, so room tokens outlive a restart of patchbay.
    let room_secret = std::env::var("PATCHBAY_ROOM_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let site = |patchbay: SocketAddr, bridge: Option<Arc<Bridge>>| Site {
        page_dir: root.join("webapp-shim").join("demo"),
        shim_dir: root.join("webapp-shim").join("src"),
        actions_dir: actions_dir.clone(),
        patchbay_ws: format!("ws://{patchbay}/ws"),
        bridge,
        jwt_secret: jwt_secret.clone(),
    };

    let prefix = patchbay::Config::default().redis_prefix;
    if let Some(External {
        bridge_addr,
        publish_token,
    }) = external
    {
        let publisher = match (redis_conn, publish_token.clone()) {
            (Some(conn), _) => api::Publisher::Redis { conn, prefix },
            (None, token) => api::Publisher::Http {
                patchbay: bridge_addr,
                token: token.expect("checked with the arguments"),
            },
        };
        tokio::spawn(api::serve(
            api_listener,
            publisher,
            site(bridge_addr, None),
            allow_origins.clone(),
        ));
        println!("patchbay demo: the REST API and the page; patchbay runs separately");
        println!("  page      open {api_url}/ in a browser");
        println!("  REST API  {api_url}  (in-memory notes)");
        println!("  patchbay  expected at ws://{bridge_addr}/ws, started for example with");
        let push = match (&redis_url, &publish_token) {
            (Some(url), _) => format!("PATCHBAY_REDIS_URL={url}"),
            (None, token) => format!("PATCHBAY_PUBLISH_TOKEN={}", token.as_deref().unwrap_or("")),
        };
        // Every variable it needs, the room secret included: with a random one per start,
        // the room tokens pages hold stop working when patchbay restarts.
        println!(
            "            PATCHBAY_LISTEN={bridge_addr} PATCHBAY_API_URL={api_url} \
             PATCHBAY_ALLOWED_ORIGINS={} PATCHBAY_ACTIONS={} {push} \
             PATCHBAY_JWT_SECRET={jwt_secret} PATCHBAY_ROOM_SECRET={room_secret} \
             PATCHBAY_ALLOW_ANONYMOUS=true \
             PATCHBAY_PUBLIC_ROOMS={WATCH_ROOMS} PATCHBAY_PRESENCE_ROOMS={WATCH_ROOMS} \
             PATCHBAY_PRESENCE_GRACE_MS={} patchbay",
            origins.join(","),
            actions_dir.display(),
            PRESENCE_GRACE.as_millis()
        );
        println!("Press ctrl-c to stop.");
        shutdown_signal().await;
        return ExitCode::SUCCESS;
    }

    // With Redis, patchbay only queues and separate worker processes run the commands.
    let (patchbay_actions, worker_specs) = match &redis_url {
        None => (None, Vec::new()),
        Some(_) => match workers::split_manifests(&actions_dir) {
            Ok((dir, specs)) => (Some(dir), specs),
            Err(e) => return fail(e),
        },
    };
    let publish_token = uuid::Uuid::new_v4().simple().to_string();
    let config = patchbay::Config {
        listen,
        actions_dir: patchbay_actions
            .as_ref()
            .map_or(actions_dir.clone(), |d| d.path().to_path_buf()),
        api_url: Some(api_url.clone()),
        // With Redis the API publishes there; POST /publish stays off, as nothing uses it.
        publish_token: redis_url.is_none().then(|| publish_token.clone()),
        redis_url: redis_url.clone(),
        // The page comes from the API's origin and opens its websocket on patchbay's port.
        allowed_origins: patchbay::config::AllowedOrigins::List(origins.clone()),
        room_secret: room_secret.clone().into_bytes(),
        room_secret_is_random: false,
        log: log.clone(),
        // Visitors connect with the token the page asks the demo for (anonymously should
        // that fail), and see who else watches each task.
        jwt_secret: Some(jwt_secret.clone()),
        allow_anonymous: true,
        public_rooms: vec![patchbay::rooms::RoomPattern::parse(WATCH_ROOMS).expect("a pattern")],
        presence: Some(patchbay::presence::PresenceConfig {
            rooms: vec![patchbay::rooms::RoomPattern::parse(WATCH_ROOMS).expect("a pattern")],
            grace: PRESENCE_GRACE,
        }),
        ..patchbay::Config::default()
    };
    let bridge = match Bridge::start(config) {
        Ok(b) => Arc::new(b),
        Err(e) => return fail(e),
    };
    let workers = match &redis_url {
        None => Vec::new(),
        Some(url) => match workers::start(&worker_specs, url, &log) {
            Ok(children) => children,
            Err(e) => {
                bridge.stop().await;
                return fail(e);
            }
        },
    };
    let addr = bridge.addr();
    let publisher = match redis_conn {
        Some(conn) => api::Publisher::Redis {
            conn,
            prefix: prefix.clone(),
        },
        None => api::Publisher::Http {
            patchbay: addr,
            token: publish_token,
        },
    };
    tokio::spawn(api::serve(
        api_listener,
        publisher,
        site(addr, Some(bridge.clone())),
        allow_origins.clone(),
    ));

    println!("patchbay demo");
    println!("  page      open {api_url}/ in a browser");
    println!("  patchbay  ws://{addr}/ws  (manifests: http://{addr}/actions)");
    println!("  REST API  {api_url}  (in-memory notes)");
    match (&redis_url, &*private_redis) {
        (None, _) => {
            println!(
                "  tasks     patchbay's embedded queue; patchbay runs each job's command itself"
            );
            println!("  bus       in-memory; the API pushes notes with POST /publish\n");
        }
        (Some(url), private) => {
            let private = match private {
                Some(_) => " (a private redis-server, stopped on exit)",
                None => "",
            };
            println!("  Redis     {url}{private}");
            for (spec, worker) in worker_specs.iter().zip(&workers) {
                println!(
                    "  tasks     queue `{}` on Redis, run by a separate worker process (pid {}),",
                    spec.queue,
                    worker.id().unwrap_or_default()
                );
                println!(
                    "            as `PATCHBAY_REDIS_URL={url} patchbay worker {}` would",
                    spec.args[..2].join(" ")
                );
            }
            println!("  bus       Redis; the API publishes notes on {prefix}:room:notes\n");
        }
    }

    let script = match redis_url {
        None => client::run(addr).await,
        Some(_) => match redis_bus::wait_connected(addr).await {
            Ok(()) => client::run(addr).await,
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
        println!("their progress, add notes; the page's buttons stop and start patchbay, so you");
        println!("can see notes fall back to the REST API, tasks fail clearly meanwhile, and the");
        println!("page reconnect.");
        println!("Or connect with any websocket client to ws://{addr}/ws");
        println!("and send one JSON object per message, for example:");
        println!(
            r#"  {{"type":"TASK_ENQUEUE_REQUEST","payload":{{"title":"my task","steps":10}},"meta":{{"requestId":"1"}}}}"#
        );
        println!(
            r#"  {{"type":"NOTE_ADD_REQUEST","payload":{{"text":"hello"}},"meta":{{"requestId":"2"}}}}"#
        );
        println!("Press ctrl-c to stop.");
        shutdown_signal().await;
    }

    // Graceful shutdown: patchbay drains requests and closes websockets with 1001; the
    // workers hand running jobs back.
    bridge.stop().await;
    workers::stop(workers).await;
    drop(patchbay_actions);
    code
}

/// `demo worker …`: `patchbay worker …`, configured from the environment like it.
fn worker(args: impl Iterator<Item = String>) -> ExitCode {
    let args = match patchbay::task::worker::WorkerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo worker: {e}\n{}", patchbay::task::worker::USAGE);
            return ExitCode::from(2);
        }
    };
    let config = match patchbay::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo worker: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(url) = config.redis_url.clone() else {
        eprintln!("demo worker: PATCHBAY_REDIS_URL is not set");
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    if let Ok(program) = std::env::current_exe() {
        patchbay::task::watchdog::use_program(program);
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let options = &config.redis_options;
        let prefix = &config.redis_prefix;
        match patchbay::task::worker::serve(&url, options, prefix, args, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo worker: {e}");
                ExitCode::FAILURE
            }
        }
    })
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

/// Resolves on ctrl-c (SIGINT) or SIGTERM (how test harnesses and service managers stop
/// processes), so that a private redis-server and the workers are stopped either way. The
/// handlers are in place from the call on, so a signal that arrives early is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}
