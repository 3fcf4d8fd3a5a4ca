//! The `patchbay` binary: configuration, logging, start-up checks, then the library's server.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker(std::env::args().skip(2));
    }
    match (args.next().as_deref(), args.next()) {
        (None | Some("serve"), None) => {}
        // Started by this binary itself, to take job processes down with a worker that dies.
        (Some(patchbay::task::watchdog::ARG), None) => {
            return ExitCode::from(patchbay::task::watchdog::serve() as u8);
        }
        (Some("-V" | "--version" | "version"), None) => {
            println!("patchbay {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        (Some("-h" | "--help" | "help"), _) => {
            println!(
                "usage: patchbay [serve]\n       patchbay --version\n       {}\n\nConfigured with PATCHBAY_* environment variables (and ./.env); see .env.example.",
                patchbay::task::worker::USAGE
            );
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("patchbay: unknown arguments; usage: patchbay [serve] | patchbay worker ...");
            return ExitCode::from(2);
        }
    }
    let config = match setup() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let server = match patchbay::start(config) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        server.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

/// Reads `.env` and the configuration, and sets up logging.
fn setup() -> Result<patchbay::Config, ExitCode> {
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => return Err(fail(format!(".env: {e}"))),
    }
    let config = patchbay::Config::from_env().map_err(fail)?;
    // Checked by the configuration already.
    let filter = EnvFilter::try_new(&config.log).map_err(|e| fail(format!("PATCHBAY_LOG: {e}")))?;
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_json {
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        logs.with_ansi(std::io::stdout().is_terminal()).init();
    }
    if let Ok(program) = std::env::current_exe() {
        patchbay::task::watchdog::use_program(program);
    }
    Ok(config)
}

/// `patchbay worker`: runs one queue's jobs from Redis as child processes.
fn worker(args: impl Iterator<Item = String>) -> ExitCode {
    let args = match patchbay::task::worker::WorkerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => return fail(format!("{e}\n{}", patchbay::task::worker::USAGE)),
    };
    let config = match setup() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(url) = config.redis_url.clone() else {
        return fail("PATCHBAY_REDIS_URL: `patchbay worker` takes its jobs from Redis; set it");
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let options = &config.redis_options;
        match patchbay::task::worker::serve(&url, options, &config.redis_prefix, args, shutdown)
            .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        }
    })
}

/// Every refusal at start-up: one line naming the culprit, exit status 2.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("patchbay: {e}");
    ExitCode::from(2)
}

/// Resolves on SIGINT (ctrl-c), SIGTERM or SIGHUP (a closed terminal, or a service manager's
/// reload: patchbay has nothing to reload, so it drains as for a stop rather than die). The
/// handlers are installed when this is called (inside the runtime), not when it is first
/// polled, so a signal sent during start-up is not lost and never kills the process
/// ungracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
    }
}
