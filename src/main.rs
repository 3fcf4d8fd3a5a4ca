//! The `patchbay` binary: configuration, logging, start-up checks, then the library's server.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None | Some("serve"), None) => {}
        // Started by this binary itself, to take job processes down with a worker that dies.
        (Some(patchbay::task::watchdog::ARG), None) => {
            return ExitCode::from(patchbay::task::watchdog::serve() as u8);
        }
        (Some("-h" | "--help" | "help"), _) => {
            println!(
                "usage: patchbay [serve]\n\nConfigured with PATCHBAY_* environment variables (and ./.env); see .env.example."
            );
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("patchbay: unknown arguments; usage: patchbay [serve]");
            return ExitCode::from(2);
        }
    }
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => return fail(format!(".env: {e}")),
    }
    let config = match patchbay::Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    // Checked by the configuration already.
    let filter = match EnvFilter::try_new(&config.log) {
        Ok(f) => f,
        Err(e) => return fail(format!("PATCHBAY_LOG: {e}")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    if let Ok(program) = std::env::current_exe() {
        patchbay::task::watchdog::use_program(program);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async {
        let server = match patchbay::start(config) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Every refusal at start-up: one line naming the culprit, exit status 2.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("patchbay: {e}");
    ExitCode::from(2)
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
