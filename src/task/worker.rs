//! The worker: takes jobs of one queue and runs each as a child process with
//! [`super::runner`], holding its lease while it runs. The same code serves `task.command`
//! (inside patchbay, on the embedded or the Redis queue) and `patchbay worker`.
//!
//! Per job: the lease is renewed every third of its length (at most every 500 ms, which is
//! also how soon a cancel asked by a client reaches the job); progress is forwarded as it
//! comes, coalesced to the latest while a report is in flight; the end is reported once,
//! after the last progress. A renewal refused as stale means the job was given to another
//! worker: the child is stopped and nothing more is reported. On shutdown no new job is
//! taken and running ones are stopped and handed back without counting an attempt.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::CommandSpec;
use super::model::{ErrorCode, TaskError};
use super::queue::{Finish, Lease, Queue, QueueError};
use super::runner::{self, JobEnd, JobInput};
use super::watchdog::Watchdog;

/// How long one `take` waits before the worker looks at its stop signal again.
const TAKE_WAIT: Duration = Duration::from_secs(1);
/// Longest pause between lease renewals (and so the latency of a cancel).
const MAX_RENEW_EVERY: Duration = Duration::from_millis(500);
/// Pause after the queue failed (Redis down) before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// What one worker runs.
pub struct Worker {
    /// The queue's backend.
    pub queue: Arc<dyn Queue>,
    /// The queue's name.
    pub name: String,
    /// The command and its limits (`concurrency` jobs at once).
    pub command: CommandSpec,
    /// This worker's name (a consumer name on Redis).
    pub id: String,
    /// Kills job groups if this process dies.
    pub watchdog: Option<Arc<Watchdog>>,
    /// Told of each attempt this worker ran: the queue, how it ended, how long it took.
    pub observe: Option<Observe>,
}

/// See [`Worker::observe`].
pub type Observe = Arc<dyn Fn(&str, &str, Duration) + Send + Sync>;

impl Worker {
    /// Runs jobs until `stop` is cancelled; then hands running jobs back and returns once
    /// every child is gone.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.command.concurrency as usize));
        let jobs = TaskTracker::new();
        tracing::info!(queue = %this.name, worker = %this.id, concurrency = this.command.concurrency, "worker started");
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            };
            // Not raced with `stop`: a read abandoned half-way could still hand this worker
            // an entry after it has gone. It waits at most `TAKE_WAIT`.
            let taken = this.queue.take(&this.name, &this.id, TAKE_WAIT).await;
            match taken {
                Ok(Some(lease)) if stop.is_cancelled() => {
                    if let Err(e) = this
                        .queue
                        .finish(&lease.task.id, lease.token, Finish::HandBack)
                        .await
                    {
                        tracing::warn!(error = %e, "cannot hand a job back");
                    }
                    break;
                }
                Ok(Some(lease)) => {
                    let this = this.clone();
                    let stop = stop.clone();
                    jobs.spawn(async move {
                        this.job(lease, stop).await;
                        drop(permit);
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(queue = %this.name, error = %e, "cannot take a job; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
        jobs.close();
        jobs.wait().await;
        this.queue.retire(&this.name, &this.id).await;
        tracing::info!(queue = %this.name, worker = %this.id, "worker stopped");
    }

    /// Runs one job to its end and reports it.
    async fn job(&self, lease: Lease, stop: CancellationToken) {
        let span = tracing::info_span!("job", queue = %self.name, task = %lease.task.id, attempt = lease.task.attempts);
        self.run_job(lease, stop).instrument(span).await
    }

    async fn run_job(&self, lease: Lease, stop: CancellationToken) {
        let task = &lease.task;
        let id = task.id.clone();
        let input = JobInput {
            id: id.clone(),
            queue: task.queue.clone(),
            params: task.params.clone(),
            attempt: task.attempts,
            user_id: task.user_id.clone(),
        };
        let began = std::time::Instant::now();
        let kill = CancellationToken::new();
        let (progress_tx, mut progress_rx) = watch::channel::<Option<Map<String, Value>>>(None);
        let run = runner::run(
            &self.command,
            &input,
            lease.timeout,
            kill.clone(),
            self.watchdog.as_deref(),
            |p| {
                progress_tx.send_replace(Some(p));
            },
        );
        tokio::pin!(run);
        let every = (lease.lease / 3).min(MAX_RENEW_EVERY);
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut why_stopped: Option<Stop> = None;
        let (end, output) = loop {
            tokio::select! {
                biased;
                done = &mut run => break done,
                Ok(()) = progress_rx.changed() => {
                    let latest = progress_rx.borrow_and_update().clone();
                    if let Some(p) = latest
                        && why_stopped.is_none()
                        && let Err(e) = self.queue.progress(&id, lease.token, p).await
                    {
                        self.refused(&e, &kill, &mut why_stopped);
                    }
                }
                _ = renew.tick() => match self.queue.renew(&id, lease.token).await {
                    Ok(r) if r.cancel_requested && why_stopped.is_none() => {
                        tracing::info!("cancel requested: stopping the job");
                        why_stopped = Some(Stop::Cancelled);
                        kill.cancel();
                    }
                    Ok(_) => {}
                    Err(e) => self.refused(&e, &kill, &mut why_stopped),
                },
                _ = stop.cancelled(), if why_stopped.is_none() => {
                    why_stopped = Some(Stop::HandBack);
                    kill.cancel();
                }
            }
        };
        let outcome = match (&end, why_stopped) {
            (_, Some(Stop::Lost)) => "lease_lost",
            (_, Some(Stop::HandBack)) => "handed_back",
            (_, Some(Stop::Cancelled)) => "cancelled",
            (JobEnd::Succeeded(_), None) => "succeeded",
            (JobEnd::TimedOut, None) => "timeout",
            (JobEnd::OutputTooLarge, None) => "output_too_large",
            _ => "failed",
        };
        if let Some(observe) = &self.observe {
            observe(&self.name, outcome, began.elapsed());
        }
        if matches!(why_stopped, Some(Stop::Lost)) {
            return;
        }
        // The last progress goes before the end.
        let last = match progress_rx.has_changed() {
            Ok(true) => progress_rx.borrow_and_update().clone(),
            _ => None,
        };
        if let Some(p) = last
            && let Err(e) = self.queue.progress(&id, lease.token, p).await
        {
            tracing::debug!(error = %e, "the last progress was refused");
        }
        let failed = |code, message: String| Finish::Failed(TaskError { code, message });
        let finish = match end {
            JobEnd::Succeeded(result) => Finish::Succeeded(result),
            JobEnd::Cancelled if why_stopped == Some(Stop::HandBack) => Finish::HandBack,
            JobEnd::Cancelled => failed(ErrorCode::Failed, "cancelled".into()),
            JobEnd::Failed(why) => failed(ErrorCode::Failed, why),
            JobEnd::NotStarted(why) => failed(
                ErrorCode::Failed,
                format!("the command could not start: {why}"),
            ),
            JobEnd::TimedOut => failed(
                ErrorCode::Timeout,
                format!("the attempt ran past {} ms", lease.timeout.as_millis()),
            ),
            JobEnd::OutputTooLarge => failed(
                ErrorCode::OutputTooLarge,
                format!(
                    "the job wrote more than {} bytes",
                    self.command.output_limit
                ),
            ),
        };
        if let Finish::Failed(e) = &finish
            && why_stopped.is_none()
        {
            tracing::warn!(code = ?e.code, message = %e.message, stderr = %output.stderr_tail, "the attempt failed");
        }
        if output.ignored_lines > 0 {
            tracing::debug!(
                lines = output.ignored_lines,
                "stdout lines that were not reports"
            );
        }
        self.report(&id, &lease, finish).await;
    }

    /// Reports the end. While the queue is unreachable it keeps trying, renewing the lease,
    /// until the lease is surely gone (then the job runs elsewhere and this end is moot). A
    /// result the queue refuses (too large, not JSON) fails the attempt instead of leaving
    /// the task running until its lease lapses.
    async fn report(&self, id: &str, lease: &Lease, mut finish: Finish) {
        let give_up = tokio::time::Instant::now() + lease.lease + RETRY_AFTER * 4;
        loop {
            match self.queue.finish(id, lease.token, finish.clone()).await {
                Ok(task) => {
                    tracing::debug!(status = ?task.status, "reported");
                    return;
                }
                Err(QueueError::Unavailable(e)) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!(error = %e, "cannot report the end yet; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    let _ = self.queue.renew(id, lease.token).await;
                }
                Err(e @ (QueueError::Invalid(_) | QueueError::Step(_)))
                    if matches!(finish, Finish::Succeeded(_)) =>
                {
                    tracing::warn!(error = %e, "the result was refused: the attempt fails");
                    finish = Finish::Failed(TaskError {
                        code: ErrorCode::OutputTooLarge,
                        message: format!("the result was refused: {e}"),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the end was refused");
                    return;
                }
            }
        }
    }

    /// A step was refused: a stale lease means another worker has the job now.
    fn refused(&self, e: &QueueError, kill: &CancellationToken, why: &mut Option<Stop>) {
        match e {
            QueueError::StaleLease | QueueError::NotFound => {
                tracing::warn!("the lease was lost (the job runs elsewhere now): stopping it");
                *why = Some(Stop::Lost);
                kill.cancel();
            }
            // A blip: the next renewal tries again, within the lease.
            e => tracing::warn!(error = %e, "a report was refused"),
        }
    }
}

/// Why the worker stopped a job before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A client cancelled it.
    Cancelled,
    /// The worker is shutting down.
    HandBack,
    /// The lease went to another worker.
    Lost,
}

/// A name for a worker: unique among every worker of a queue (the process id, for people, and
/// a random part).
pub fn worker_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", std::process::id(), &random[..8])
}

/// `patchbay worker`'s usage.
pub const USAGE: &str = "usage: patchbay worker --queue <name> [--concurrency N] [--grace-ms MS] [--output-limit BYTES] -- <program> [args...]";

/// `patchbay worker`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The queue to run.
    pub queue: String,
    /// The command and its limits.
    pub command: CommandSpec,
}

impl WorkerArgs {
    /// Reads the arguments after `worker`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<WorkerArgs, String> {
        let mut args = args.into_iter();
        let mut queue = None;
        let mut concurrency = 1u32;
        let mut grace = Duration::from_millis(5_000);
        let mut output_limit = 1_048_576usize;
        let mut argv = Vec::new();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--queue" => queue = Some(value("--queue")?),
                "--concurrency" => {
                    concurrency = number("--concurrency", &value("--concurrency")?, 1, 1024)? as u32
                }
                "--grace-ms" => {
                    grace = Duration::from_millis(number(
                        "--grace-ms",
                        &value("--grace-ms")?,
                        0,
                        86_400_000,
                    )?)
                }
                "--output-limit" => {
                    output_limit = number(
                        "--output-limit",
                        &value("--output-limit")?,
                        1,
                        64 * 1024 * 1024,
                    )? as usize
                }
                "--" => {
                    argv.extend(args.by_ref());
                    break;
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        let queue = queue.ok_or("--queue is required")?;
        if !super::spec::valid_queue(&queue) {
            return Err(format!(
                "--queue must be 1-64 of a-z 0-9 _ -, not `{}`",
                crate::error::clip(&queue)
            ));
        }
        if argv.is_empty() || argv[0].is_empty() {
            return Err("the command to run goes after `--`".into());
        }
        Ok(WorkerArgs {
            queue,
            command: CommandSpec {
                argv,
                concurrency,
                grace,
                output_limit,
            },
        })
    }
}

fn number(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or(format!(
            "{name} must be an integer from {min} to {max}, not `{value}`"
        ))
}

/// Runs `patchbay worker` until `shutdown` resolves: jobs of one queue on Redis, each as a
/// child process; on shutdown running jobs are handed back for another worker.
pub async fn serve(
    redis_url: &str,
    redis_options: &crate::bus::RedisOptions,
    prefix: &str,
    args: WorkerArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let target = crate::bus::RedisTarget::open(redis_url, redis_options)
        .map_err(|e| format!("PATCHBAY_REDIS_URL: {e}"))?;
    let queue = super::RedisQueue::on(&target, prefix);
    tokio::pin!(shutdown);
    // Redis may not be up yet: the worker waits for it rather than exiting.
    let mut warned = false;
    while let Err(e) = async {
        queue.load_functions().await?;
        queue.create_group(&args.queue).await
    }
    .await
    {
        if !warned {
            tracing::warn!(error = %e, "Redis is not reachable yet: waiting for it");
            warned = true;
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
    let stop = CancellationToken::new();
    let worker = Worker {
        queue: Arc::new(queue),
        name: args.queue,
        command: args.command,
        id: worker_id(),
        watchdog: super::watchdog::for_this_process(),
        observe: None,
    };
    let run = tokio::spawn(worker.run(stop.clone()));
    shutdown.await;
    tracing::info!("stopping: running jobs go back to the queue");
    stop.cancel();
    run.await.map_err(|e| format!("the worker failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<WorkerArgs, String> {
        WorkerArgs::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn worker_arguments_are_read_strictly() {
        let a = parse(&[
            "--queue",
            "exports",
            "--concurrency",
            "4",
            "--grace-ms",
            "100",
            "--",
            "/bin/echo",
            "--queue",
        ])
        .unwrap();
        assert_eq!(a.queue, "exports");
        assert_eq!(
            a.command.argv,
            vec!["/bin/echo", "--queue"],
            "everything after -- is the command"
        );
        assert_eq!(a.command.concurrency, 4);
        assert_eq!(a.command.grace, Duration::from_millis(100));
        assert_eq!(a.command.output_limit, 1_048_576);
        for bad in [
            &["--", "/bin/true"][..],
            &["--queue", "Exports", "--", "/bin/true"],
            &["--queue", "q"],
            &["--queue", "q", "--concurrency", "0", "--", "/bin/true"],
            &["--queue", "q", "--bogus", "--", "/bin/true"],
            &["--queue"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
