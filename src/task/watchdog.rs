//! Makes a worker's job processes die with the worker, however it dies.
//!
//! `PR_SET_PDEATHSIG` is not enough: it reaches only the direct child, and fires when the
//! spawning *thread* exits (tokio's blocking threads come and go). Instead each worker process
//! starts one small watchdog: the `patchbay` binary itself, run as `patchbay __watchdog`, in
//! its own process group, reading a pipe from the worker. Each job writes `+<pgid>` itself,
//! between fork and exec, and the worker writes `-<pgid>` when that group is gone. When the pipe closes —
//! the worker exited, crashed or was SIGKILLed; the kernel closes it in every case — the
//! watchdog SIGKILLs every group still listed, grandchildren included, and exits.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

/// The hidden argument that runs the watchdog.
pub const ARG: &str = "__watchdog";

/// The program run as the watchdog, set by the binary ([`use_program`]); a library user
/// (a test) without one runs jobs without a watchdog.
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
/// This process's watchdog, started with the first job.
static STARTED: OnceLock<Option<Arc<Watchdog>>> = OnceLock::new();

/// Makes `program` (the `patchbay` binary) this process's watchdog.
pub fn use_program(program: PathBuf) {
    let _ = PROGRAM.set(program);
}

/// This process's watchdog, started on first use; `None` without a program or when it
/// cannot start (logged once).
pub fn for_this_process() -> Option<Arc<Watchdog>> {
    STARTED
        .get_or_init(|| {
            let program = PROGRAM.get()?;
            match Watchdog::start(program) {
                Ok(dog) => Some(Arc::new(dog)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the job watchdog: job processes may outlive a crash of this process");
                    None
                }
            }
        })
        .clone()
}

/// The worker's end of the watchdog's pipe.
pub struct Watchdog {
    pipe: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

impl Watchdog {
    /// Starts `program __watchdog` (the `patchbay` binary).
    pub fn start(program: &Path) -> std::io::Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(program)
            .arg(ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env_clear()
            // Its own group: a terminal's ctrl-c to the worker's group does not reach it.
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take().expect("piped");
        Ok(Watchdog {
            pipe: Mutex::new(Some(pipe)),
            child: Mutex::new(child),
        })
    }

    /// The pipe's descriptor, for a job to register its own group from between fork and exec
    /// ([`register_self`]), before any of its code runs.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.pipe.lock().unwrap().as_ref().map(|p| p.as_raw_fd())
    }

    /// Group `pgid` is gone: forget it.
    pub fn release(&self, pgid: i32) {
        self.send(&format!("-{pgid}\n"));
    }

    fn send(&self, line: &str) {
        // A few bytes into a pipe the watchdog drains at once: never blocks for long.
        let mut pipe = self.pipe.lock().unwrap();
        let Some(pipe) = pipe.as_mut() else { return };
        if let Err(e) = pipe.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "the job watchdog is gone: job processes may outlive a crash of this worker");
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing the pipe lets it exit (nothing is listed by then); reap it.
        drop(self.pipe.get_mut().unwrap().take());
        let _ = self.child.get_mut().unwrap().wait();
    }
}

/// Writes `+<own pid>` to the watchdog's pipe `fd`. Called in a job's child between fork and
/// exec, where only async-signal-safe calls are allowed: no allocation, one `write` of fewer
/// than `PIPE_BUF` bytes (so it is never interleaved with the worker's own lines).
pub fn register_self(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: getpid(2) and write(2) are async-signal-safe; the buffer lives on this stack.
    let pid = unsafe { libc::getpid() };
    let mut buf = [0u8; 16];
    let mut digits = [0u8; 12];
    let (mut n, mut len) = (pid as u32, 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf[0] = b'+';
    for i in 0..len {
        buf[1 + i] = digits[len - 1 - i];
    }
    buf[1 + len] = b'\n';
    // SAFETY: as above.
    let written = unsafe { libc::write(fd, buf.as_ptr().cast(), len + 2) };
    if written == (len + 2) as isize {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The watchdog's main: reads `+pgid` / `-pgid` lines until the pipe closes, then kills every
/// group still listed. Returns the exit status.
pub fn serve() -> i32 {
    // Signals meant for the worker (a terminal's ctrl-c, a service manager's SIGTERM to the
    // worker) must not stop the watchdog before the worker is gone.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal's disposition to SIG_IGN involves no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut groups: HashSet<i32> = HashSet::new();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let (op, pgid) = line.split_at(line.len().min(1));
        match (op, pgid.parse::<i32>()) {
            ("+", Ok(pgid)) if pgid > 1 => {
                groups.insert(pgid);
            }
            ("-", Ok(pgid)) => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    for pgid in groups {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    0
}
