//! The seam between the task manager and where its queues live, as [`crate::bus::Bus`] is for
//! pushes: the embedded backend ([`super::Embedded`], one process, in memory) and the Redis
//! backend implement the same operations, so the dispatcher and the workers cannot tell them
//! apart. Every change a backend makes to a task is published by the backend itself as
//! `TASK_PROGRESS` to `task:<id>` and `user:<userId>`, in the order the changes happened.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

use super::model::{Status, StepError, Task, TaskError};
use super::{QueueSettings, TaskAction};
use crate::error::{ActionError, Code};

/// Most tasks `list` returns.
pub const LIST_MAX: usize = 100;
/// `list`'s default page size.
pub const LIST_DEFAULT: usize = 20;

/// Who asks: a user, or an anonymous connection (whose tasks any anonymous connection that
/// knows the id may read or cancel).
pub type Owner<'a> = Option<&'a str>;

/// What enqueues are idempotent in, what `list` shows and what `perUserLimit` counts: a
/// user (`u:<id>`), or for an anonymous connection the connection itself (`c:<connectionId>`),
/// so anonymous connections never see each other's tasks in a list nor share request ids.
pub fn scope(owner: Owner<'_>, connection_id: &str) -> String {
    match owner {
        Some(user) => format!("u:{user}"),
        None => format!("c:{connection_id}"),
    }
}

/// Why a queue operation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// No such task, or not this user's (the two are not told apart): `not_found`.
    #[error("no such task")]
    NotFound,
    /// The task has finished: `conflict`.
    #[error("the task has already finished")]
    Conflict,
    /// The user has `perUserLimit` active tasks: `limit_reached`.
    #[error("at most {0} active tasks per user on this queue")]
    LimitReached(u32),
    /// The worker's lease is not the task's current one (it was re-run elsewhere).
    #[error("this worker no longer holds the task")]
    StaleLease,
    /// A step the task's state does not allow.
    #[error(transparent)]
    Step(#[from] StepError),
    /// A worker's report the queue refused (a progress that is not an object, a result too
    /// large).
    #[error("refused: {0}")]
    Invalid(String),
    /// The backend cannot be reached (Redis is down): `upstream_unavailable`.
    #[error("the task queue is unavailable: {0}")]
    Unavailable(String),
}

impl QueueError {
    /// The failure a client sees for this refusal.
    pub fn to_action_error(&self) -> ActionError {
        let code = match self {
            QueueError::NotFound => Code::NotFound,
            QueueError::Conflict => Code::Conflict,
            QueueError::LimitReached(_) => Code::LimitReached,
            QueueError::Unavailable(_) => Code::UpstreamUnavailable,
            // Worker-side refusals never answer a client request.
            QueueError::StaleLease | QueueError::Step(_) | QueueError::Invalid(_) => {
                return ActionError::internal(self);
            }
        };
        ActionError::new(code, self.to_string())
    }
}

/// A job to start.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// The queue and its settings.
    pub queue: &'a str,
    /// The queue's settings.
    pub settings: &'a QueueSettings,
    /// Who starts it.
    pub owner: Owner<'a>,
    /// Its [`scope`]: one task per (queue, scope, request id).
    pub scope: &'a str,
    /// The request id.
    pub request_id: &'a str,
    /// The enqueue payload.
    pub params: Value,
}

/// What `list` asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListQuery {
    /// Only these statuses (all when empty).
    pub statuses: Vec<Status>,
    /// Page size, 1–[`LIST_MAX`].
    pub limit: usize,
    /// Only tasks enqueued before this one.
    pub before: Option<String>,
}

/// A job handed to a worker: the task and the lease that fences its reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The task as it is now (running).
    pub task: Task,
    /// Fences every report: only the holder of the current lease may report.
    pub token: u64,
    /// How long the lease lasts unless renewed.
    pub lease: Duration,
    /// How long one attempt may run.
    pub timeout: Duration,
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// It succeeded with this result.
    Succeeded(Value),
    /// It failed (or timed out, or wrote too much): retried while attempts remain. After a
    /// cancel was asked, the task is cancelled instead.
    Failed(TaskError),
    /// The worker is shutting down: the job goes back to the queue, the attempt not counted.
    HandBack,
}

/// A queue's counts, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs waiting for a worker.
    pub queued: u64,
    /// Tasks held by a worker.
    pub running: u64,
    /// Tasks waiting for a retry.
    pub delayed: u64,
    /// Workers (consumers in the Redis group; worker slots inside this process, embedded).
    pub workers: u64,
    /// Tasks that ended so, since the queue began.
    pub succeeded: u64,
    /// Tasks that failed for good.
    pub failed: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks lost (their workers kept dying).
    pub lost: u64,
}

/// What a lease renewal learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// The client asked to cancel: stop the job and report it failed.
    pub cancel_requested: bool,
}

/// Where tasks live. The client side (`enqueue`, `get`, `cancel`, `list`) serves `task`
/// actions; the worker side (`take`, `renew`, `progress`, `finish`) serves workers, each step
/// fenced by the lease token.
pub trait Queue: Send + Sync + 'static {
    /// Starts a job, or returns the task this owner already started with this request id.
    fn enqueue<'a>(&'a self, job: NewJob<'a>) -> BoxFuture<'a, Result<Task, QueueError>>;

    /// The task, if it is on `queue` (any queue when `None`) and `owner` may see it.
    fn get<'a>(
        &'a self,
        queue: Option<&'a str>,
        id: &'a str,
        owner: Owner<'a>,
    ) -> BoxFuture<'a, Result<Task, QueueError>>;

    /// Cancels it (as `get` finds it): a queued or delayed task at once, a running one once
    /// its worker stops.
    fn cancel<'a>(
        &'a self,
        queue: Option<&'a str>,
        id: &'a str,
        owner: Owner<'a>,
    ) -> BoxFuture<'a, Result<Task, QueueError>>;

    /// The tasks of `queue` started in `scope`, newest first.
    fn list<'a>(
        &'a self,
        queue: &'a str,
        scope: &'a str,
        query: &'a ListQuery,
    ) -> BoxFuture<'a, Result<Vec<Task>, QueueError>>;

    /// The oldest ready job of `queue` for `worker`, waiting up to `wait` for one.
    fn take<'a>(
        &'a self,
        queue: &'a str,
        worker: &'a str,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>, QueueError>>;

    /// Extends the lease by its length.
    fn renew<'a>(&'a self, id: &'a str, token: u64) -> BoxFuture<'a, Result<Renewal, QueueError>>;

    /// Progress from the lease holder.
    fn progress<'a>(
        &'a self,
        id: &'a str,
        token: u64,
        progress: Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), QueueError>>;

    /// The queue's counts, for `/metrics`.
    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, QueueError>>;

    /// Worker `worker` of `queue` stops for good: what the backend kept for it goes.
    fn retire<'a>(&'a self, _queue: &'a str, _worker: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }

    /// The end of the attempt, from the lease holder.
    fn finish<'a>(
        &'a self,
        id: &'a str,
        token: u64,
        end: Finish,
    ) -> BoxFuture<'a, Result<Task, QueueError>>;
}

/// Reads the request payload of a `get` or `cancel`: `{"id"}`.
pub fn task_id(payload: &Value) -> Result<&str, ActionError> {
    payload
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 64)
        .ok_or_else(|| {
            ActionError::new(
                Code::InvalidPayload,
                "payload.id must be a task id (a string of 1-64 bytes)",
            )
        })
}

/// Reads the request payload of a `list`:
/// `{"status"?: <status or list>, "limit"?: 1–100, "before"?: <id>}`.
pub fn list_query(payload: &Value) -> Result<ListQuery, ActionError> {
    let invalid = |m: &str| ActionError::new(Code::InvalidPayload, m.to_string());
    let object = match payload {
        Value::Object(o) => o,
        _ => return Err(invalid("the payload of a list must be an object")),
    };
    if let Some(key) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "status" | "limit" | "before"))
    {
        return Err(invalid(&format!(
            "unknown key `{}`: a list takes status, limit and before",
            crate::error::clip(key)
        )));
    }
    let status = |v: &Value| {
        serde_json::from_value::<Status>(v.clone()).map_err(|_| {
            invalid("payload.status must be one of queued, delayed, running, succeeded, failed, cancelled, lost, or a list of them")
        })
    };
    let statuses = match object.get("status") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().map(status).collect::<Result<_, _>>()?,
        Some(one) => vec![status(one)?],
    };
    let limit = match object.get("limit") {
        None | Some(Value::Null) => LIST_DEFAULT,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=LIST_MAX as u64).contains(n))
            .ok_or_else(|| invalid("payload.limit must be an integer from 1 to 100"))?
            as usize,
    };
    let before = match object.get("before") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 64 => Some(id.clone()),
        Some(_) => return Err(invalid("payload.before must be a task id")),
    };
    Ok(ListQuery {
        statuses,
        limit,
        before,
    })
}

/// Runs one `task` action against `queue` for `owner` on connection `connection_id`; the
/// success payload as JSON.
pub async fn run(
    queue: &dyn Queue,
    action: &TaskAction,
    owner: Owner<'_>,
    connection_id: &str,
    request_id: &str,
    payload: &Value,
) -> Result<Value, ActionError> {
    let scope = scope(owner, connection_id);
    use super::Op;
    let task = |t: Task| serde_json::to_value(t).expect("tasks serialize");
    let name = action.queue.as_str();
    let result = match action.op {
        Op::Enqueue => {
            let settings = action
                .settings
                .as_ref()
                .ok_or_else(|| ActionError::internal("an enqueue action without settings"))?;
            // An absent payload is `{}`, as for every action.
            let params = if payload.is_null() {
                Value::Object(Map::new())
            } else {
                payload.clone()
            };
            queue
                .enqueue(NewJob {
                    queue: name,
                    settings,
                    owner,
                    scope: &scope,
                    request_id,
                    params,
                })
                .await
                .map(task)
        }
        Op::Get => queue
            .get(Some(name), task_id(payload)?, owner)
            .await
            .map(task),
        Op::Cancel => queue
            .cancel(Some(name), task_id(payload)?, owner)
            .await
            .map(task),
        Op::List => {
            let query = list_query(payload)?;
            queue
                .list(name, &scope, &query)
                .await
                .map(|tasks| serde_json::json!({ "tasks": tasks }))
        }
    };
    result.map_err(|e| e.to_action_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_queries_are_read_strictly() {
        let q = list_query(&json!({})).unwrap();
        assert_eq!(
            (q.limit, q.statuses.len(), q.before),
            (LIST_DEFAULT, 0, None)
        );
        let q = list_query(&json!({"status": "running", "limit": 5, "before": "x"})).unwrap();
        assert_eq!(q.statuses, vec![Status::Running]);
        assert_eq!((q.limit, q.before.as_deref()), (5, Some("x")));
        let q = list_query(&json!({"status": ["queued", "delayed"]})).unwrap();
        assert_eq!(q.statuses, vec![Status::Queued, Status::Delayed]);
        for bad in [
            json!({"status": "done"}),
            json!({"limit": 0}),
            json!({"limit": 101}),
            json!({"limit": "5"}),
            json!({"before": 3}),
            json!({"sort": "asc"}),
            json!([1]),
        ] {
            let e = list_query(&bad).unwrap_err();
            assert_eq!(e.code, Code::InvalidPayload, "{bad}");
        }
    }

    #[test]
    fn ids_are_strings() {
        assert_eq!(task_id(&json!({"id": "a"})).unwrap(), "a");
        for bad in [json!({}), json!({"id": 3}), json!({"id": ""}), json!(null)] {
            assert_eq!(task_id(&bad).unwrap_err().code, Code::InvalidPayload);
        }
    }

    #[test]
    fn refusals_map_to_client_codes() {
        assert_eq!(QueueError::NotFound.to_action_error().code, Code::NotFound);
        assert_eq!(QueueError::Conflict.to_action_error().code, Code::Conflict);
        assert_eq!(
            QueueError::LimitReached(5).to_action_error().code,
            Code::LimitReached
        );
        assert_eq!(
            QueueError::Unavailable("down".into())
                .to_action_error()
                .code,
            Code::UpstreamUnavailable
        );
    }
}
