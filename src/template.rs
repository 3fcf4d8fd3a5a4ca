//! `{field}` templates (manifest `http.path` and `subscribe`) and the percent-encoding and
//! query-string rules of contract section 3. Pure functions, shared with nothing that does IO.

use std::fmt::Write;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

/// Every byte except `A-Z a-z 0-9 - . _ ~` is encoded, so a value never leaves its segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment or query key/value (space is `%20`, never `+`).
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// [`Template::fill`] mapping for paths: every value is percent-encoded.
pub fn path_segment(s: &str) -> Result<String, &'static str> {
    Ok(encode(s))
}

/// [`Template::fill`] mapping for `subscribe` rooms: values may only hold `A-Z a-z 0-9 - . _ ~`.
/// A value echoed from the request could otherwise carry `:` or `*` and name another kind of
/// room (`user:42`) that the connection would then be granted.
pub fn room_part(s: &str) -> Result<String, &'static str> {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        Ok(s.to_string())
    } else {
        Err("may only contain letters, digits, `-`, `.`, `_` and `~` to fill a room name")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String),
}

/// A parsed template such as `/tasks/{id}` or `task:{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a payload cannot fill a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {reason}")]
pub struct FillError {
    /// The template field.
    pub field: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Template {
    /// Parses a template; `{name}` fields are `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    let ok = closed
                        && name
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        return Err(format!(
                            "`{{{name}` is not a field: use {{name}} with letters, digits and _"
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err("unmatched `}`".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { parts })
    }

    /// The literal text around the fields, concatenated (for validating it).
    pub fn literal_text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Literal(l) => Some(l.as_str()),
                Part::Field(_) => None,
            })
            .collect()
    }

    /// Whether the template starts with a literal `/`.
    pub fn starts_with_slash(&self) -> bool {
        matches!(self.parts.first(), Some(Part::Literal(l)) if l.starts_with('/'))
    }

    /// The field names, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Whether each field is followed by the end or by a literal whose first character
    /// `allowed` refuses: then [`Template::matches`] has one way to match.
    pub fn fields_are_delimited(&self, allowed: impl Fn(u8) -> bool) -> bool {
        self.parts.windows(2).all(|w| match w {
            [Part::Field(_), Part::Literal(l)] => !allowed(l.as_bytes()[0]),
            [Part::Field(_), Part::Field(_)] => false,
            _ => true,
        })
    }

    /// Matches `s`, each field taking the longest run of 1 to `max` characters that `allowed`
    /// accepts (a template whose fields are delimited, see [`Template::fields_are_delimited`]):
    /// the fields' values.
    pub fn matches(
        &self,
        s: &str,
        allowed: impl Fn(u8) -> bool,
        max: usize,
    ) -> Option<Map<String, Value>> {
        let mut values = Map::new();
        let mut rest = s;
        for part in &self.parts {
            match part {
                Part::Literal(l) => rest = rest.strip_prefix(l.as_str())?,
                Part::Field(f) => {
                    let n = rest.bytes().take_while(|b| allowed(*b)).count();
                    if n == 0 || n > max {
                        return None;
                    }
                    values.insert(f.clone(), Value::String(rest[..n].to_string()));
                    rest = &rest[n..];
                }
            }
        }
        rest.is_empty().then_some(values)
    }

    /// Fills the fields from the top-level string or integer fields of `values`, each passed
    /// through `map` (percent-encoding for paths, a character check for rooms), which may
    /// refuse it. A missing field or a value that is empty, `.` or `..` is an error.
    pub fn fill(
        &self,
        values: &Map<String, Value>,
        map: impl Fn(&str) -> Result<String, &'static str>,
    ) -> Result<String, FillError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Field(f) => {
                    let err = |reason| FillError {
                        field: f.clone(),
                        reason,
                    };
                    let value = match values.get(f) {
                        None | Some(Value::Null) => return Err(err("is missing")),
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                        Some(_) => return Err(err("must be a string or an integer")),
                    };
                    if matches!(value.as_str(), "" | "." | "..") {
                        return Err(err("must not be empty, `.` or `..`"));
                    }
                    out.push_str(&map(&value).map_err(err)?);
                }
            }
        }
        Ok(out)
    }
}

/// Builds the query string of a GET or DELETE from the payload fields not used by the path:
/// sorted by key; scalars as their JSON text (strings unquoted); arrays of scalars repeat the
/// key; `null` left out; objects (or nested arrays) are an error naming the field.
pub fn query_string(payload: &Map<String, Value>, skip: &[&str]) -> Result<String, String> {
    let mut keys: Vec<&String> = payload
        .keys()
        .filter(|k| !skip.contains(&k.as_str()))
        .collect();
    keys.sort();
    let mut out = String::new();
    let mut push = |key: &str, v: &Value| -> Result<(), String> {
        let text = match v {
            Value::Null => return Ok(()),
            Value::String(s) => s.clone(),
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            Value::Array(_) | Value::Object(_) => {
                return Err(format!(
                    "field `{key}` must be a scalar or an array of scalars to go in the query string"
                ));
            }
        };
        let sep = if out.is_empty() { "" } else { "&" };
        let _ = write!(out, "{sep}{}={}", encode(key), encode(&text));
        Ok(())
    };
    for key in keys {
        match &payload[key] {
            Value::Array(items) => items.iter().try_for_each(|v| push(key, v))?,
            v => push(key, v)?,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_templates() {
        let t = Template::parse("/tasks/{id}/steps/{step_no}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), vec!["id", "step_no"]);
        assert!(t.starts_with_slash());
        assert_eq!(t.literal_text(), "/tasks//steps/");
        assert!(Template::parse("/tasks/{id").is_err());
        assert!(Template::parse("/tasks/{}").is_err());
        assert!(Template::parse("/tasks/{1d}").is_err());
        assert!(Template::parse("/tasks/{a-b}").is_err());
        assert!(Template::parse("/tasks/id}").is_err());
        assert!(Template::parse("/tasks/{a{b}}").is_err());
        assert!(!Template::parse("tasks").unwrap().starts_with_slash());
    }

    #[test]
    fn path_fields_never_escape_their_segment() {
        let t = Template::parse("/tasks/{id}").unwrap();
        let fill = |v: Value| t.fill(&obj(v), path_segment);
        assert_eq!(fill(json!({"id": 42})).unwrap(), "/tasks/42");
        assert_eq!(
            fill(json!({"id": "../admin"})).unwrap(),
            "/tasks/..%2Fadmin"
        );
        assert_eq!(
            fill(json!({"id": "a b?c#d%e"})).unwrap(),
            "/tasks/a%20b%3Fc%23d%25e"
        );
        assert_eq!(fill(json!({"id": "é"})).unwrap(), "/tasks/%C3%A9");
        assert_eq!(fill(json!({"id": "A-z.0_9~"})).unwrap(), "/tasks/A-z.0_9~");
        for bad in [
            json!({}),
            json!({"id": null}),
            json!({"id": ""}),
            json!({"id": "."}),
            json!({"id": ".."}),
            json!({"id": 1.5}),
            json!({"id": true}),
            json!({"id": {}}),
        ] {
            assert!(fill(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(fill(json!({"id": -3})).unwrap(), "/tasks/-3");
    }

    #[test]
    fn room_fields_cannot_change_the_kind_of_room() {
        let t = Template::parse("task:{id}").unwrap();
        assert_eq!(
            t.fill(&obj(json!({"id": "a-1_b.c~"})), room_part).unwrap(),
            "task:a-1_b.c~"
        );
        assert_eq!(t.fill(&obj(json!({"id": 7})), room_part).unwrap(), "task:7");
        for bad in ["x:user:42", "1*", "a b", "é"] {
            assert!(
                t.fill(&obj(json!({"id": bad})), room_part).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn query_strings_follow_the_contract() {
        let p = obj(
            json!({"z": "a b", "a": 1, "id": 7, "flag": true, "f": 1.5, "n": null, "tags": ["x", "y&z", null]}),
        );
        assert_eq!(
            query_string(&p, &["id"]).unwrap(),
            "a=1&f=1.5&flag=true&tags=x&tags=y%26z&z=a%20b"
        );
        assert_eq!(query_string(&Map::new(), &[]).unwrap(), "");
        assert!(
            query_string(&obj(json!({"o": {"a": 1}})), &[])
                .unwrap_err()
                .contains("`o`")
        );
        assert!(query_string(&obj(json!({"o": [[1]]})), &[]).is_err());
        assert_eq!(
            query_string(&obj(json!({"k y": "v"})), &[]).unwrap(),
            "k%20y=v"
        );
    }
}
