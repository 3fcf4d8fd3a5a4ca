//! Reading a `task` spec: `{"queue", "op"?, <settings on the queue's enqueue action>}`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::registry::Handler;

/// Longest accepted duration setting: a day. Longer is surely a typo.
const MAX_MS: u64 = 86_400_000;
/// Most attempts a job may be given.
const MAX_ATTEMPTS: u32 = 100;
/// Most jobs one queue's command may run at once inside patchbay.
const MAX_CONCURRENCY: u32 = 1024;

/// What a `task` action does to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Start a job with the payload as its params.
    Enqueue,
    /// Read one task.
    Get,
    /// Cancel a queued or running task.
    Cancel,
    /// List the user's tasks.
    List,
}

/// A queue's settings, given on its one `enqueue` action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// Attempts before a job fails for good.
    pub max_attempts: u32,
    /// How long one attempt may run.
    pub timeout: Duration,
    /// How long a worker holds a job without renewing its lease.
    pub lease: Duration,
    /// The delay before retry n is `backoff × 2^(n-1)` (±20 %, at most 10 minutes).
    pub backoff: Duration,
    /// Active (queued, delayed, running) tasks one user may have.
    pub per_user_limit: u32,
    /// How long a finished task is kept.
    pub retention: Duration,
    /// The command patchbay itself runs the queue's jobs with, if any.
    pub command: Option<CommandSpec>,
}

/// A command that runs a queue's jobs inside patchbay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The program (an absolute path) and its arguments, exactly: nothing from a job is ever
    /// added to them.
    pub argv: Vec<String>,
    /// Jobs run at once.
    pub concurrency: u32,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Most bytes of output a job may write.
    pub output_limit: usize,
}

/// A `task` action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskAction {
    /// The queue: `[a-z0-9_-]{1,64}`.
    pub queue: String,
    /// What it does.
    pub op: Op,
    /// The queue's settings: on the `enqueue` action only.
    pub settings: Option<QueueSettings>,
}

/// The spec as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    queue: String,
    #[serde(default = "enqueue")]
    op: Op,
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    backoff_ms: Option<u64>,
    per_user_limit: Option<u32>,
    retention_secs: Option<u64>,
    command: Option<Value>,
    concurrency: Option<u32>,
    grace_ms: Option<u64>,
    output_limit_bytes: Option<usize>,
}

fn enqueue() -> Op {
    Op::Enqueue
}

/// Reads the value of a spec's `task` key.
pub fn parse(spec: &Value) -> Result<Handler, String> {
    let raw: Raw = serde_json::from_value(spec.clone()).map_err(|e| format!("`task`: {e}"))?;
    if !valid_queue(&raw.queue) {
        return Err(format!(
            "`task.queue` must be 1-64 of a-z 0-9 _ -, not `{}`",
            crate::error::clip(&raw.queue)
        ));
    }
    // Every setting; the last three go with `command` only.
    let settings = [
        ("maxAttempts", raw.max_attempts.is_some()),
        ("timeoutMs", raw.timeout_ms.is_some()),
        ("leaseMs", raw.lease_ms.is_some()),
        ("backoffMs", raw.backoff_ms.is_some()),
        ("perUserLimit", raw.per_user_limit.is_some()),
        ("retentionSecs", raw.retention_secs.is_some()),
        ("command", raw.command.is_some()),
        ("concurrency", raw.concurrency.is_some()),
        ("graceMs", raw.grace_ms.is_some()),
        ("outputLimitBytes", raw.output_limit_bytes.is_some()),
    ];
    let first_set =
        |keys: &[(&'static str, bool)]| keys.iter().find(|(_, set)| *set).map(|(k, _)| *k);
    if raw.op != Op::Enqueue {
        if let Some(key) = first_set(&settings) {
            return Err(format!(
                "`task.{key}` is a setting of the queue: give it on the queue's `enqueue` action"
            ));
        }
        return Ok(Handler::Task(TaskAction {
            queue: raw.queue,
            op: raw.op,
            settings: None,
        }));
    }
    let command = match raw.command {
        None => {
            if let Some(key) = first_set(&settings[7..]) {
                return Err(format!("`task.{key}` goes with `task.command`"));
            }
            None
        }
        Some(command) => Some(CommandSpec {
            argv: parse_command(&command)?,
            concurrency: bounded(
                "concurrency",
                raw.concurrency.unwrap_or(1),
                1,
                MAX_CONCURRENCY,
            )?,
            grace: millis("graceMs", raw.grace_ms.unwrap_or(5_000), 0)?,
            output_limit: bounded(
                "outputLimitBytes",
                raw.output_limit_bytes.unwrap_or(1_048_576),
                1,
                64 * 1024 * 1024,
            )?,
        }),
    };
    Ok(Handler::Task(TaskAction {
        queue: raw.queue,
        op: Op::Enqueue,
        settings: Some(QueueSettings {
            max_attempts: bounded(
                "maxAttempts",
                raw.max_attempts.unwrap_or(3),
                1,
                MAX_ATTEMPTS,
            )?,
            timeout: millis("timeoutMs", raw.timeout_ms.unwrap_or(60_000), 1)?,
            lease: millis("leaseMs", raw.lease_ms.unwrap_or(30_000), 1_000)?,
            backoff: millis("backoffMs", raw.backoff_ms.unwrap_or(1_000), 0)?,
            per_user_limit: bounded(
                "perUserLimit",
                raw.per_user_limit.unwrap_or(100),
                1,
                1_000_000,
            )?,
            retention: Duration::from_secs(bounded(
                "retentionSecs",
                raw.retention_secs.unwrap_or(86_400),
                1,
                365 * 86_400,
            )?),
            command,
        }),
    }))
}

/// Checks the actions of every queue together: exactly one `enqueue` per queue, and no
/// `get`, `cancel` or `list` for a queue nobody enqueues to. `actions` are (file, action name,
/// task action); the error names the file and the action at fault.
pub fn check_queues<'a>(
    actions: impl IntoIterator<Item = (&'a str, &'a str, &'a TaskAction)>,
) -> Result<(), (String, String, String)> {
    let actions: Vec<_> = actions.into_iter().collect();
    let mut enqueue: HashMap<&str, &str> = HashMap::new();
    let mut sorted = actions.clone();
    sorted.sort_by_key(|(file, name, _)| (*file, *name));
    for (file, name, task) in &sorted {
        if task.op == Op::Enqueue
            && let Some(first) = enqueue.insert(task.queue.as_str(), name)
        {
            return Err((
                file.to_string(),
                name.to_string(),
                format!(
                    "queue `{}` already has an enqueue action, {first}: one per queue",
                    task.queue
                ),
            ));
        }
    }
    for (file, name, task) in &sorted {
        if task.op != Op::Enqueue && !enqueue.contains_key(task.queue.as_str()) {
            return Err((
                file.to_string(),
                name.to_string(),
                format!(
                    "no action enqueues to queue `{}`: add one with `\"op\": \"enqueue\"`",
                    task.queue
                ),
            ));
        }
    }
    Ok(())
}

pub fn valid_queue(queue: &str) -> bool {
    (1..=64).contains(&queue.len())
        && queue
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn parse_command(command: &Value) -> Result<Vec<String>, String> {
    let argv: Vec<String> = match command {
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("`task.command` must be an array of strings")?,
        _ => return Err("`task.command` must be a non-empty array of strings".into()),
    };
    if !argv[0].starts_with('/') {
        return Err(format!(
            "`task.command`'s program must be an absolute path, not `{}`",
            crate::error::clip(&argv[0])
        ));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("`task.command` must not contain NUL bytes".into());
    }
    Ok(argv)
}

fn bounded<T: PartialOrd + std::fmt::Display + Copy>(
    key: &str,
    v: T,
    min: T,
    max: T,
) -> Result<T, String> {
    if v < min || v > max {
        return Err(format!("`task.{key}` must be from {min} to {max}, not {v}"));
    }
    Ok(v)
}

fn millis(key: &str, v: u64, min: u64) -> Result<Duration, String> {
    bounded(key, v, min, MAX_MS).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(v: Value) -> Result<TaskAction, String> {
        parse(&v).map(|h| match h {
            Handler::Task(t) => t,
            other => panic!("not a task: {other:?}"),
        })
    }

    #[test]
    fn defaults_follow_the_contract() {
        let t = task(json!({"queue": "exports"})).unwrap();
        assert_eq!(t.op, Op::Enqueue);
        let s = t.settings.unwrap();
        assert_eq!(
            (
                s.max_attempts,
                s.timeout,
                s.lease,
                s.backoff,
                s.per_user_limit,
                s.retention
            ),
            (
                3,
                Duration::from_secs(60),
                Duration::from_secs(30),
                Duration::from_secs(1),
                100,
                Duration::from_secs(86_400)
            )
        );
        assert_eq!(s.command, None);
        let t = task(json!({"queue": "exports", "command": ["/bin/echo", "x"]})).unwrap();
        let c = t.settings.unwrap().command.unwrap();
        assert_eq!(
            (c.concurrency, c.grace, c.output_limit),
            (1, Duration::from_secs(5), 1_048_576)
        );
        let t = task(json!({"queue": "exports", "op": "get"})).unwrap();
        assert_eq!((t.op, t.settings), (Op::Get, None));
    }

    #[test]
    fn every_bad_spec_is_refused_with_the_key() {
        for (spec, expect) in [
            (json!({"queue": "Exports"}), "task.queue"),
            (json!({"queue": ""}), "task.queue"),
            (json!({"queue": "a".repeat(65)}), "task.queue"),
            (json!({"queue": "q", "op": "delete"}), "task"),
            (json!({"queue": "q", "extra": 1}), "extra"),
            (
                json!({"queue": "q", "op": "get", "maxAttempts": 2}),
                "task.maxAttempts",
            ),
            (json!({"queue": "q", "maxAttempts": 0}), "task.maxAttempts"),
            (json!({"queue": "q", "leaseMs": 10}), "task.leaseMs"),
            (json!({"queue": "q", "timeoutMs": 0}), "task.timeoutMs"),
            (json!({"queue": "q", "command": []}), "task.command"),
            (
                json!({"queue": "q", "command": "/bin/sh -c x"}),
                "task.command",
            ),
            (
                json!({"queue": "q", "command": ["/bin/echo", 3]}),
                "task.command",
            ),
            (json!({"queue": "q", "command": ["echo"]}), "absolute path"),
            (json!({"queue": "q", "concurrency": 2}), "task.concurrency"),
            (
                json!({"queue": "q", "command": ["/bin/true"], "concurrency": 0}),
                "task.concurrency",
            ),
            (json!({"queue": 7}), "task"),
        ] {
            let e = task(spec.clone()).unwrap_err();
            assert!(e.contains(expect), "{spec}: {e}");
        }
    }

    #[test]
    fn queues_need_one_enqueue_each() {
        let enqueue = task(json!({"queue": "q"})).unwrap();
        let get = task(json!({"queue": "q", "op": "get"})).unwrap();
        let orphan = task(json!({"queue": "other", "op": "list"})).unwrap();
        assert!(check_queues([("a.json", "Q_START", &enqueue), ("a.json", "Q_GET", &get)]).is_ok());
        let (file, name, message) = check_queues([
            ("a.json", "Q_START", &enqueue),
            ("b.json", "Q_AGAIN", &enqueue),
        ])
        .unwrap_err();
        assert_eq!((file.as_str(), name.as_str()), ("b.json", "Q_AGAIN"));
        assert!(
            message.contains("already has an enqueue action"),
            "{message}"
        );
        let (_, name, message) = check_queues([
            ("a.json", "Q_START", &enqueue),
            ("a.json", "OTHER_LIST", &orphan),
        ])
        .unwrap_err();
        assert_eq!(name, "OTHER_LIST");
        assert!(
            message.contains("no action enqueues to queue `other`"),
            "{message}"
        );
    }
}
