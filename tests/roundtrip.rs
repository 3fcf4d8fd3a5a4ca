//! The first thing a user does: connect, dispatch, get the API's answer back.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn tasks_fetch_returns_exactly_the_api_json() {
    let upstream = Upstream::start().await;
    let bridge = Bridge::with_upstream(&upstream).await;
    let mut client = bridge.connect().await;
    let reply = client.request("TASKS_FETCH", json!({"page": 1})).await;
    assert_eq!(reply["type"], "TASKS_FETCH_SUCCESS");
    assert_eq!(
        reply["payload"],
        json!({"tasks": [{"id": 1, "title": "first"}], "page": 1})
    );
    assert_eq!(reply["meta"]["status"], 200);
    assert_eq!(upstream.recorded()[0].target, "/tasks?page=1");
}
