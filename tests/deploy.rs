//! The deployment artefacts in the repository: the Dockerfile's runtime settings, run with the
//! binary as the image runs it (every interface, a user without privileges), and the systemd
//! unit, checked by `systemd-analyze verify`.

mod common;

use std::process::{Command, Stdio};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Dockerfile's instructions, continuation lines joined: `(instruction, arguments)`.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            let (instruction, args) = current
                .trim()
                .split_once(' ')
                .unwrap_or((current.trim(), ""));
            out.push((instruction.to_uppercase(), args.trim().to_string()));
            current.clear();
        }
    }
    out
}

#[tokio::test]
async fn the_image_runs_patchbay_unprivileged_on_every_interface() {
    let steps = dockerfile();
    let of = |name: &str| -> Vec<&String> {
        steps
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a)
            .collect()
    };
    assert_eq!(
        of("FROM").len(),
        2,
        "a build stage and a runtime stage: {:?}",
        of("FROM")
    );
    assert!(
        of("COPY").iter().any(|a| a.starts_with("--from=build ")),
        "the binary comes from the build stage"
    );
    let user = of("USER")
        .last()
        .expect("a USER")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let uid: u32 = user
        .parse()
        .expect("a numeric user (Kubernetes' runAsNonRoot checks it)");
    assert_ne!(uid, 0, "not root");
    let env: Vec<(String, String)> = of("ENV")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let listen = &env
        .iter()
        .find(|(k, _)| k == "PATCHBAY_LISTEN")
        .expect("PATCHBAY_LISTEN")
        .1;
    assert!(
        listen.starts_with("0.0.0.0:"),
        "reachable from outside the container: {listen}"
    );
    assert_eq!(of("ENTRYPOINT"), [r#"["/usr/local/bin/patchbay"]"#]);

    // The binary with the image's variables (the port free, the manifests where the image
    // copies them from), as that user when the test may switch to it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbay"));
    cmd.env_clear().current_dir(std::env::temp_dir());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("PATCHBAY_LISTEN", "0.0.0.0:0")
        .env("PATCHBAY_ACTIONS", format!("{ROOT}/actions"))
        .env("PATCHBAY_API_URL", "http://127.0.0.1:9")
        .stdout(Stdio::piped());
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, uid);
    }
    let mut child = cmd.spawn().unwrap();
    let addr = listening_addr(&mut child);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    let port = addr.rsplit(':').next().unwrap();
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/healthz")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((status, body), (200, serde_json::json!({"status": "ok"})));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze() {
    let unit = std::fs::read_to_string(format!("{ROOT}/deploy/patchbay.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/patchbay\n"));
    // Verified with the binary where it is here (verify checks that it exists).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patchbay.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/patchbay", env!("CARGO_BIN_EXE_patchbay")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze ({e}): install systemd (apt-get install systemd) to check the unit"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
