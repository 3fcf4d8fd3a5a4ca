//! `GET /metrics` as an operator's Prometheus scrapes it.

mod common;

use common::*;
use serde_json::json;

async fn scrape(bridge: &Bridge) -> String {
    let accept = ("accept", "application/openmetrics-text; version=1.0.0");
    let (status, headers, body) =
        http_raw("GET", &bridge.http_url("/metrics"), &[accept], "").await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    String::from_utf8(body.to_vec()).unwrap()
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_actions_connections_and_deliveries_with_bounded_labels() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::start(MANIFEST, Some(upstream.url()), |c| {
        c.public_rooms = vec![patchbay::rooms::RoomPattern::parse("lobby").unwrap()];
    })
    .await;
    let mut a = bridge.connect().await;
    let mut b = bridge.connect().await;
    assert_eq!(
        a.request("ECHO_LIST", json!({})).await["type"],
        "ECHO_LIST_SUCCESS"
    );
    assert_eq!(
        a.request("STATUS", json!({"code": 500})).await["payload"]["code"],
        "upstream_error"
    );
    for i in 0..50 {
        let r = a.request(&format!("NOPE_{i}"), json!({})).await;
        assert_eq!(r["payload"]["code"], "unknown_action");
    }
    for c in [&mut a, &mut b] {
        let r = c
            .request("@@patchbay/SUBSCRIBE", json!({"room": "lobby"}))
            .await;
        assert_eq!(r["type"], "@@patchbay/SUBSCRIBE_SUCCESS");
    }
    bridge
        .app
        .hub
        .publish(
            vec!["lobby".into()],
            json!({"type": "HI"}).as_object().unwrap().clone(),
        )
        .await
        .unwrap();
    a.recv().await;
    b.recv().await;

    let text = scrape(&bridge).await;
    assert_eq!(
        value(
            &text,
            r#"patchbay_actions_total{action="ECHO_LIST",outcome="success"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"patchbay_actions_total{action="STATUS",outcome="upstream_error"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"patchbay_actions_total{action="unknown",outcome="unknown_action"}"#
        ),
        50.0
    );
    assert!(
        !text.contains("NOPE_"),
        "client-chosen names never become labels"
    );
    assert_eq!(
        value(
            &text,
            r#"patchbay_action_duration_seconds_count{action="ECHO_LIST"}"#
        ),
        1.0
    );
    assert_eq!(value(&text, "patchbay_connections"), 2.0);
    assert_eq!(value(&text, "patchbay_rooms"), 1.0);
    assert_eq!(value(&text, "patchbay_deliveries_total"), 2.0);
    assert_eq!(value(&text, "patchbay_bus_messages_out_total"), 1.0);
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
}

#[tokio::test]
async fn without_openmetrics_in_accept_metrics_are_prometheus_text_with_process_and_build_info() {
    let bridge = Bridge::start("{}", None, |c| {
        c.allowed_origins =
            patchbay::config::AllowedOrigins::List(vec!["https://app.example.com".into()]);
    })
    .await;
    // A refused handshake is counted by its reason.
    let refused = bridge
        .connect_with(&[("origin", "https://evil.example")])
        .await;
    assert!(refused.is_err());
    let (status, headers, body) = http_raw("GET", &bridge.http_url("/metrics"), &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    // Counter families are named by their samples, as the 0.0.4 format wants.
    assert!(
        text.contains("# TYPE patchbay_handshake_refusals_total counter"),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"patchbay_handshake_refusals_total{reason="forbidden_origin"}"#
        ),
        1.0
    );
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line["# TYPE ".len()..].split(' ');
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        assert!(
            text.lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name)),
            "a family without samples: {line}"
        );
    }
    assert_eq!(
        value(
            &text,
            &format!(
                r#"patchbay_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert_eq!(value(&text, "patchbay_bus_connected"), 1.0);
    assert_eq!(value(&text, "patchbay_bus_reconnects_total"), 0.0);
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    assert!(value(&text, "process_open_fds") >= 3.0);
    assert!(value(&text, "process_start_time_seconds") > 1.7e9);
    assert!(value(&text, "process_cpu_seconds_total") > 0.0);
}
