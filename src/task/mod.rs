//! The task manager's manifest kind: `task` actions that enqueue, read, cancel or list jobs of
//! a named queue, and the settings of each queue.
//!
//! This version reads and validates `task` actions (every load error names the file and the
//! action, as for `http`); the queue that runs them is not built yet, so an instance whose
//! manifests contain one refuses to start with a message saying so, rather than loading
//! actions that could only fail.

mod spec;

pub use spec::{CommandSpec, Op, QueueSettings, TaskAction, check_queues, parse};
