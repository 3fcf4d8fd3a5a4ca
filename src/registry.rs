//! The typed action registry: `actions/*.json` manifests turned into [`ActionSpec`]s once at
//! start-up (contract section 3). Every error names the file and the action, and stops start-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::template::Template;

/// Upstream timeout when a manifest sets no `timeoutMs`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// Largest accepted `timeoutMs` (one hour): anything longer is surely a typo.
const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// The handler kinds: the key naming each in a spec, and how its value becomes a [`Handler`].
/// The one list of kinds: a new kind is a row here, a [`Handler`] variant, and a file in
/// [`crate::dispatch`], which matches the variants in one place.
const HANDLER_KINDS: [(&str, ParseKind); 2] = [("http", parse_http), ("task", crate::task::parse)];

/// Turns a handler kind's spec value into a [`Handler`].
type ParseKind = fn(&Value) -> Result<Handler, String>;
/// Spec keys besides the handler.
const SPEC_KEYS: [&str; 6] = [
    "description",
    "payload",
    "response",
    "timeoutMs",
    "subscribe",
    "client",
];

/// A manifest that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), action.as_ref().map(|a| format!(": action {a}")).unwrap_or_default())]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// The action, when the error is about one.
    pub action: Option<String>,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    method: String,
    path: String,
}

/// HTTP methods an `http` action may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET: payload goes in the query string.
    Get,
    /// POST: payload is the JSON body.
    Post,
    /// PUT: payload is the JSON body.
    Put,
    /// PATCH: payload is the JSON body.
    Patch,
    /// DELETE: payload goes in the query string.
    Delete,
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }

    /// Whether the payload travels in the query string rather than the body.
    pub fn uses_query(self) -> bool {
        matches!(self, Method::Get | Method::Delete)
    }

    /// The method as the HTTP client wants it.
    pub fn as_http(self) -> hyper::Method {
        match self {
            Method::Get => hyper::Method::GET,
            Method::Post => hyper::Method::POST,
            Method::Put => hyper::Method::PUT,
            Method::Patch => hyper::Method::PATCH,
            Method::Delete => hyper::Method::DELETE,
        }
    }
}

/// A REST call on the user's behalf.
#[derive(Debug, Clone)]
pub struct HttpAction {
    /// The method.
    pub method: Method,
    /// The path template, appended to `PATCHBAY_API_URL`.
    pub path: Template,
}

/// What runs an action.
#[derive(Debug, Clone)]
pub enum Handler {
    /// Call the REST API.
    Http(HttpAction),
    /// Enqueue, read, cancel or list jobs of a queue.
    Task(crate::task::TaskAction),
}

/// One action, ready to dispatch.
#[derive(Debug)]
pub struct ActionSpec {
    /// The action name (`TASKS_FETCH`).
    pub name: String,
    /// What runs it.
    pub handler: Handler,
    /// The payload schema, compiled once.
    pub schema: Option<jsonschema::Validator>,
    /// Upstream timeout.
    pub timeout: Duration,
    /// Room to join on success, filled from the success payload.
    pub subscribe: Option<Template>,
}

/// All actions of this instance.
#[derive(Debug, Default)]
pub struct Registry {
    actions: HashMap<String, Arc<ActionSpec>>,
    /// The manifests as written, merged into one object and serialized once for `GET /actions`.
    manifest_json: Bytes,
}

impl Registry {
    /// Loads every `*.json` file of `dir` (sorted by name; other files are ignored).
    pub fn load_dir(dir: &Path) -> Result<Registry, ManifestError> {
        let dir_err = |message: String| ManifestError {
            file: dir.to_path_buf(),
            action: None,
            message,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| dir_err(format!("cannot read the actions directory: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
            .collect();
        files.sort();
        let mut sources = Vec::with_capacity(files.len());
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| ManifestError {
                file: file.clone(),
                action: None,
                message: format!("cannot read: {e}"),
            })?;
            sources.push((file, text));
        }
        Self::from_sources(sources.iter().map(|(f, t)| (f.as_path(), t.as_str())))
    }

    /// Builds a registry from `(file name, JSON text)` pairs.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Registry, ManifestError> {
        let mut actions = HashMap::new();
        let mut origin: HashMap<String, PathBuf> = HashMap::new();
        let mut merged = Map::new();
        for (file, text) in sources {
            let err = |action: Option<&str>, message: String| ManifestError {
                file: file.to_path_buf(),
                action: action.map(str::to_string),
                message,
            };
            let value: Value = serde_json::from_str(text)
                .map_err(|e| err(None, format!("not valid JSON: {e}")))?;
            let Value::Object(specs) = value else {
                return Err(err(
                    None,
                    "a manifest must be a JSON object mapping action names to specs".into(),
                ));
            };
            for (name, spec) in specs {
                if let Some(first) = origin.get(&name) {
                    return Err(err(
                        Some(&name),
                        format!(
                            "duplicate action name, already defined in {}",
                            first.display()
                        ),
                    ));
                }
                let parsed = parse_spec(&name, &spec).map_err(|m| err(Some(&name), m))?;
                origin.insert(name.clone(), file.to_path_buf());
                actions.insert(name.clone(), Arc::new(parsed));
                merged.insert(name, spec);
            }
        }
        let tasks = actions
            .iter()
            .filter_map(|(name, spec): (&String, &Arc<ActionSpec>)| {
                let Handler::Task(task) = &spec.handler else {
                    return None;
                };
                let file = origin
                    .get(name)
                    .and_then(|f| f.to_str())
                    .unwrap_or_default();
                Some((file, name.as_str(), task))
            });
        crate::task::check_queues(tasks).map_err(|(file, action, message)| ManifestError {
            file: PathBuf::from(file),
            action: Some(action),
            message,
        })?;
        let manifest_json =
            Bytes::from(serde_json::to_vec(&merged).expect("JSON values always serialize"));
        Ok(Registry {
            actions,
            manifest_json,
        })
    }

    /// The action called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<ActionSpec>> {
        self.actions.get(name)
    }

    /// Number of actions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Whether there are no actions.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Whether some action calls the REST API (and so needs `PATCHBAY_API_URL`).
    pub fn needs_api_url(&self) -> bool {
        self.actions
            .values()
            .any(|a| matches!(a.handler, Handler::Http(_)))
    }

    /// Every queue some `enqueue` action starts jobs on, sorted.
    pub fn task_queues(&self) -> Vec<&str> {
        let mut queues: Vec<&str> = self
            .actions
            .values()
            .filter_map(|a| match &a.handler {
                Handler::Task(t) if t.settings.is_some() => Some(t.queue.as_str()),
                _ => None,
            })
            .collect();
        queues.sort_unstable();
        queues
    }

    /// Each queue whose enqueue action has a `command`, with that command.
    pub fn task_commands(&self) -> Vec<(&str, &crate::task::CommandSpec)> {
        let mut commands: Vec<_> = self
            .actions
            .values()
            .filter_map(|a| match &a.handler {
                Handler::Task(t) => t
                    .settings
                    .as_ref()
                    .and_then(|s| s.command.as_ref())
                    .map(|c| (t.queue.as_str(), c)),
                Handler::Http(_) => None,
            })
            .collect();
        commands.sort_by_key(|(q, _)| *q);
        commands
    }

    /// The first `task` action by name, if any.
    pub fn first_task_action(&self) -> Option<&str> {
        let mut names: Vec<&str> = self
            .actions
            .values()
            .filter(|a| matches!(a.handler, Handler::Task(_)))
            .map(|a| a.name.as_str())
            .collect();
        names.sort_unstable();
        names.first().copied()
    }

    /// The manifests as written, merged into one JSON object.
    pub fn manifest_json(&self) -> &Bytes {
        &self.manifest_json
    }
}

/// Whether `name` is an action name: `[A-Z][A-Z0-9_]*`.
fn valid_action_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn parse_spec(name: &str, spec: &Value) -> Result<ActionSpec, String> {
    if !valid_action_name(name) {
        return Err("action names must match [A-Z][A-Z0-9_]*".into());
    }
    if name.len() + crate::protocol::REQUEST_SUFFIX.len() > crate::protocol::MAX_TYPE_BYTES {
        return Err(format!(
            "action name is too long: `{name}_REQUEST` must fit in {} bytes",
            crate::protocol::MAX_TYPE_BYTES
        ));
    }
    let Value::Object(spec) = spec else {
        return Err("a spec must be a JSON object".into());
    };
    let handler_keys: Vec<&String> = spec
        .keys()
        .filter(|k| !SPEC_KEYS.contains(&k.as_str()))
        .collect();
    let handler_key = match handler_keys.as_slice() {
        [one] => *one,
        [] => return Err(format!("no handler: add one of {:?}", kind_names())),
        many => {
            let list = many
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(format!(
                "one handler per action, and no other keys than {SPEC_KEYS:?}; found {list}"
            ));
        }
    };
    let Some((_, parse_kind)) = HANDLER_KINDS.iter().find(|(k, _)| k == handler_key) else {
        return Err(format!(
            "unknown key or handler `{handler_key}` (handlers: {:?}; other keys: {SPEC_KEYS:?})",
            kind_names()
        ));
    };
    let handler = parse_kind(&spec[handler_key])?;
    if let Some(d) = spec.get("description").filter(|d| !d.is_string()) {
        return Err(format!("`description` must be a string, not {d}"));
    }
    if let Some(c) = spec.get("client").filter(|c| !c.is_object()) {
        return Err(format!("`client` must be an object, not {c}"));
    }
    let schema = match spec.get("payload") {
        None => None,
        Some(schema) => Some(
            jsonschema::validator_for(schema)
                .map_err(|e| format!("`payload` is not a valid JSON Schema: {e}"))?,
        ),
    };
    // What a success carries: for clients and their type generators; patchbay passes the
    // API's answer on as it is, so it only checks that this is a schema.
    if let Some(schema) = spec.get("response") {
        jsonschema::validator_for(schema)
            .map_err(|e| format!("`response` is not a valid JSON Schema: {e}"))?;
    }
    let timeout = match spec.get("timeoutMs") {
        None => DEFAULT_TIMEOUT,
        Some(v) => match v.as_u64() {
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Duration::from_millis(ms),
            _ => {
                return Err(format!(
                    "`timeoutMs` must be an integer from 1 to {MAX_TIMEOUT_MS}, not {v}"
                ));
            }
        },
    };
    let subscribe = match spec.get("subscribe") {
        None => None,
        Some(Value::String(t)) => {
            let template = Template::parse(t).map_err(|e| format!("`subscribe`: {e}"))?;
            if t.is_empty()
                || template
                    .literal_text()
                    .bytes()
                    .any(|b| !b.is_ascii_graphic())
            {
                return Err(format!(
                    "`subscribe`: `{t}` cannot form a room name (printable ASCII, no spaces)"
                ));
            }
            Some(template)
        }
        Some(v) => {
            return Err(format!(
                "`subscribe` must be a room template string, not {v}"
            ));
        }
    };
    // A task's enqueue joins the task's room by itself.
    let subscribe = match &handler {
        Handler::Task(task) => {
            if subscribe.is_some() {
                return Err(
                    "`subscribe` is not for `task` actions: an enqueue joins `task:<id>` by itself"
                        .into(),
                );
            }
            (task.op == crate::task::Op::Enqueue)
                .then(|| Template::parse("task:{id}").expect("a valid template"))
        }
        Handler::Http(_) => subscribe,
    };
    Ok(ActionSpec {
        name: name.to_string(),
        handler,
        schema,
        timeout,
        subscribe,
    })
}

/// The names of the handler kinds, for messages.
fn kind_names() -> Vec<&'static str> {
    HANDLER_KINDS.iter().map(|(k, _)| *k).collect()
}

/// The `http` kind.
fn parse_http(spec: &Value) -> Result<Handler, String> {
    let http: HttpSpec =
        serde_json::from_value(spec.clone()).map_err(|e| format!("`http`: {e}"))?;
    parse_http_spec(http).map(Handler::Http)
}

fn parse_http_spec(http: HttpSpec) -> Result<HttpAction, String> {
    let method = Method::parse(&http.method).ok_or_else(|| {
        format!(
            "`http.method` must be GET, POST, PUT, PATCH or DELETE, not `{}`",
            http.method
        )
    })?;
    let path = Template::parse(&http.path).map_err(|e| format!("`http.path`: {e}"))?;
    if !path.starts_with_slash() {
        return Err(format!(
            "`http.path` must start with `/`, not `{}`",
            http.path
        ));
    }
    if let Some(c) = path
        .literal_text()
        .chars()
        .find(|c| matches!(c, '?' | '#') || !c.is_ascii_graphic())
    {
        return Err(format!(
            "`http.path` must not contain {c:?}: the query string is built from the payload"
        ));
    }
    Ok(HttpAction { method, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<Registry, ManifestError> {
        Registry::from_sources(files.iter().map(|(f, t)| (Path::new(f), *t)))
    }

    fn load_err(text: &str) -> String {
        load(&[("a.json", text)]).unwrap_err().to_string()
    }

    const CONTRACT_EXAMPLE: &str = r#"{
      "TASKS_FETCH": {
        "description": "One page of the current user's tasks",
        "http": { "method": "GET", "path": "/tasks" },
        "payload": { "type": "object", "properties": { "page": { "type": "integer", "minimum": 1 } } },
        "timeoutMs": 5000
      },
      "TASK_ENQUEUE": { "http": { "method": "POST", "path": "/tasks" }, "subscribe": "task:{id}" },
      "TASK_FETCH": { "http": { "method": "GET", "path": "/tasks/{id}" }, "client": { "poll": {} } }
    }"#;

    #[test]
    fn task_actions_are_checked_across_files() {
        let r = Registry::from_sources([
            (
                Path::new("a.json"),
                r#"{"EXPORT_START": {"task": {"queue": "exports", "maxAttempts": 2}}}"#,
            ),
            (
                Path::new("b.json"),
                r#"{"EXPORT_GET": {"task": {"queue": "exports", "op": "get"}}}"#,
            ),
        ])
        .unwrap();
        assert_eq!(r.first_task_action(), Some("EXPORT_GET"));
        assert!(!r.needs_api_url());
        let e = Registry::from_sources([
            (
                Path::new("a.json"),
                r#"{"EXPORT_START": {"task": {"queue": "exports"}}}"#,
            ),
            (
                Path::new("b.json"),
                r#"{"EXPORT_LIST": {"task": {"queue": "export", "op": "list"}}}"#,
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("b.json: action EXPORT_LIST: no action enqueues"),
            "{e}"
        );
        let e = Registry::from_sources([(
            Path::new("a.json"),
            r#"{"X": {"task": {"queue": "q", "command": ["sh", "-c", "x"]}}}"#,
        )])
        .unwrap_err()
        .to_string();
        assert!(e.contains("action X") && e.contains("absolute path"), "{e}");
    }

    #[test]
    fn a_response_schema_is_checked_and_served_as_written() {
        let source = r#"{"X": {"http": {"method": "GET", "path": "/x"},
            "response": {"type": "object", "properties": {"id": {"type": "string"}}}}}"#;
        let r = Registry::from_sources([(Path::new("a.json"), source)]).unwrap();
        let served: serde_json::Value = serde_json::from_slice(r.manifest_json()).unwrap();
        assert_eq!(
            served["X"]["response"]["properties"]["id"]["type"],
            "string"
        );
        let e = Registry::from_sources([(
            Path::new("a.json"),
            r#"{"X": {"http": {"method": "GET", "path": "/x"}, "response": {"type": 7}}}"#,
        )])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("action X") && e.contains("`response` is not a valid JSON Schema"),
            "{e}"
        );
    }

    #[test]
    fn loads_the_contract_example() {
        let r = load(&[("tasks.json", CONTRACT_EXAMPLE)]).unwrap();
        assert_eq!(r.len(), 3);
        let fetch = r.get("TASKS_FETCH").unwrap();
        assert_eq!(fetch.timeout, Duration::from_millis(5000));
        let schema = fetch.schema.as_ref().unwrap();
        assert!(schema.is_valid(&serde_json::json!({"page": 1})));
        assert!(!schema.is_valid(&serde_json::json!({"page": 0})));
        assert_eq!(r.get("TASK_FETCH").unwrap().timeout, DEFAULT_TIMEOUT);
        assert!(r.get("TASK_ENQUEUE").unwrap().subscribe.is_some());
        let Handler::Http(h) = &r.get("TASK_FETCH").unwrap().handler else {
            panic!("an http action");
        };
        assert_eq!(h.method, Method::Get);
        assert!(r.needs_api_url());
        let merged: Value = serde_json::from_slice(r.manifest_json()).unwrap();
        assert_eq!(
            merged["TASK_FETCH"]["client"],
            serde_json::json!({"poll": {}})
        );
    }

    #[test]
    fn errors_name_file_and_action() {
        let e = load_err(r#"{"X": {"grpc": {}}}"#);
        assert!(
            e.starts_with("a.json: action X: unknown key or handler `grpc`"),
            "{e}"
        );
        let e = load_err(r#"{"X": {"http": {"method": "FETCH", "path": "/x"}}}"#);
        assert!(e.contains("action X") && e.contains("http.method"), "{e}");
        let e = load_err(r#"{"X": {"http": {"method": "GET", "path": "/x/{id"}}}"#);
        assert!(e.contains("action X") && e.contains("http.path"), "{e}");
        let e = load_err(r#"{"X": {"http": {"method": "GET", "path": "x"}}}"#);
        assert!(e.contains("must start with `/`"), "{e}");
        let e = load_err(r#"{"X": {"http": {"method": "GET", "path": "/x?a=1"}}}"#);
        assert!(e.contains("http.path"), "{e}");
        let e = load_err(r#"{"X": {"http": {"method": "GET", "path": "/x", "extra": 1}}}"#);
        assert!(e.contains("action X") && e.contains("extra"), "{e}");
        let e = load_err(
            r#"{"X": {"http": {"method": "GET", "path": "/x"}, "payload": {"type": "nonsense"}}}"#,
        );
        assert!(e.contains("action X") && e.contains("JSON Schema"), "{e}");
        let e = load_err(r#"{"X": {"http": {"method": "GET", "path": "/x"}, "timeoutMs": 0}}"#);
        assert!(e.contains("timeoutMs"), "{e}");
        let e = load_err(r#"{"X": {"description": "no handler"}}"#);
        assert!(e.contains("no handler"), "{e}");
        let e = load_err(r#"{"x_lower": {"http": {"method": "GET", "path": "/x"}}}"#);
        assert!(e.contains("action x_lower") && e.contains("[A-Z]"), "{e}");
        let e = load_err(
            r#"{"X": {"http": {"method": "GET", "path": "/x"}, "subscribe": "task {id}"}}"#,
        );
        assert!(e.contains("subscribe"), "{e}");
        let e = load_err(r#"{"X": {"http": {"method": "GET", "path": "/x"}, "client": 3}}"#);
        assert!(e.contains("client"), "{e}");
        let e = load_err("[1]");
        assert!(e.starts_with("a.json: a manifest must be"), "{e}");
        let e = load_err("{ broken");
        assert!(e.starts_with("a.json: not valid JSON"), "{e}");
    }

    #[test]
    fn duplicate_names_across_files_are_refused() {
        let one = r#"{"X": {"http": {"method": "GET", "path": "/x"}}}"#;
        let e = load(&[("a.json", one), ("b.json", one)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "b.json: action X: duplicate action name, already defined in a.json"
        );
    }

    #[test]
    fn remote_refs_are_never_fetched() {
        let e = load_err(
            r#"{"X": {"http": {"method": "GET", "path": "/x"}, "payload": {"$ref": "http://127.0.0.1:9/schema.json"}}}"#,
        );
        assert!(e.contains("action X"), "{e}");
    }

    #[test]
    fn loads_a_directory_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"B": {"http": {"method": "DELETE", "path": "/b/{id}"}}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("a.json"), "{}").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let r = Registry::load_dir(dir.path()).unwrap();
        assert_eq!(r.len(), 1);
        let e = Registry::load_dir(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the actions directory"), "{e}");
    }
}
