//! Running one job as a child process, as `task.command` and `patchbay worker` do: the argv
//! exactly as configured (nothing from the job ever becomes an argument, a shell word or an
//! environment value), the job as one JSON object on stdin, JSON lines on stdout
//! (`{"progress":{…}}`, `{"result":…}`), its own process group, an environment without
//! patchbay's secrets, and SIGTERM then SIGKILL to the whole group on timeout, cancel or an
//! output bomb.
//!
//! With a [`Watchdog`], the group also dies when the worker itself is killed.
//!
//! The job's leader is reaped only after its group has been stopped: process ids are reused
//! (quickly, where `pid_max` is small), and a group signalled after its leader was reaped and
//! its last member gone could be a stranger's new group.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::CommandSpec;
use super::watchdog::Watchdog;

/// How long output is still read after the command exited while something it left running
/// holds its output open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// The stderr bytes kept for the log.
const STDERR_TAIL: usize = 4096;

/// What one job gets on stdin.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobInput {
    /// The task id.
    pub id: String,
    /// The queue.
    pub queue: String,
    /// The enqueue payload.
    pub params: Value,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// The owner, or `null`.
    pub user_id: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// Exit 0, with the last `{"result":…}` line (else `null`).
    Succeeded(Value),
    /// Another exit status or a signal.
    Failed(String),
    /// It ran past the attempt's timeout.
    TimedOut,
    /// It wrote more than its output limit.
    OutputTooLarge,
    /// It was cancelled.
    Cancelled,
    /// It could not be started.
    NotStarted(String),
}

/// What the runner saw besides the end: stdout lines that were not reports, and the tail of
/// stderr (for the log, never the task object).
#[derive(Debug, Default, Clone)]
pub struct JobOutput {
    /// Lines that were neither `{"progress":…}` nor `{"result":…}`.
    pub ignored_lines: u64,
    /// The last bytes of stderr.
    pub stderr_tail: String,
}

/// Runs one job. `on_progress` gets each progress object as it is reported.
pub async fn run(
    spec: &CommandSpec,
    job: &JobInput,
    timeout: Duration,
    cancel: CancellationToken,
    watchdog: Option<&Watchdog>,
    mut on_progress: impl FnMut(Map<String, Value>),
) -> (JobEnd, JobOutput) {
    let mut output = JobOutput::default();
    let mut child = match spawn(spec, job, watchdog.and_then(Watchdog::fd)) {
        Ok(child) => child,
        Err(e) => return (JobEnd::NotStarted(e.to_string()), output),
    };
    let pgid = child.id().map(|id| id as i32);
    let stdin = child.stdin.take();
    let input = serde_json::to_vec(job).expect("JSON values always serialize");
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A child that does not read its input is its own business.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let limit = spec.output_limit;
    let mut result = Value::Null;
    let read = async {
        let mut seen = 0usize;
        let mut lines = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Bounded: a line longer than what is left of the limit ends the job.
            let left = (limit + 1).saturating_sub(seen) as u64;
            match (&mut lines).take(left).read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break Ok(()),
                Ok(n) => seen += n,
            }
            if seen > limit {
                break Err(());
            }
            match serde_json::from_slice::<Value>(&line) {
                Ok(Value::Object(mut report)) if report.len() == 1 => {
                    if let Some(Value::Object(progress)) = report.remove("progress") {
                        on_progress(progress);
                    } else if let Some(r) = report.remove("result") {
                        result = r;
                    } else {
                        output.ignored_lines += 1;
                    }
                }
                _ => output.ignored_lines += 1,
            }
        }
    };
    let mut tail = Vec::new();
    let read_stderr = async {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
    };
    // The leader is never reaped before its group has been stopped: while it is a zombie its
    // pid, which is the group's id, cannot be given to another process, so signalling the
    // group can never reach a stranger's processes.
    let leader = child.id();
    let work = async {
        let pipes = async { tokio::join!(feed, read, read_stderr).1 };
        tokio::pin!(pipes);
        // While the job runs, its exit is looked for ever less often (its output closing is
        // the usual sign of its end); once the output has closed, promptly.
        let exited = leader_exited(leader, LONG_RUN_POLL);
        tokio::pin!(exited);
        tokio::select! {
            read = &mut pipes => {
                leader_exited(leader, END_POLL).await;
                read
            }
            // It exited, but something it left running may hold its output open: read what
            // is there for a moment, then end as its exit status says.
            () = &mut exited => tokio::time::timeout(DRAIN_AFTER_EXIT, &mut pipes)
                .await
                .unwrap_or(Ok(())),
        }
    };
    let ended = tokio::select! {
        read = work => Ok(read),
        _ = tokio::time::sleep(timeout) => Err(JobEnd::TimedOut),
        _ = cancel.cancelled() => Err(JobEnd::Cancelled),
    };
    // Whatever the end, nothing of the job outlives it: the whole group goes (SIGTERM, then
    // SIGKILL after the grace), grandchildren included. Then the leader is reaped.
    if let Some(pgid) = pgid {
        stop_group(pgid, spec.grace).await;
        if let Some(dog) = watchdog {
            dog.release(pgid);
        }
    }
    let status = child.wait().await;
    let end = match (ended, status) {
        (Err(end), _) => end,
        (Ok(Err(())), _) => JobEnd::OutputTooLarge,
        // The last `{"result":…}` line.
        (Ok(Ok(())), Ok(status)) if status.success() => JobEnd::Succeeded(result),
        (Ok(Ok(())), Ok(status)) => JobEnd::Failed(format!("the command ended with {status}")),
        (Ok(Ok(())), Err(e)) => JobEnd::Failed(format!("waiting for the command failed: {e}")),
    };
    output.stderr_tail = String::from_utf8_lossy(&tail).into_owned();
    (end, output)
}

/// Starts the job in its own process group. With a watchdog's pipe `watchdog`, the child
/// registers its group there itself before its program runs, so no moment exists in which the
/// worker could die leaving an unregistered job behind.
fn spawn(
    spec: &CommandSpec,
    job: &JobInput,
    watchdog: Option<std::os::fd::RawFd>,
) -> std::io::Result<Child> {
    let mut command = Command::new(&spec.argv[0]);
    command
        .args(&spec.argv[1..])
        .env_clear()
        .env("PATCHBAY_TASK_ID", &job.id)
        .env("PATCHBAY_TASK_ATTEMPT", job.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so the whole tree can be signalled at once.
        .process_group(0)
        .kill_on_drop(true);
    for name in ["PATH", "HOME", "LANG"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    if let Some(fd) = watchdog {
        // SAFETY: the closure only calls async-signal-safe functions (see `register_self`).
        unsafe {
            command.pre_exec(move || super::watchdog::register_self(fd));
        }
    }
    command.spawn()
}

/// Longest pause between looks for a running job's exit.
const LONG_RUN_POLL: Duration = Duration::from_millis(100);
/// Longest pause between looks once the job's output has closed.
const END_POLL: Duration = Duration::from_millis(10);

/// Resolves when process `pid` has exited, without reaping it (`waitid` with `WNOWAIT`),
/// looking after 1 ms, then twice as long each time up to `longest`.
async fn leader_exited(pid: Option<u32>, longest: Duration) {
    let Some(pid) = pid else { return };
    let exited = || {
        // SAFETY: `info` is a plain C struct that waitid(2) fills in; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) on our own child with a valid out-pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: reading the pid field of a siginfo_t waitid(2) filled in (0 while it runs).
        r != 0 || unsafe { info.si_pid() } != 0
    };
    let mut pause = Duration::from_millis(1);
    while !exited() {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(longest);
    }
}

/// Whether any process of group `pgid` still runs (a zombie, such as the unreaped leader,
/// does not count).
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        // After the command: state, ppid, pgrp.
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
}

/// SIGTERM to the group, then SIGKILL once `grace` has passed if any of it still runs. The
/// leader must not have been reaped yet (see [`run`]).
async fn stop_group(pgid: i32, grace: Duration) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    let signal = |sig| unsafe { libc::kill(-pgid, sig) };
    if signal(libc::SIGTERM) != 0 {
        return; // the group is already gone
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !group_alive(pgid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(libc::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(script: &str, output_limit: usize) -> CommandSpec {
        CommandSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            concurrency: 1,
            grace: Duration::from_millis(300),
            output_limit,
        }
    }

    fn job(params: Value) -> JobInput {
        JobInput {
            id: "t1".into(),
            queue: "q".into(),
            params,
            attempt: 1,
            user_id: Some("7".into()),
        }
    }

    async fn run_script(script: &str, params: Value, timeout: Duration) -> (JobEnd, Vec<Value>) {
        let mut progress = Vec::new();
        let (end, _) = run(
            &spec(script, 1 << 20),
            &job(params),
            timeout,
            CancellationToken::new(),
            None,
            |p| progress.push(Value::Object(p)),
        )
        .await;
        (end, progress)
    }

    #[tokio::test]
    async fn reports_progress_and_the_last_result() {
        let script = r#"read -r job; echo "{\"progress\":{\"percent\":50}}"; echo noise; echo '{"result":1}'; echo '{"result":{"ok":true}}'"#;
        let (end, progress) = run_script(script, json!({}), Duration::from_secs(10)).await;
        assert_eq!(end, JobEnd::Succeeded(json!({"ok": true})));
        assert_eq!(progress, vec![json!({"percent": 50})]);
    }

    #[tokio::test]
    async fn the_job_arrives_on_stdin_and_the_environment_is_clean() {
        // Echo back what the job sees; nothing of the params may reach argv or the env.
        let script = r#"read -r job; printf '{"result":{"job":%s,"env":"%s"}}\n' "$job" "$(env | cut -d= -f1 | sort | tr '\n' ' ')""#;
        let params = json!({"file": "; touch /tmp/patchbay-pwned", "flag": "--help"});
        let (end, _) = run_script(script, params.clone(), Duration::from_secs(10)).await;
        let JobEnd::Succeeded(result) = end else {
            panic!("{end:?}");
        };
        assert_eq!(result["job"]["params"], params);
        assert_eq!(result["job"]["attempt"], 1);
        assert_eq!(result["job"]["userId"], "7");
        let env = result["env"].as_str().unwrap();
        assert!(
            env.contains("PATCHBAY_TASK_ID") && env.contains("PATCHBAY_TASK_ATTEMPT"),
            "{env}"
        );
        for name in env.split_whitespace() {
            assert!(
                [
                    "PATH",
                    "HOME",
                    "LANG",
                    "PATCHBAY_TASK_ID",
                    "PATCHBAY_TASK_ATTEMPT",
                    "PWD",
                    "SHLVL",
                    "_"
                ]
                .contains(&name),
                "unexpected variable {name}"
            );
        }
        assert!(!std::path::Path::new("/tmp/patchbay-pwned").exists());
    }

    #[tokio::test]
    async fn failure_timeout_and_output_bomb() {
        let (end, _) = run_script("exit 3", json!({}), Duration::from_secs(10)).await;
        assert!(
            matches!(end, JobEnd::Failed(ref m) if m.contains('3')),
            "{end:?}"
        );
        let (end, _) = run_script("sleep 30", json!({}), Duration::from_millis(200)).await;
        assert_eq!(end, JobEnd::TimedOut);
        let (end, _) = run(
            &spec("yes", 64 * 1024),
            &job(json!({})),
            Duration::from_secs(10),
            CancellationToken::new(),
            None,
            |_| {},
        )
        .await;
        assert_eq!(end, JobEnd::OutputTooLarge);
        let missing = CommandSpec {
            argv: vec!["/nonexistent/program".into()],
            ..spec("", 1)
        };
        let (end, _) = run(
            &missing,
            &job(json!({})),
            Duration::from_secs(1),
            CancellationToken::new(),
            None,
            |_| {},
        )
        .await;
        assert!(matches!(end, JobEnd::NotStarted(_)), "{end:?}");
    }

    #[tokio::test]
    async fn a_job_that_stops_on_sigterm_does_not_wait_out_the_grace() {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.cancel();
        });
        let slow_grace = CommandSpec {
            grace: Duration::from_secs(20),
            ..spec("sleep 30", 1 << 20)
        };
        let started = std::time::Instant::now();
        let (end, _) = run(
            &slow_grace,
            &job(json!({})),
            Duration::from_secs(60),
            cancel,
            None,
            |_| {},
        )
        .await;
        assert_eq!(end, JobEnd::Cancelled);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stopped when the group was gone, not after the 20 s grace: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn exit_0_succeeds_even_when_a_leftover_process_holds_the_output() {
        // The background sleep keeps stdout open after the job itself exited 0.
        let (end, _) = run_script(
            r#"echo '{"result":7}'; sleep 30 & exit 0"#,
            json!({}),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(end, JobEnd::Succeeded(json!(7)));
    }

    /// Whether process `pid` still runs (a zombie waiting to be reaped does not count).
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim().to_string())
            })
            .is_some_and(|rest| !rest.starts_with('Z'))
    }

    #[tokio::test]
    async fn cancel_takes_the_whole_group_grandchildren_included() {
        let pids =
            std::env::temp_dir().join(format!("patchbay-grandchildren-{}", std::process::id()));
        // Two grandchildren, one of which ignores SIGTERM.
        let script = format!(
            "(trap '' TERM; sleep 30) & echo $! > {p}; (sleep 30) & echo $! >> {p}; wait",
            p = pids.display()
        );
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
        });
        let started = std::time::Instant::now();
        let (end, _) = run(
            &spec(&script, 1 << 20),
            &job(json!({})),
            Duration::from_secs(60),
            cancel,
            None,
            |_| {},
        )
        .await;
        assert_eq!(end, JobEnd::Cancelled);
        // The grace is 300 ms: the one that ignores SIGTERM is killed after it.
        assert!(started.elapsed() < Duration::from_secs(5));
        let pids = std::fs::read_to_string(&pids).unwrap();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        assert_eq!(pids.len(), 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
        for pid in pids {
            assert!(!alive(pid), "grandchild {pid} survived the cancel");
        }
    }
}
