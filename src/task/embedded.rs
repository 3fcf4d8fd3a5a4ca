//! The embedded queue: every queue of one instance in memory, for the demo and a single
//! instance (a restart loses it, as documented). The same rules as the Redis queue, from
//! [`super::model`]; what it adds is bookkeeping: idempotent enqueue per user and request id,
//! the per-user limit, who may see a task, listing, delayed retries, leases and retention.
//! Every change is published while the queue's lock is held, so `TASK_PROGRESS` leaves in the
//! order the changes happened.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::{BoxFuture, FutureExt, ready};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::QueueSettings;
use super::model::{AfterFailure, Status, StepError, Task};
use super::queue::{
    Finish, LIST_MAX, Lease, ListQuery, NewJob, Owner, Queue, QueueError, QueueStats, Renewal,
};

/// Called with every changed task, under the queue's lock: publishes its `TASK_PROGRESS`.
pub type Publish = Box<dyn Fn(&Task) + Send + Sync>;

#[derive(Default)]
struct State {
    tasks: HashMap<String, Entry>,
    /// Ready task ids per queue, oldest first.
    ready: HashMap<String, VecDeque<String>>,
    /// Delayed retries by due time.
    delayed: BTreeMap<(Instant, u64), String>,
    /// Enqueues by (queue, scope, request id), for idempotency.
    by_request: HashMap<(String, String, String), String>,
    /// Task ids per queue in enqueue order, for listing newest first.
    order: HashMap<String, Vec<String>>,
    /// Tasks finished per (queue, final status), for `/metrics`.
    finished: HashMap<(String, Status), u64>,
    next_lease: u64,
}

struct Entry {
    task: Task,
    /// Who started it (see [`super::scope`]).
    scope: String,
    settings: QueueSettings,
    lease: Option<(u64, Instant)>,
    /// When a finished task expires.
    expires: Option<Instant>,
}

/// Every queue of this instance.
#[derive(Default)]
pub struct EmbeddedQueues {
    /// `std` lock: every operation is a few map updates, never an `.await`.
    state: Mutex<State>,
    /// Publishes each change; none in unit tests.
    publish: Option<Publish>,
    /// Worker slots per queue inside this process, for `/metrics`.
    slots: HashMap<String, u64>,
    /// Woken when a job may have become ready.
    ready: Notify,
}

impl EmbeddedQueues {
    /// Queues that publish every change with `publish`; `slots` are the worker slots of
    /// each queue inside this process.
    pub fn new(publish: Publish, slots: HashMap<String, u64>) -> EmbeddedQueues {
        EmbeddedQueues {
            publish: Some(publish),
            slots,
            ..EmbeddedQueues::default()
        }
    }

    fn changed(&self, task: &Task) {
        if let Some(publish) = &self.publish {
            publish(task);
        }
    }

    /// A queue's counts.
    pub fn queue_stats(&self, queue: &str) -> QueueStats {
        let state = self.state.lock().unwrap();
        let mut stats = QueueStats {
            workers: self.slots.get(queue).copied().unwrap_or(0),
            ..QueueStats::default()
        };
        for e in state.tasks.values().filter(|e| e.task.queue == queue) {
            match e.task.status {
                Status::Queued => stats.queued += 1,
                Status::Running => stats.running += 1,
                Status::Delayed => stats.delayed += 1,
                _ => {}
            }
        }
        let finished = |s| {
            state
                .finished
                .get(&(queue.to_string(), s))
                .copied()
                .unwrap_or(0)
        };
        stats.succeeded = finished(Status::Succeeded);
        stats.failed = finished(Status::Failed);
        stats.cancelled = finished(Status::Cancelled);
        stats.lost = finished(Status::Lost);
        stats
    }

    /// Starts a job, or returns the task this scope already started with this request id.
    pub fn enqueue(&self, job: NewJob<'_>, now: SystemTime) -> Result<Task, QueueError> {
        let mut state = self.state.lock().unwrap();
        let key = (
            job.queue.to_string(),
            job.scope.to_string(),
            job.request_id.to_string(),
        );
        if let Some(task) = state
            .by_request
            .get(&key)
            .and_then(|id| state.tasks.get(id))
        {
            return Ok(task.task.clone());
        }
        let active = state
            .tasks
            .values()
            .filter(|e| {
                e.task.queue == job.queue && e.scope == job.scope && !e.task.status.is_final()
            })
            .count();
        if active >= job.settings.per_user_limit as usize {
            return Err(QueueError::LimitReached(job.settings.per_user_limit));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let task = Task::new(
            id.clone(),
            job.queue,
            job.owner.map(str::to_string),
            job.params,
            job.settings,
            now,
        );
        state.tasks.insert(
            id.clone(),
            Entry {
                task: task.clone(),
                scope: job.scope.to_string(),
                settings: job.settings.clone(),
                lease: None,
                expires: None,
            },
        );
        state.by_request.insert(key, id.clone());
        state
            .order
            .entry(job.queue.to_string())
            .or_default()
            .push(id.clone());
        state
            .ready
            .entry(job.queue.to_string())
            .or_default()
            .push_back(id);
        self.changed(&task);
        drop(state);
        self.ready.notify_waiters();
        Ok(task)
    }

    /// The task, if it is on `queue` (any when `None`) and `owner` may see it.
    pub fn get(&self, queue: Option<&str>, id: &str, owner: Owner<'_>) -> Result<Task, QueueError> {
        let state = self.state.lock().unwrap();
        visible(&state, queue, id, owner).map(|e| e.task.clone())
    }

    /// Cancels the task: queued or delayed at once, running once its worker stops.
    pub fn cancel(
        &self,
        queue: Option<&str>,
        id: &str,
        owner: Owner<'_>,
        now: SystemTime,
    ) -> Result<Task, QueueError> {
        let mut state = self.state.lock().unwrap();
        visible(&state, queue, id, owner)?;
        let entry = state.tasks.get_mut(id).expect("checked above");
        entry.task.cancel(now).map_err(|_| QueueError::Conflict)?;
        let task = entry.task.clone();
        if task.status.is_final() {
            entry.expires = Some(Instant::now() + entry.settings.retention);
            *state
                .finished
                .entry((task.queue.clone(), task.status))
                .or_default() += 1;
            if let Some(ready) = state.ready.get_mut(&task.queue) {
                ready.retain(|t| t != id);
            }
            state.delayed.retain(|_, t| t != id);
        }
        self.changed(&task);
        Ok(task)
    }

    /// The tasks of `queue` started in `scope`, newest first: at most `limit` (1–100), with
    /// a status in `statuses` (all when empty), older than `before` when given.
    pub fn list(&self, queue: &str, scope: &str, query: &ListQuery) -> Vec<Task> {
        let state = self.state.lock().unwrap();
        let Some(order) = state.order.get(queue) else {
            return Vec::new();
        };
        let start = match query
            .before
            .as_deref()
            .map(|b| order.iter().position(|id| id == b))
        {
            Some(Some(i)) => i,
            Some(None) => return Vec::new(),
            None => order.len(),
        };
        order[..start]
            .iter()
            .rev()
            .filter_map(|id| state.tasks.get(id))
            .filter(|e| e.scope == scope)
            .filter(|e| query.statuses.is_empty() || query.statuses.contains(&e.task.status))
            .take(query.limit.clamp(1, LIST_MAX))
            .map(|e| e.task.clone())
            .collect()
    }

    /// Hands the oldest ready job of `queue` (due retries first become ready) to a worker.
    pub fn take(&self, queue: &str, now: SystemTime) -> Option<Lease> {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let clock = Instant::now();
        let due: Vec<(Instant, u64)> = state
            .delayed
            .range(..=(clock, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(id) = state.delayed.remove(&key)
                && let Some(entry) = state.tasks.get(&id)
            {
                let q = entry.task.queue.clone();
                state.ready.entry(q).or_default().push_back(id);
            }
        }
        // An id whose task can no longer start (cancelled, expired) is skipped.
        while let Some(id) = state.ready.get_mut(queue)?.pop_front() {
            let Some(entry) = state.tasks.get_mut(&id) else {
                continue;
            };
            if entry.task.start(now).is_err() {
                continue;
            }
            state.next_lease += 1;
            let token = state.next_lease;
            entry.lease = Some((token, clock + entry.settings.lease));
            let lease = Lease {
                task: entry.task.clone(),
                token,
                lease: entry.settings.lease,
                timeout: entry.settings.timeout,
            };
            self.changed(&lease.task);
            return Some(lease);
        }
        None
    }

    /// When the next delayed retry is due, if any.
    fn next_due(&self) -> Option<Instant> {
        let state = self.state.lock().unwrap();
        state.delayed.keys().next().map(|(at, _)| *at)
    }

    /// Extends the lease of the worker holding `token`.
    pub fn renew(&self, id: &str, token: u64) -> Result<Renewal, QueueError> {
        let mut state = self.state.lock().unwrap();
        let entry = state.tasks.get_mut(id).ok_or(QueueError::NotFound)?;
        match entry.lease {
            Some((t, _)) if t == token => {
                entry.lease = Some((t, Instant::now() + entry.settings.lease));
                Ok(Renewal {
                    cancel_requested: entry.task.cancel_requested,
                })
            }
            _ => Err(QueueError::StaleLease),
        }
    }

    /// Progress from the worker holding `token`.
    pub fn progress(
        &self,
        id: &str,
        token: u64,
        progress: Map<String, Value>,
        now: SystemTime,
    ) -> Result<Task, QueueError> {
        self.step(id, token, |entry| {
            entry.task.progress(progress, now)?;
            Ok(None)
        })
    }

    /// The end of an attempt from the worker holding `token`: a failure is retried after a
    /// backoff (`random` in [0, 1) sets the jitter) or fails the task.
    pub fn finish(
        &self,
        id: &str,
        token: u64,
        end: Finish,
        random: f64,
        now: SystemTime,
    ) -> Result<Task, QueueError> {
        self.step(id, token, |entry| match end {
            Finish::Succeeded(result) => {
                entry.task.succeed(result, now)?;
                Ok(None)
            }
            Finish::HandBack => {
                entry.task.hand_back(now)?;
                Ok((entry.task.status == Status::Queued).then_some(Duration::ZERO))
            }
            Finish::Failed(error) => {
                match entry
                    .task
                    .fail_attempt(error, &entry.settings, random, now)?
                {
                    AfterFailure::RetryIn(delay) => Ok(Some(delay)),
                    AfterFailure::Failed => Ok(None),
                }
            }
        })
    }

    /// Leases that lapsed (their worker died): each task's next attempt is queued at once, or
    /// it is lost after `maxAttempts` deliveries. Finished tasks past their retention go.
    /// Returns how many tasks changed.
    pub fn reap(&self, now: SystemTime) -> usize {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let clock = Instant::now();
        let mut changed = 0;
        for entry in state.tasks.values_mut() {
            if entry.task.status != Status::Running
                || entry.lease.is_none_or(|(_, until)| until > clock)
            {
                continue;
            }
            entry.lease = None;
            if entry.task.worker_lost(now).is_ok() {
                if entry.task.status == Status::Queued {
                    state
                        .ready
                        .entry(entry.task.queue.clone())
                        .or_default()
                        .push_back(entry.task.id.clone());
                } else {
                    entry.expires = Some(clock + entry.settings.retention);
                    *state
                        .finished
                        .entry((entry.task.queue.clone(), entry.task.status))
                        .or_default() += 1;
                }
                changed += 1;
                if let Some(publish) = &self.publish {
                    publish(&entry.task);
                }
            }
        }
        // Finished tasks past their retention go, with their idempotency keys.
        let expired: Vec<String> = state
            .tasks
            .iter()
            .filter(|(_, e)| e.expires.is_some_and(|at| at <= clock))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(entry) = state.tasks.remove(id)
                && let Some(order) = state.order.get_mut(&entry.task.queue)
            {
                order.retain(|t| t != id);
            }
        }
        if !expired.is_empty() {
            let expired: std::collections::HashSet<&String> = expired.iter().collect();
            state.by_request.retain(|_, id| !expired.contains(id));
        }
        drop(guard);
        if changed > 0 {
            self.ready.notify_waiters();
        }
        changed
    }

    /// Applies a worker's report if `token` is the task's current lease; `Some(delay)` from
    /// `apply` queues the job again after that delay.
    fn step(
        &self,
        id: &str,
        token: u64,
        apply: impl FnOnce(&mut Entry) -> Result<Option<Duration>, StepError>,
    ) -> Result<Task, QueueError> {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let entry = state.tasks.get_mut(id).ok_or(QueueError::NotFound)?;
        if entry.lease.map(|(t, _)| t) != Some(token) {
            return Err(QueueError::StaleLease);
        }
        let retry = apply(entry)?;
        let clock = Instant::now();
        if entry.task.status != Status::Running {
            entry.lease = None;
        }
        let task = entry.task.clone();
        if task.status.is_final() {
            entry.expires = Some(clock + entry.settings.retention);
            *state
                .finished
                .entry((task.queue.clone(), task.status))
                .or_default() += 1;
        }
        if let Some(delay) = retry {
            if delay.is_zero() {
                let q = task.queue.clone();
                state.ready.entry(q).or_default().push_back(id.to_string());
            } else {
                state.next_lease += 1;
                let key = (clock + delay, state.next_lease);
                state.delayed.insert(key, id.to_string());
            }
        }
        self.changed(&task);
        drop(guard);
        if retry.is_some() {
            self.ready.notify_waiters();
        }
        Ok(task)
    }

    /// Waits up to `wait` for a job of `queue`.
    async fn take_waiting(&self, queue: &str, wait: Duration) -> Option<Lease> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so a job queued in between still wakes this waiter.
            notified.as_mut().enable();
            if let Some(lease) = self.take(queue, SystemTime::now()) {
                return Some(lease);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            let wake = self
                .next_due()
                .map(|due| tokio::time::Instant::from_std(due).max(now))
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

impl Queue for EmbeddedQueues {
    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, QueueError>> {
        ready(Ok(self.queue_stats(queue))).boxed()
    }

    fn enqueue<'a>(&'a self, job: NewJob<'a>) -> BoxFuture<'a, Result<Task, QueueError>> {
        ready(EmbeddedQueues::enqueue(self, job, SystemTime::now())).boxed()
    }

    fn get<'a>(
        &'a self,
        queue: Option<&'a str>,
        id: &'a str,
        owner: Owner<'a>,
    ) -> BoxFuture<'a, Result<Task, QueueError>> {
        ready(EmbeddedQueues::get(self, queue, id, owner)).boxed()
    }

    fn cancel<'a>(
        &'a self,
        queue: Option<&'a str>,
        id: &'a str,
        owner: Owner<'a>,
    ) -> BoxFuture<'a, Result<Task, QueueError>> {
        ready(EmbeddedQueues::cancel(
            self,
            queue,
            id,
            owner,
            SystemTime::now(),
        ))
        .boxed()
    }

    fn list<'a>(
        &'a self,
        queue: &'a str,
        scope: &'a str,
        query: &'a ListQuery,
    ) -> BoxFuture<'a, Result<Vec<Task>, QueueError>> {
        ready(Ok(EmbeddedQueues::list(self, queue, scope, query))).boxed()
    }

    fn take<'a>(
        &'a self,
        queue: &'a str,
        _worker: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, QueueError>> {
        async move { Ok(self.take_waiting(queue, wait).await) }.boxed()
    }

    fn renew<'a>(&'a self, id: &'a str, token: u64) -> BoxFuture<'a, Result<Renewal, QueueError>> {
        ready(EmbeddedQueues::renew(self, id, token)).boxed()
    }

    fn progress<'a>(
        &'a self,
        id: &'a str,
        token: u64,
        progress: Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        ready(EmbeddedQueues::progress(self, id, token, progress, SystemTime::now()).map(|_| ()))
            .boxed()
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        token: u64,
        end: Finish,
    ) -> BoxFuture<'a, Result<Task, QueueError>> {
        let random = rand_unit();
        ready(EmbeddedQueues::finish(
            self,
            id,
            token,
            end,
            random,
            SystemTime::now(),
        ))
        .boxed()
    }
}

/// A number in [0, 1) for retry jitter.
pub fn rand_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 80) as f64 / (1u64 << 48) as f64
}

/// The task, if `owner` may see it: a user's own tasks, or any anonymous task for an
/// anonymous owner.
fn visible<'a>(
    state: &'a State,
    queue: Option<&str>,
    id: &str,
    owner: Owner<'_>,
) -> Result<&'a Entry, QueueError> {
    state
        .tasks
        .get(id)
        .filter(|e| e.task.user_id.as_deref() == owner)
        .filter(|e| queue.is_none_or(|q| e.task.queue == q))
        .ok_or(QueueError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::model::{ErrorCode, TaskError};
    use serde_json::json;

    fn settings(patch: Value) -> QueueSettings {
        let mut spec = json!({"queue": "q", "leaseMs": 1000, "backoffMs": 0});
        spec.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        match crate::task::parse(&spec).unwrap() {
            crate::registry::Handler::Task(t) => t.settings.unwrap(),
            _ => unreachable!(),
        }
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    fn job<'a>(
        queue: &'a str,
        settings: &'a QueueSettings,
        owner: Owner<'a>,
        request_id: &'a str,
        params: Value,
    ) -> NewJob<'a> {
        NewJob {
            queue,
            settings,
            owner,
            scope: match owner {
                Some(u) => format!("u:{u}").leak(),
                None => "c:test",
            },
            request_id,
            params,
        }
    }

    fn query(statuses: &[Status], limit: usize, before: Option<&String>) -> ListQuery {
        ListQuery {
            statuses: statuses.to_vec(),
            limit,
            before: before.cloned(),
        }
    }

    #[test]
    fn enqueue_is_idempotent_per_owner_and_request_id() {
        let q = EmbeddedQueues::default();
        let s = settings(json!({}));
        let a = q
            .enqueue(job("q", &s, Some("7"), "r1", json!({})), NOW)
            .unwrap();
        let again = q
            .enqueue(job("q", &s, Some("7"), "r1", json!({})), NOW)
            .unwrap();
        assert_eq!(a.id, again.id, "same user, same request id: same task");
        let other = q
            .enqueue(job("q", &s, Some("8"), "r1", json!({})), NOW)
            .unwrap();
        assert_ne!(a.id, other.id, "another user: another task");
        let anon = q.enqueue(job("q", &s, None, "r1", json!({})), NOW).unwrap();
        assert_ne!(anon.id, a.id);
    }

    #[test]
    fn users_see_only_their_own_tasks() {
        let q = EmbeddedQueues::default();
        let s = settings(json!({}));
        let t = q
            .enqueue(job("q", &s, Some("7"), "r", json!({})), NOW)
            .unwrap();
        assert!(q.get(Some("q"), &t.id, Some("7")).is_ok());
        assert_eq!(
            q.get(Some("q"), &t.id, Some("8")),
            Err(QueueError::NotFound)
        );
        assert_eq!(q.get(Some("q"), &t.id, None), Err(QueueError::NotFound));
        assert_eq!(
            q.cancel(Some("q"), &t.id, Some("8"), NOW),
            Err(QueueError::NotFound)
        );
        assert_eq!(
            q.get(Some("q"), "nope", Some("7")),
            Err(QueueError::NotFound)
        );
        let anon = q.enqueue(job("q", &s, None, "r", json!({})), NOW).unwrap();
        assert!(
            q.get(Some("q"), &anon.id, None).is_ok(),
            "any anonymous connection that knows the id"
        );
        assert_eq!(
            q.get(Some("other"), &anon.id, None),
            Err(QueueError::NotFound),
            "an action of another queue does not find it"
        );
        assert!(q.get(None, &anon.id, None).is_ok());
    }

    #[test]
    fn the_per_user_limit_counts_active_tasks() {
        let q = EmbeddedQueues::default();
        let s = settings(json!({"perUserLimit": 2}));
        let first = q
            .enqueue(job("q", &s, Some("7"), "a", json!({})), NOW)
            .unwrap();
        q.enqueue(job("q", &s, Some("7"), "b", json!({})), NOW)
            .unwrap();
        assert_eq!(
            q.enqueue(job("q", &s, Some("7"), "c", json!({})), NOW),
            Err(QueueError::LimitReached(2))
        );
        q.cancel(Some("q"), &first.id, Some("7"), NOW).unwrap();
        assert!(
            q.enqueue(job("q", &s, Some("7"), "c", json!({})), NOW)
                .is_ok()
        );
    }

    #[test]
    fn workers_run_jobs_and_stale_leases_are_refused() {
        let q = EmbeddedQueues::default();
        let s = settings(json!({}));
        let t = q
            .enqueue(job("q", &s, Some("7"), "r", json!({"n": 1})), NOW)
            .unwrap();
        let lease = q.take("q", NOW).unwrap();
        assert_eq!(
            (lease.task.id.as_str(), lease.task.status),
            (t.id.as_str(), Status::Running)
        );
        assert!(q.take("q", NOW).is_none(), "nothing else is ready");
        let progress = json!({"percent": 50}).as_object().unwrap().clone();
        q.progress(&t.id, lease.token, progress, NOW).unwrap();
        assert_eq!(
            q.finish(
                &t.id,
                lease.token + 1,
                Finish::Succeeded(json!(1)),
                0.0,
                NOW
            ),
            Err(QueueError::StaleLease)
        );
        let done = q
            .finish(
                &t.id,
                lease.token,
                Finish::Succeeded(json!({"ok": true})),
                0.0,
                NOW,
            )
            .unwrap();
        assert_eq!((done.status, done.attempts), (Status::Succeeded, 1));
        assert_eq!(
            q.cancel(Some("q"), &t.id, Some("7"), NOW),
            Err(QueueError::Conflict)
        );
    }

    #[test]
    fn failures_are_retried_then_fail_and_lapsed_leases_are_reaped() {
        let q = EmbeddedQueues::default();
        let s = settings(json!({"maxAttempts": 2}));
        let t = q.enqueue(job("q", &s, None, "r", json!({})), NOW).unwrap();
        let error = || TaskError {
            code: ErrorCode::Failed,
            message: "exit 1".into(),
        };
        let lease = q.take("q", NOW).unwrap();
        let after = q
            .finish(&t.id, lease.token, Finish::Failed(error()), 0.5, NOW)
            .unwrap();
        assert_eq!(after.status, Status::Delayed);
        let lease = q.take("q", NOW).expect("a zero backoff is due at once");
        let after = q
            .finish(&t.id, lease.token, Finish::Failed(error()), 0.5, NOW)
            .unwrap();
        assert_eq!((after.status, after.attempts), (Status::Failed, 2));

        // A worker that dies holding its job: the lease lapses and the job is queued again.
        let s = settings(json!({"maxAttempts": 2, "leaseMs": 1000}));
        let t = q.enqueue(job("q", &s, None, "r2", json!({})), NOW).unwrap();
        let first = q.take("q", NOW).unwrap();
        std::thread::sleep(Duration::from_millis(1050));
        assert_eq!(q.reap(NOW), 1);
        assert_eq!(
            q.get(Some("q"), &t.id, None).unwrap().status,
            Status::Queued
        );
        assert_eq!(
            q.finish(&t.id, first.token, Finish::Succeeded(json!(1)), 0.0, NOW),
            Err(QueueError::StaleLease),
            "the late finish of the dead worker's lease is refused"
        );
        let second = q.take("q", NOW).unwrap();
        assert_eq!(second.task.attempts, 2);
    }

    #[test]
    fn list_is_newest_first_filtered_and_paged() {
        let q = EmbeddedQueues::default();
        let s = settings(json!({}));
        let ids: Vec<String> = (0..5)
            .map(|i| {
                q.enqueue(job("q", &s, Some("7"), &i.to_string(), json!({})), NOW)
                    .unwrap()
                    .id
            })
            .collect();
        q.enqueue(job("q", &s, Some("8"), "x", json!({})), NOW)
            .unwrap();
        q.cancel(Some("q"), &ids[1], Some("7"), NOW).unwrap();
        let all = q.list("q", "u:7", &query(&[], 20, None));
        assert_eq!(
            all.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ids.iter().rev().map(String::as_str).collect::<Vec<_>>()
        );
        let page = q.list("q", "u:7", &query(&[], 2, Some(&ids[3])));
        assert_eq!(
            page.iter().map(|t| &t.id).collect::<Vec<_>>(),
            vec![&ids[2], &ids[1]]
        );
        let cancelled = q.list("q", "u:7", &query(&[Status::Cancelled], 20, None));
        assert_eq!(cancelled.len(), 1);
        assert!(q.list("other", "u:7", &query(&[], 20, None)).is_empty());
    }
}
