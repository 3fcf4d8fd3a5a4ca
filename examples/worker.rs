//! An example task worker: it "works" through a few steps and publishes the task's progress to
//! Redis after each one, the way a worker in any language would.
//!
//! ```sh
//! cargo run --example worker -- [--redis URL] [--task ID] [--steps N] [--interval-ms MS] [--user USERID]
//! ```
//!
//! Each message is `PUBLISH tasks.<ID> <task JSON>`, the task JSON of Patchbay's task manager.
//! Every patchbay instance using this Redis (`PATCHBAY_REDIS_URL`) matches the channel with
//! `PATCHBAY_TASK_CHANNELS` (default `tasks.*`) and delivers
//! `{"type":"TASK_PROGRESS","payload":<task JSON>,"meta":{"room":"task:<ID>"}}` to the
//! connections in room `task:<ID>`, and to those in `user:<USERID>` when `--user` is given.
//!
//! The worker needs nothing from patchbay: no HTTP call, no token, only Redis. The number of
//! receivers Redis reports is the number of subscribers that matched the channel, usually one
//! per patchbay instance.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

/// Must match the prefix of patchbay's `PATCHBAY_TASK_CHANNELS` (default `tasks.*`).
const CHANNEL_PREFIX: &str = "tasks.";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";
/// patchbay delivers to room `task:<id>`, and room names are at most 128 bytes.
const MAX_ID_BYTES: usize = 128 - "task:".len();
/// An unreachable host should not leave the worker hanging silently.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const USAGE: &str =
    "usage: worker [--redis URL] [--task ID] [--steps N] [--interval-ms MS] [--user USERID]";

struct Args {
    redis: String,
    task: String,
    steps: u64,
    interval: Duration,
    user: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("worker: {e} ({USAGE})");
            return ExitCode::from(2);
        }
    };
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` for `--help`.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut args = Args {
        redis: std::env::var("PATCHBAY_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS.into()),
        task: uuid::Uuid::new_v4().to_string(),
        steps: 5,
        interval: Duration::from_millis(500),
        user: None,
    };
    while let Some(flag) = argv.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--redis" => args.redis = value,
            "--task" => args.task = room_part(&flag, value)?,
            "--steps" => args.steps = number(&flag, &value, 1, 1000)?,
            "--interval-ms" => {
                args.interval = Duration::from_millis(number(&flag, &value, 0, 3_600_000)?)
            }
            "--user" => args.user = Some(room_part(&flag, value)?),
            _ => return Err(format!("unknown argument `{flag}`")),
        }
    }
    Ok(Some(args))
}

fn number(flag: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    value
        .parse()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{flag} must be a whole number from {min} to {max}, not `{value}`"))
}

/// A task or user id becomes part of a room name, which patchbay requires to be printable
/// ASCII without spaces; anything else would be dropped there, so refuse it here.
fn room_part(flag: &str, value: String) -> Result<String, String> {
    let ok =
        (1..=MAX_ID_BYTES).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(value)
    } else {
        Err(format!(
            "{flag} must be 1 to {MAX_ID_BYTES} printable ASCII characters without spaces"
        ))
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let url = &args.redis;
    let client =
        redis::Client::open(url.as_str()).map_err(|e| format!("bad Redis URL `{url}`: {e}"))?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("cannot reach Redis at {url}: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot reach Redis at {url}: {}", one_line(&e)))?;

    let channel = format!("{CHANNEL_PREFIX}{}", args.task);
    println!(
        "task {}: {} step(s), one every {} ms, published on {channel} at {url}",
        args.task,
        args.steps,
        args.interval.as_millis()
    );
    let mut warned = false;
    for step in 0..=args.steps {
        let task = task_json(args, step);
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(task.to_string())
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("PUBLISH failed: {}", one_line(&e)))?;
        println!("PUBLISH {channel} {task} -> {receivers} receiver(s)");
        if receivers == 0 && !warned {
            println!("  (nobody received it: is a patchbay with this Redis running?)");
            warned = true;
        }
        if step < args.steps {
            tokio::time::sleep(args.interval).await; // the "work" of the next step
        }
    }
    Ok(())
}

/// Some Redis errors span lines (a parse error quotes what the server sent); errors here are
/// one line.
fn one_line(e: &redis::RedisError) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The task after `done` of its steps: running while steps remain, then succeeded.
fn task_json(args: &Args, done: u64) -> Value {
    let finished = done == args.steps;
    let (status, step_status) = if finished {
        ("succeeded", "succeeded".to_string())
    } else {
        ("running", format!("step {} of {}", done + 1, args.steps))
    };
    json!({
        "id": args.task,
        "title": "example worker task",
        "userId": args.user,
        "type": "example",
        "status": status,
        "progress": {
            "percent": done * 100 / args.steps,
            "step": done,
            "steps": args.steps,
            "status": step_status,
            "done": finished,
        },
    })
}
