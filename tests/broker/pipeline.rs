//! Pipelined sends (issue 8): one connection keeps many sends in flight;
//! the writer stores them in batches; every answer stays exact and in the
//! order sent, and one connection's messages arrive in the order sent.

use serde_json::{json, Value};

use crate::support::*;
use meshbroker::client::send_frame;

/// Writes `frames` back to back without waiting, then reads one `ack` per
/// frame; returns them in the order they arrived.
async fn burst(conn: &mut meshbroker::client::Connection, frames: &[Value]) -> Vec<Value> {
    for f in frames {
        conn.send_json(f).await.must();
    }
    let mut acks = Vec::new();
    while acks.len() < frames.len() {
        let f = conn
            .expect_where("an ack", WAIT, |f| f["type"] == "ack")
            .await
            .must();
        acks.push(f);
    }
    acks
}

#[actix_web::test]
async fn pipelined_sends_are_answered_in_order_and_delivered_in_order() {
    let env = TestEnv::start().await;
    let (a, b) = (env.member("alice").await, env.member("bob").await);
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let frames: Vec<Value> = (0..200)
        .map(|i| {
            let mut f = send_frame(&b.pubkey(), &format!("m{i}"), "now");
            f["id"] = json!(format!("s{i}"));
            f
        })
        .collect();
    let acks = burst(&mut ac, &frames).await;
    let ids: Vec<&str> = acks.iter().map(|a| a["id"].as_str().unwrap()).collect();
    let sent: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
    assert_eq!(ids, sent, "acks in the order sent");
    assert!(acks.iter().all(|a| a["queued"] == true), "{acks:?}");
    let mut order = Vec::new();
    while order.len() < 200 {
        let push = bc.expect("push", WAIT).await.must();
        bc.ack(&push).await.must();
        let id = push["messageId"].clone();
        if !order.contains(&id) {
            order.push(id);
        }
    }
    let stored: Vec<Value> = acks.iter().map(|a| a["messageId"].clone()).collect();
    assert_eq!(order, stored, "pushed in the order sent");
}

/// Sends with one idempotency key inside one batch resolve as if one by
/// one: the first stored, a repeat its duplicate, another request under
/// the key refused — and a refusal found at once (too large) keeps its
/// place among the answers. The writer runs a lone first send at once, so
/// the pairs written behind it share the next batch.
#[actix_web::test]
async fn one_key_twice_in_a_batch_is_a_duplicate_or_a_reuse() {
    let env = TestEnv::start().await;
    let (a, b) = (env.member("alice").await, env.member("bob").await);
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let keyed = |id: String, key: usize, fp: &str| {
        let mut f = send_frame(&b.pubkey(), "once", "now");
        f["id"] = json!(id);
        f["client_message_id"] = json!(format!("k-{key}"));
        f["request_fingerprint"] = json!(fp);
        f
    };
    let keys = 20;
    let mut frames = Vec::new();
    for k in 0..keys {
        frames.push(keyed(format!("first{k}"), k, "fp-1"));
        frames.push(keyed(format!("again{k}"), k, "fp-1"));
    }
    let mut huge = send_frame(&b.pubkey(), &"x".repeat(70_000), "now");
    huge["id"] = json!("huge");
    frames.push(huge);
    frames.push(keyed("other".into(), keys - 1, "fp-2"));
    let acks = burst(&mut ac, &frames).await;
    let ids: Vec<&str> = acks.iter().map(|a| a["id"].as_str().unwrap()).collect();
    let want: Vec<&str> = frames.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids, want, "answers in the order sent");
    for k in 0..keys {
        let (first, again) = (&acks[2 * k], &acks[2 * k + 1]);
        assert_eq!(first["queued"], true, "{first}");
        assert_eq!(first["duplicate"], false, "{first}");
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!(again["messageId"], first["messageId"], "{again}");
    }
    assert_refused(&acks[2 * keys], "payload_too_large");
    assert_refused(&acks[2 * keys + 1], "idempotency_key_reused");
    let mut pushed = std::collections::HashSet::new();
    for _ in 0..keys {
        let push = bc.expect("push", WAIT).await.must();
        bc.ack(&push).await.must();
        pushed.insert(push["messageId"].to_string());
    }
    assert_eq!(pushed.len(), keys, "one message per key");
    assert_no_push(&mut bc, "bob (one message under each key)").await;
    let metrics = env.metrics().await;
    let rounds = metric(&metrics, "meshbroker_batches_total", &[("kind", "writer")]);
    let sends = metric(
        &metrics,
        "meshbroker_batched_requests_total",
        &[("kind", "writer")],
    );
    assert!(
        sends > rounds,
        "some batch held more than one send: {rounds} rounds, {sends} sends"
    );
}
