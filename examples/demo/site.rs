//! The demo's web page, served by the demo API itself so that the page and the API share one
//! origin: the shim's REST fallback then needs no CORS, and only patchbay (on another port)
//! has to allow the page's origin.
//!
//! Files are read from the source tree at every request, so edits show on reload:
//! `/` and `/<name>.{html,js,css}` from `webapp-shim/demo/`, `/shim/<name>.js` from
//! `webapp-shim/src/`. Names are matched against a strict pattern, never joined blindly, so
//! no request reaches outside those two directories.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::bridge::Bridge;

pub struct Site {
    /// `webapp-shim/demo`: the page.
    pub page_dir: PathBuf,
    /// `webapp-shim/src`: the shim's ES modules.
    pub shim_dir: PathBuf,
    /// The manifests, served merged as `GET /actions` like patchbay does, so the page can
    /// start while patchbay is down.
    pub actions_dir: PathBuf,
    /// Where the page opens its websocket.
    pub patchbay_ws: String,
    /// The in-process patchbay the page may stop and start; `None` when patchbay runs
    /// elsewhere.
    pub bridge: Option<Arc<Bridge>>,
    /// What visitors' tokens are signed with (patchbay verifies them with the same).
    pub jwt_secret: String,
}

type Reply = Response<Full<Bytes>>;

impl Site {
    /// Answers GET `path`, or `None` when it is not the site's.
    pub fn get(&self, path: &str) -> Option<Reply> {
        match path {
            "/" => Some(file(&self.page_dir, "index.html")),
            "/actions" => Some(self.manifest()),
            "/demo/config" => Some(json_reply(
                StatusCode::OK,
                &json!({"patchbay": self.patchbay_ws, "controls": self.bridge.is_some()}),
            )),
            _ => {
                if let Some(name) = path.strip_prefix("/demo/token/") {
                    return Some(self.token(name));
                }
                if let Some(name) = path.strip_prefix("/shim/") {
                    return Some(match safe_name(name, &["js"]) {
                        true => file(&self.shim_dir, name),
                        false => not_found(),
                    });
                }
                let name = path.strip_prefix('/')?;
                safe_name(name, &["html", "js", "css"]).then(|| file(&self.page_dir, name))
            }
        }
    }

    /// `GET /demo/token/<name>`: a token for visitor `name` (letters, digits and `-`, at most
    /// 32), valid for a day. A demo has no accounts: anyone may be anyone.
    fn token(&self, name: &str) -> Reply {
        let valid = (1..=32).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_name",
                "a visitor name is 1 to 32 letters, digits and dashes",
            );
        }
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 24 * 3600;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": name, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(self.jwt_secret.as_bytes()),
        );
        match token {
            Ok(token) => json_reply(StatusCode::OK, &json!({"name": name, "token": token})),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            ),
        }
    }

    /// `GET /demo/patchbay`, `POST /demo/patchbay/stop` and `POST /demo/patchbay/start`.
    pub async fn control(&self, action: Option<&str>, json_body: bool) -> Reply {
        let Some(bridge) = &self.bridge else {
            return error(
                StatusCode::NOT_FOUND,
                "not_managed",
                "patchbay is not run by this demo process",
            );
        };
        // A JSON content type cannot be sent cross-origin without a CORS preflight, which
        // this server never approves: a foreign page cannot stop the user's patchbay.
        if action.is_some() && !json_body {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "json_only",
                "send Content-Type: application/json",
            );
        }
        match action {
            None => {}
            Some("stop") => {
                println!("demo: stopping patchbay (the page falls back to the REST API)");
                bridge.stop().await;
            }
            Some("start") => {
                if let Err(e) = bridge.resume().await {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "start_failed",
                        &e.to_string(),
                    );
                }
                println!("demo: patchbay runs again on {}", bridge.addr());
            }
            Some(_) => return error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
        let running = bridge.is_running().await;
        json_reply(
            StatusCode::OK,
            &json!({"running": running, "addr": bridge.addr().to_string()}),
        )
    }

    fn manifest(&self) -> Reply {
        match merged_manifests(&self.actions_dir) {
            Ok(all) => json_reply(StatusCode::OK, &Value::Object(all)),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "bad_manifest", &e),
        }
    }
}

/// The manifests of `dir`: its `*.json` files, in name order, as patchbay reads them.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// `*.json` of `dir`, in name order, merged into one object.
fn merged_manifests(dir: &Path) -> Result<Map<String, Value>, String> {
    let mut all = Map::new();
    for path in manifest_files(dir)? {
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        match serde_json::from_slice(&text) {
            Ok(Value::Object(actions)) => all.extend(actions),
            _ => return Err(format!("{} is not a JSON object", path.display())),
        }
    }
    Ok(all)
}

/// `name.ext` with `name` of lowercase letters, digits, `-` and `_`, and one allowed `ext`:
/// no slash, no dot segment, no percent escape can get through.
fn safe_name(name: &str, extensions: &[&str]) -> bool {
    let Some((stem, ext)) = name.split_once('.') else {
        return false;
    };
    !stem.is_empty()
        && stem
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && extensions.contains(&ext)
}

fn file(dir: &Path, name: &str) -> Reply {
    let content_type = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "application/octet-stream",
    };
    match std::fs::read(dir.join(name)) {
        Ok(body) => Response::builder()
            .header("content-type", content_type)
            // Served from the working tree: always the current version.
            .header("cache-control", "no-store")
            .header("x-content-type-options", "nosniff")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response"),
        Err(_) => not_found(),
    }
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    json_reply(status, &json!({"error": code, "message": message}))
}

fn not_found() -> Reply {
    error(StatusCode::NOT_FOUND, "not_found", "no such file")
}

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn names_cannot_leave_the_directory() {
        assert!(safe_name("app.js", &["js"]));
        assert!(safe_name("index.html", &["html"]));
        for bad in [
            "../app.js",
            "..%2Fapp.js",
            ".js",
            "a/b.js",
            "app.js.map",
            "App.js",
            "app.html",
            "app",
        ] {
            assert!(!safe_name(bad, &["js"]), "{bad} was accepted");
        }
    }
}
