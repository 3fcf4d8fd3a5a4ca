//! patchbay inside the demo process, stoppable and restartable on the same address, so that a
//! user can watch the page fall back to REST and then reconnect.

use std::net::SocketAddr;

use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;

/// One in-process patchbay instance, running or stopped.
pub struct Bridge {
    /// The configuration of every (re)start, with `listen` pinned to the first bound address:
    /// clients reconnect to where they were, and the room secret stays the same, so their
    /// room tokens stay valid across a restart.
    config: patchbay::Config,
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Bridge {
    /// Starts patchbay with `config`; a busy address falls back to a free port.
    pub fn start(config: patchbay::Config) -> Result<Bridge, patchbay::Error> {
        let listen = config.listen;
        let server = match patchbay::start(config.clone()) {
            Ok(s) => s,
            // A demo should run even when something else already uses the port.
            Err(patchbay::Error::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                println!("{listen} is busy; patchbay uses a free port instead");
                patchbay::start(patchbay::Config {
                    listen: SocketAddr::new(listen.ip(), 0),
                    ..config.clone()
                })?
            }
            Err(e) => return Err(e),
        };
        let config = patchbay::Config {
            listen: server.local_addr(),
            ..config
        };
        Ok(Bridge {
            config,
            running: Mutex::new(Some(run(server))),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.config.listen
    }

    pub async fn is_running(&self) -> bool {
        self.running.lock().await.is_some()
    }

    /// Graceful shutdown, as on SIGTERM: in-flight requests finish, clients get 1001.
    /// Returns once the address is free again.
    pub async fn stop(&self) {
        let mut running = self.running.lock().await;
        if let Some(Running { stop, task }) = running.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Starts patchbay again on the same address; nothing to do when it runs.
    pub async fn resume(&self) -> Result<(), patchbay::Error> {
        let mut running = self.running.lock().await;
        if running.is_none() {
            *running = Some(run(patchbay::start(self.config.clone())?));
        }
        Ok(())
    }
}

fn run(server: patchbay::Server) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running { stop, task }
}
