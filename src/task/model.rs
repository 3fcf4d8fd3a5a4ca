//! A task and its life: the object every `TASK_PROGRESS` carries, the statuses it moves
//! through, and the rules of each step (contract section 7). Pure: both queue backends apply
//! the same rules, and the tests here pin them down.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::QueueSettings;

/// Largest progress object a worker may report.
pub const MAX_PROGRESS_BYTES: usize = 16 * 1024;
/// Largest result a job may set.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// Longest delay before a retry.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Where a task stands. The last four are final: a task reaches exactly one, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// Waiting for its next attempt after a failure.
    Delayed,
    /// A worker holds it.
    Running,
    /// Done, with a result.
    Succeeded,
    /// Every attempt failed or timed out.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
    /// Handed to workers `maxAttempts` times, and none ever reported an end.
    Lost,
}

impl Status {
    /// Whether the task has finished for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::Cancelled | Status::Lost
        )
    }
}

/// Why an attempt, or the task, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The job reported failure or exited non-zero.
    Failed,
    /// The attempt ran past `timeoutMs`.
    Timeout,
    /// The job wrote more than its output limit.
    OutputTooLarge,
    /// The worker holding it died.
    WorkerLost,
}

/// `{"code","message"}` of a failed attempt or task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// The code.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
}

/// The task object, exactly as clients and workers see it: every key always present, `null`
/// where nothing is known yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// The task id.
    pub id: String,
    /// The queue.
    pub queue: String,
    /// The owner; `None` for an anonymous connection's task.
    pub user_id: Option<String>,
    /// Where it stands.
    pub status: Status,
    /// The job's parameters (the enqueue payload).
    pub params: Value,
    /// The latest progress object reported.
    pub progress: Option<Map<String, Value>>,
    /// The result, once succeeded.
    pub result: Option<Value>,
    /// The last error: on a failed attempt awaiting retry, and on `failed` and `lost`.
    pub error: Option<TaskError>,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts it may have.
    pub max_attempts: u32,
    /// When it was enqueued (RFC 3339).
    pub created_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
    /// A cancel was asked while it ran; the worker has not stopped yet.
    pub cancel_requested: bool,
}

/// A step that is not allowed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The task has finished (cancel: `conflict`, 409).
    #[error("the task has already finished")]
    Finished,
    /// The step does not apply to the task's status (a stale worker, for one).
    #[error("the task is {0:?}, not running")]
    NotRunning(Status),
    /// A progress object or result over its size limit.
    #[error("{0} is larger than {1} bytes")]
    TooLarge(&'static str, usize),
}

/// What a failed attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try again after this delay.
    RetryIn(Duration),
    /// Failed for good.
    Failed,
}

/// An RFC 3339 timestamp with milliseconds, in UTC.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

impl Task {
    /// A new queued task.
    pub fn new(
        id: String,
        queue: &str,
        user_id: Option<String>,
        params: Value,
        settings: &QueueSettings,
        now: SystemTime,
    ) -> Task {
        let at = timestamp(now);
        Task {
            id,
            queue: queue.to_string(),
            user_id,
            status: Status::Queued,
            params,
            progress: None,
            result: None,
            error: None,
            attempts: 0,
            max_attempts: settings.max_attempts,
            created_at: at.clone(),
            updated_at: at,
            cancel_requested: false,
        }
    }

    fn touch(&mut self, now: SystemTime) {
        self.updated_at = timestamp(now);
    }

    /// A worker takes it: the next attempt starts.
    pub fn start(&mut self, now: SystemTime) -> Result<(), StepError> {
        match self.status {
            Status::Queued | Status::Delayed => {
                self.status = Status::Running;
                self.attempts += 1;
                self.touch(now);
                Ok(())
            }
            s if s.is_final() => Err(StepError::Finished),
            s => Err(StepError::NotRunning(s)),
        }
    }

    /// The worker reports progress.
    pub fn progress(
        &mut self,
        progress: Map<String, Value>,
        now: SystemTime,
    ) -> Result<(), StepError> {
        self.running()?;
        let size = Value::Object(progress.clone()).to_string().len();
        if size > MAX_PROGRESS_BYTES {
            return Err(StepError::TooLarge("progress", MAX_PROGRESS_BYTES));
        }
        self.progress = Some(progress);
        self.touch(now);
        Ok(())
    }

    /// The attempt succeeded.
    pub fn succeed(&mut self, result: Value, now: SystemTime) -> Result<(), StepError> {
        self.running()?;
        if result.to_string().len() > MAX_RESULT_BYTES {
            return Err(StepError::TooLarge("result", MAX_RESULT_BYTES));
        }
        self.status = Status::Succeeded;
        self.result = Some(result);
        self.error = None;
        self.touch(now);
        Ok(())
    }

    /// The attempt failed (or timed out, or wrote too much): retried after a backoff while
    /// attempts remain, else failed. A task whose cancel was asked is cancelled instead.
    /// `random` in [0, 1) sets the jitter.
    pub fn fail_attempt(
        &mut self,
        error: TaskError,
        settings: &QueueSettings,
        random: f64,
        now: SystemTime,
    ) -> Result<AfterFailure, StepError> {
        self.running()?;
        self.touch(now);
        if self.cancel_requested {
            self.status = Status::Cancelled;
            return Ok(AfterFailure::Failed);
        }
        self.error = Some(error);
        if self.attempts >= self.max_attempts {
            self.status = Status::Failed;
            return Ok(AfterFailure::Failed);
        }
        self.status = Status::Delayed;
        Ok(AfterFailure::RetryIn(backoff(
            settings.backoff,
            self.attempts,
            random,
        )))
    }

    /// The worker holding it died: the next attempt starts at once (no backoff), unless it
    /// has been handed out `maxAttempts` times, when it is lost (a job that kills its worker
    /// is never retried forever).
    pub fn worker_lost(&mut self, now: SystemTime) -> Result<(), StepError> {
        self.running()?;
        self.touch(now);
        self.error = Some(TaskError {
            code: ErrorCode::WorkerLost,
            message: "the worker running it stopped answering".into(),
        });
        if self.cancel_requested {
            self.status = Status::Cancelled;
        } else if self.attempts >= self.max_attempts {
            self.status = Status::Lost;
        } else {
            self.status = Status::Queued;
        }
        Ok(())
    }

    /// The worker gives the job back unfinished (it is shutting down): queued again without
    /// counting the attempt, or cancelled if a cancel was asked meanwhile.
    pub fn hand_back(&mut self, now: SystemTime) -> Result<(), StepError> {
        self.running()?;
        self.touch(now);
        if self.cancel_requested {
            self.status = Status::Cancelled;
        } else {
            self.status = Status::Queued;
            self.attempts = self.attempts.saturating_sub(1);
        }
        Ok(())
    }

    /// Cancels it: a queued or delayed task at once, a running one once its worker stops
    /// (`cancelRequested` until then). A finished task is a conflict.
    pub fn cancel(&mut self, now: SystemTime) -> Result<(), StepError> {
        match self.status {
            Status::Queued | Status::Delayed => self.status = Status::Cancelled,
            Status::Running => self.cancel_requested = true,
            _ => return Err(StepError::Finished),
        }
        self.touch(now);
        Ok(())
    }

    fn running(&self) -> Result<(), StepError> {
        match self.status {
            Status::Running => Ok(()),
            s if s.is_final() => Err(StepError::Finished),
            s => Err(StepError::NotRunning(s)),
        }
    }
}

/// The delay before retry `n` (the attempt that just failed was the `n`-th):
/// `backoff × 2^(n-1)`, ±20 % by `random` in [0, 1), at most [`MAX_BACKOFF`].
pub fn backoff(base: Duration, n: u32, random: f64) -> Duration {
    let exponent = n.saturating_sub(1).min(30);
    let nominal = base.saturating_mul(1 << exponent).min(MAX_BACKOFF);
    let factor = 0.8 + 0.4 * random.clamp(0.0, 1.0);
    nominal.mul_f64(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> QueueSettings {
        match super::super::parse(&json!({"queue": "q", "maxAttempts": 3, "backoffMs": 1000}))
            .unwrap()
        {
            crate::registry::Handler::Task(t) => t.settings.unwrap(),
            _ => unreachable!(),
        }
    }

    fn task() -> Task {
        Task::new(
            "t1".into(),
            "q",
            Some("42".into()),
            json!({"format": "csv"}),
            &settings(),
            SystemTime::UNIX_EPOCH,
        )
    }

    fn failure() -> TaskError {
        TaskError {
            code: ErrorCode::Failed,
            message: "exit status 1".into(),
        }
    }

    #[test]
    fn the_object_has_every_key_of_the_contract() {
        let v = serde_json::to_value(task()).unwrap();
        assert_eq!(
            v,
            json!({"id": "t1", "queue": "q", "userId": "42", "status": "queued",
                   "params": {"format": "csv"}, "progress": null, "result": null, "error": null,
                   "attempts": 0, "maxAttempts": 3, "createdAt": "1970-01-01T00:00:00.000Z",
                   "updatedAt": "1970-01-01T00:00:00.000Z", "cancelRequested": false})
        );
    }

    #[test]
    fn failures_retry_with_growing_delays_then_fail() {
        let (s, now) = (settings(), SystemTime::UNIX_EPOCH);
        let mut t = task();
        let mut delays = Vec::new();
        loop {
            t.start(now).unwrap();
            match t.fail_attempt(failure(), &s, 0.5, now).unwrap() {
                AfterFailure::RetryIn(d) => delays.push(d),
                AfterFailure::Failed => break,
            }
        }
        assert_eq!(delays, vec![Duration::from_secs(1), Duration::from_secs(2)]);
        assert_eq!((t.status, t.attempts), (Status::Failed, 3));
        assert_eq!(t.error.as_ref().unwrap().code, ErrorCode::Failed);
        assert_eq!(t.start(now), Err(StepError::Finished), "final means final");
        assert_eq!(t.cancel(now), Err(StepError::Finished));
    }

    #[test]
    fn a_job_that_kills_its_worker_every_time_is_lost_not_retried_forever() {
        let now = SystemTime::UNIX_EPOCH;
        let mut t = task();
        for _ in 0..3 {
            t.start(now).unwrap();
            t.worker_lost(now).unwrap();
        }
        assert_eq!((t.status, t.attempts), (Status::Lost, 3));
        assert_eq!(t.error.as_ref().unwrap().code, ErrorCode::WorkerLost);
    }

    #[test]
    fn cancel_queued_at_once_running_when_the_worker_stops() {
        let (s, now) = (settings(), SystemTime::UNIX_EPOCH);
        let mut queued = task();
        queued.cancel(now).unwrap();
        assert_eq!(queued.status, Status::Cancelled);
        assert!(queued.start(now).is_err(), "a cancelled task never starts");
        let mut running = task();
        running.start(now).unwrap();
        running.cancel(now).unwrap();
        assert_eq!(
            (running.status, running.cancel_requested),
            (Status::Running, true)
        );
        running.fail_attempt(failure(), &s, 0.5, now).unwrap();
        assert_eq!(running.status, Status::Cancelled);
    }

    #[test]
    fn a_stale_worker_cannot_finish_a_task_it_no_longer_holds() {
        let now = SystemTime::UNIX_EPOCH;
        let mut t = task();
        t.start(now).unwrap();
        t.worker_lost(now).unwrap();
        assert_eq!(
            t.succeed(json!(1), now),
            Err(StepError::NotRunning(Status::Queued))
        );
        t.start(now).unwrap();
        t.succeed(json!({"url": "/x"}), now).unwrap();
        assert_eq!(t.succeed(json!(2), now), Err(StepError::Finished));
        assert_eq!(t.result, Some(json!({"url": "/x"})));
    }

    #[test]
    fn limits_on_progress_and_result() {
        let now = SystemTime::UNIX_EPOCH;
        let mut t = task();
        t.start(now).unwrap();
        let big = json!({"log": "x".repeat(MAX_PROGRESS_BYTES)});
        assert!(matches!(
            t.progress(big.as_object().unwrap().clone(), now),
            Err(StepError::TooLarge("progress", _))
        ));
        t.progress(json!({"percent": 40}).as_object().unwrap().clone(), now)
            .unwrap();
        assert_eq!(t.progress.as_ref().unwrap()["percent"], 40);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 1, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(base, 3, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(base, 1, 0.0), Duration::from_millis(800));
        assert!(backoff(base, 1, 0.999) < Duration::from_millis(1200));
        assert_eq!(backoff(base, 40, 0.99), MAX_BACKOFF, "capped at 10 minutes");
    }
}
