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
}

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
            let taken = tokio::select! {
                _ = stop.cancelled() => break,
                taken = this.queue.take(&this.name, &this.id, TAKE_WAIT) => taken,
            };
            match taken {
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
        // A finish lost to a Redis blip is retried: the lease lasts long enough.
        for _ in 0..5 {
            match self.queue.finish(&id, lease.token, finish.clone()).await {
                Ok(task) => {
                    tracing::debug!(status = ?task.status, "reported");
                    return;
                }
                Err(QueueError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "cannot report the end yet; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
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
