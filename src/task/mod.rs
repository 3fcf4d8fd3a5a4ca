//! The task manager (contract section 7): `task` actions that enqueue, read, cancel or list
//! jobs of a named queue; the task model (the task object, its statuses and the rules of each
//! step, which every queue backend applies); the [`Queue`] seam and its embedded backend; the
//! job runner and the worker that drives it.

mod embedded;
mod model;
mod queue;
pub mod redis;
pub mod runner;
pub(crate) mod spec;
pub mod watchdog;
pub mod worker;

use serde_json::{Map, Value, json};

pub use embedded::{EmbeddedQueues, Publish, rand_unit};
pub use model::{AfterFailure, ErrorCode, Status, StepError, Task, TaskError, backoff, timestamp};
pub use queue::{
    Finish, LIST_DEFAULT, LIST_MAX, Lease, ListQuery, NewJob, Owner, Queue, QueueError, QueueStats,
    Renewal, list_query, run, scope, task_id,
};
pub use redis::RedisQueue;
pub use spec::{CommandSpec, Op, QueueSettings, TaskAction, check_queues, parse};

/// The room of a task's `TASK_PROGRESS`.
pub fn task_room(id: &str) -> String {
    format!("task:{id}")
}

/// The rooms a change of `task` goes to: `task:<id>`, and `user:<userId>` for a user's task.
pub fn progress_rooms(task: &Task) -> Vec<String> {
    let mut rooms = vec![task_room(&task.id)];
    if let Some(user) = &task.user_id {
        rooms.push(format!("user:{user}"));
    }
    rooms
}

/// `{"type":"TASK_PROGRESS","payload":<task>}`: what every change of a task publishes.
pub fn progress_action(task: &Task) -> Map<String, Value> {
    Map::from_iter([
        ("type".to_string(), json!("TASK_PROGRESS")),
        (
            "payload".to_string(),
            serde_json::to_value(task).expect("tasks serialize"),
        ),
    ])
}
