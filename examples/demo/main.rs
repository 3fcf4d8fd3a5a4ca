//! The patchbay demo, in one process and with no external services:
//!
//! 1. a small REST API with an in-memory task store ([`api`]),
//! 2. patchbay in front of it, configured with the manifests in `actions/`,
//! 3. a scripted websocket client that shows the protocol step by step ([`client`]).
//!
//! Afterwards it keeps serving so you can connect yourself, until ctrl-c.
//! `--once` exits right after the script instead: 0 when every step got its expected reply.
//!
//! Environment: `PATCHBAY_LISTEN` (default 127.0.0.1:8080) and `PATCHBAY_LOG` (default info).

mod api;
mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let once = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--once") => true,
        Some(_) => {
            eprintln!("usage: demo [--once]");
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
        publish_token: Some(publish_token.clone()),
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
    tokio::spawn(api::serve(
        api_listener,
        api::Publisher {
            patchbay: addr,
            token: publish_token,
        },
    ));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    println!("patchbay demo");
    println!("  REST API  {api_url}  (in-memory tasks)");
    println!("  patchbay  ws://{addr}/ws  (manifests: http://{addr}/actions)\n");

    let script = client::run(addr).await;
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
