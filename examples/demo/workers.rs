//! `--redis`: the task queues' commands run in separate worker processes, as in production.
//!
//! Without Redis the demo's patchbay runs each `task.command` itself, on its embedded queue.
//! With Redis the demo loads the manifests without their `command` (so patchbay only queues)
//! and starts one `patchbay worker` per queue instead, with the command and limits the
//! manifest gave: a separate process that takes the queue's jobs from Redis. The worker is this
//! demo binary run as `demo worker …`, which is `patchbay worker`'s code from the library, so it
//! is always the build being run.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

/// How long a worker may take to hand its jobs back and exit after SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// One queue's worker, as the manifest describes it.
#[derive(Debug, PartialEq)]
pub struct WorkerSpec {
    pub queue: String,
    /// `patchbay worker`'s arguments: `--queue … [limits] -- program args…`.
    pub args: Vec<String>,
}

/// The manifests of `dir` with every `task.command` (and its limits) taken out, written to a
/// new directory for patchbay, and the workers that run those commands instead.
pub fn split_manifests(dir: &Path) -> Result<(tempfile::TempDir, Vec<WorkerSpec>), String> {
    let out = tempfile::tempdir().map_err(|e| format!("cannot make a manifest directory: {e}"))?;
    let mut specs = Vec::new();
    for path in crate::site::manifest_files(dir)? {
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut actions: Value = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        if let Some(actions) = actions.as_object_mut() {
            for spec in actions.values_mut() {
                if let Some(task) = spec.get_mut("task").and_then(Value::as_object_mut) {
                    specs.extend(take_command(task));
                }
            }
        }
        let name = path.file_name().expect("a file name");
        std::fs::write(out.path().join(name), actions.to_string())
            .map_err(|e| format!("cannot write {}: {e}", name.to_string_lossy()))?;
    }
    Ok((out, specs))
}

/// Removes `command` and its limits from one `task` object; the worker that runs them.
fn take_command(task: &mut serde_json::Map<String, Value>) -> Option<WorkerSpec> {
    let command = task.remove("command")?;
    let queue = task.get("queue").and_then(Value::as_str)?.to_string();
    let mut args = vec!["--queue".to_string(), queue.clone()];
    for (key, flag) in [
        ("concurrency", "--concurrency"),
        ("graceMs", "--grace-ms"),
        ("outputLimitBytes", "--output-limit"),
    ] {
        if let Some(v) = task.remove(key) {
            args.extend([flag.to_string(), v.to_string()]);
        }
    }
    args.push("--".into());
    // patchbay checks the command when it loads the manifest; the worker checks it again.
    for word in command.as_array()? {
        args.push(word.as_str()?.to_string());
    }
    Some(WorkerSpec { queue, args })
}

/// Starts `demo worker <args>` for each spec against `redis_url`. Each worker dies with the
/// demo (SIGTERM when the demo exits, however it exits).
pub fn start(specs: &[WorkerSpec], redis_url: &str, log: &str) -> Result<Vec<Child>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the demo binary: {e}"))?;
    let mut children = Vec::new();
    for spec in specs {
        let mut command = Command::new(&exe);
        command
            .arg("worker")
            .args(&spec.args)
            .env("PATCHBAY_REDIS_URL", redis_url)
            .env("PATCHBAY_LOG", log)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start the worker of `{}`: {e}", spec.queue))?;
        children.push(child);
    }
    Ok(children)
}

/// SIGTERM to each worker (it hands its running jobs back), then waits for it to exit.
pub async fn stop(children: Vec<Child>) {
    for mut child in children {
        if let Some(pid) = child.id() {
            // SAFETY: plain kill(2) on our own child's pid, which it keeps until waited for.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(STOP_WAIT, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_move_from_the_manifest_to_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"GO": {"task": {"queue": "q", "command": ["/bin/echo", "hi"], "concurrency": 2, "graceMs": 100}},
                "GET": {"task": {"queue": "q", "op": "get"}},
                "HTTP": {"http": {"method": "GET", "path": "/x"}}}"#,
        )
        .unwrap();
        let (out, specs) = split_manifests(dir.path()).unwrap();
        let args = "--queue q --concurrency 2 --grace-ms 100 -- /bin/echo hi";
        assert_eq!(
            specs,
            vec![WorkerSpec {
                queue: "q".into(),
                args: args.split(' ').map(str::to_string).collect(),
            }]
        );
        let written: Value =
            serde_json::from_slice(&std::fs::read(out.path().join("a.json")).unwrap()).unwrap();
        assert_eq!(written["GO"]["task"], serde_json::json!({"queue": "q"}));
        assert_eq!(written["HTTP"]["http"]["path"], "/x");
    }
}
