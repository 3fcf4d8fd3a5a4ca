//! The task manager: the `task` manifest kind (actions that enqueue, read, cancel or list
//! jobs of a named queue, and each queue's settings) and the task model (the task object, its
//! statuses and the rules of each step, which every queue backend applies).
//!
//! This version reads and validates `task` actions (every load error names the file and the
//! action, as for `http`); the queue that runs them is not built yet, so an instance whose
//! manifests contain one refuses to start with a message saying so, rather than loading
//! actions that could only fail.

mod embedded;
mod model;
pub mod runner;
mod spec;

pub use embedded::{EmbeddedQueues, LIST_DEFAULT, LIST_MAX, Lease, QueueError};
pub use model::{AfterFailure, ErrorCode, Status, StepError, Task, TaskError, backoff, timestamp};
pub use spec::{CommandSpec, Op, QueueSettings, TaskAction, check_queues, parse};
