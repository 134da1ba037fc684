//! §3 sending and §4 delivery: push, ack, leases, redelivery, gates.

use std::time::{Duration, Instant};

use meshbroker::client::{self, send_frame, HelloOptions};
use meshbroker::config::Dur;

use crate::support::*;

/// The queue rows of one message.
fn deliveries_of(message_id: &str) -> String {
    format!(
        "SELECT q.recipient_member_id::text AS member, q.recipient_key, q.attempts, \
                q.claim_id::text AS claim_id, q.claim_expires_at, q.delivered_at, q.dead_at, q.dead_reason \
         FROM mesh.message_queue q WHERE q.message_id = '{message_id}'::uuid ORDER BY q.id"
    )
}

#[actix_web::test]
async fn dm_to_an_online_member_is_pushed_at_once_and_acked() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;

    let ack = ac
        .send_message(&b.pubkey(), "hello bob", "now", None)
        .await
        .must();
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["queued"], true, "{ack}");
    assert_eq!(ack["duplicate"], false, "{ack}");
    assert_eq!(ack["recipients"], 1, "{ack}");
    assert!(ack["id"].as_str().is_some_and(|s| !s.is_empty()), "{ack}");
    let message_id = ack["messageId"].as_str().expect("messageId").to_owned();

    // Pushed without any further request, well inside the lease.
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], message_id.as_str(), "{push}");
    assert_eq!(push["meshId"], env.mesh_id.to_string().as_str(), "{push}");
    assert_eq!(push["senderPubkey"], a.pubkey().as_str(), "{push}");
    assert_eq!(push["senderMemberPubkey"], a.pubkey().as_str(), "{push}");
    assert_eq!(push["senderMemberId"], a.id.as_str(), "{push}");
    assert_eq!(push["senderName"], "alice", "{push}");
    assert_eq!(push["priority"], "now", "{push}");
    assert_eq!(push["ciphertext"], "hello bob", "{push}");
    assert!(
        push["nonce"].as_str().is_some_and(|n| n.starts_with('n')),
        "{push}"
    );
    assert_eq!(push["targetSpec"], b.pubkey().as_str(), "{push}");
    assert_eq!(push["attempt"], 1, "{push}");
    let created = push["createdAt"].as_str().expect("createdAt");
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok() && created.ends_with('Z'),
        "{push}"
    );

    bc.ack(&push).await.must();
    env.wait_rows(
        &deliveries_of(&message_id),
        "delivered_at set by client_ack",
        |rows| rows.len() == 1 && !rows[0]["delivered_at"].is_null(),
    )
    .await;
}

#[actix_web::test]
async fn dm_to_an_offline_member_is_delivered_when_it_connects() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let ack = ac
        .send_message(&b.pubkey(), "while you were out", "next", Some("cm-1"))
        .await
        .must();
    assert_eq!(ack["queued"], true, "store and forward: {ack}");
    let mut bc = env.connect(&b).await;
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], ack["messageId"], "{push}");
    assert_eq!(push["ciphertext"], "while you were out");
    assert_eq!(push["client_message_id"], "cm-1", "{push}");
    bc.ack(&push).await.must();
}

#[actix_web::test]
async fn pending_deliveries_arrive_oldest_first() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    for i in 0..3 {
        let ack = ac
            .send_message(&b.pubkey(), &format!("m{i}"), "next", None)
            .await
            .must();
        assert_eq!(ack["queued"], true);
    }
    let mut bc = env.connect(&b).await;
    for i in 0..3 {
        let push = bc.expect("push", WAIT).await.must();
        assert_eq!(
            push["ciphertext"],
            format!("m{i}").as_str(),
            "order: {push}"
        );
    }
}

#[actix_web::test]
async fn member_target_prefers_the_control_plane_without_session_pubkey() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (mut session, _) = env.session(&b, "bob-session").await;
    let sk = client::generate_session_key();
    let cli_opts = HelloOptions {
        display_name: Some("bob-cli".into()),
        session_pubkey: Some(spub(&sk)),
        ..Default::default()
    };
    let (mut cli, _) = env.connect_opts(&b, cli_opts).await;
    let mut daemon = env.connect(&b).await;

    let ack = ac
        .send_message(&b.pubkey(), "for the daemon", "now", None)
        .await
        .must();
    assert_eq!(ack["recipients"], 1, "one delivery per member: {ack}");
    let push = daemon.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "for the daemon");
    assert_no_push(&mut session, "bob's session").await;
    assert_no_push(&mut cli, "bob's CLI connection").await;
}

#[actix_web::test]
async fn session_target_reaches_only_that_session() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut daemon = env.connect(&b).await;
    let (mut s1, k1) = env.session(&b, "bob-1").await;
    let (mut s2, _k2) = env.session(&b, "bob-2").await;

    let ack = ac
        .send_message(&spub(&k1), "for s1", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    let push = s1.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "for s1");
    assert_eq!(push["targetSpec"], spub(&k1).as_str());
    assert_no_push(&mut s2, "the other session").await;
    assert_no_push(&mut daemon, "bob's daemon").await;
}

#[actix_web::test]
async fn a_session_sender_is_named_by_its_session_key() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let (mut s, sk) = env.session(&a, "alice-session").await;
    let mut bc = env.connect(&b).await;
    let ack = s
        .send_message(&b.pubkey(), "from a session", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["senderPubkey"], spub(&sk).as_str(), "{push}");
    assert_eq!(push["senderMemberPubkey"], a.pubkey().as_str(), "{push}");
    assert_eq!(push["senderName"], "alice-session", "{push}");
}

#[actix_web::test]
async fn a_message_to_an_offline_session_waits_for_it() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let sk = client::generate_session_key();
    let opts = HelloOptions {
        display_name: Some("bob-s".into()),
        ..Default::default()
    };
    let (s, _) = env.session_opts(&b, &sk, opts.clone()).await;
    s.close().await.must();
    let ack = ac
        .send_message(&spub(&sk), "later", "now", None)
        .await
        .must();
    assert_eq!(
        ack["queued"], true,
        "a known session gets store and forward: {ack}"
    );
    let (mut s, _) = env.session_opts(&b, &sk, opts).await;
    let push = s.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "later");
}

#[actix_web::test]
async fn broadcast_reaches_every_other_member_but_not_the_senders_own() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let c = env.member("carol").await;
    let mut ac = env.connect(&a).await;
    let (mut a_session, _) = env.session(&a, "alice-session").await;
    let mut bc = env.connect(&b).await;
    let mut cc = env.connect(&c).await;
    let (mut c_session, _) = env.session(&c, "carol-session").await;

    let ack = ac.send_message("*", "to all", "now", None).await.must();
    assert_eq!(ack["queued"], true, "{ack}");
    assert_eq!(ack["recipients"], 3, "bob, carol, carol's session: {ack}");
    let mid = ack["messageId"].clone();
    for (conn, who) in [
        (&mut bc, "bob"),
        (&mut cc, "carol"),
        (&mut c_session, "carol's session"),
    ] {
        let push = conn
            .expect("push", WAIT)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e:#}"));
        assert_eq!(
            push["messageId"], mid,
            "{who}: same messageId for every copy"
        );
        assert_eq!(push["targetSpec"], "*");
    }
    assert_no_push(&mut a_session, "the sender's own session").await;
    assert_no_push(&mut ac, "the sender").await;

    let ack = bc
        .send_message("@all", "all again", "now", None)
        .await
        .must();
    assert_eq!(
        ack["recipients"], 4,
        "alice, alice's session, carol, carol's session: {ack}"
    );
}

#[actix_web::test]
async fn group_targets_are_hierarchical() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let c = env.member("carol").await;
    let d = env.member("dave").await;
    let grouped = |name: &str, g: &str| HelloOptions {
        display_name: Some(name.into()),
        groups: vec![g.into()],
        ..Default::default()
    };
    let (mut ac, _) = env.connect_opts(&a, grouped("alice", "a")).await;
    let (mut bc, _) = env.connect_opts(&b, grouped("bob", "a/b/c")).await;
    let (mut cc, _) = env.connect_opts(&c, grouped("carol", "a/x")).await;
    let mut dc = env.connect(&d).await;

    let ack = ac.send_message("@a/b", "to a/b", "now", None).await.must();
    assert_eq!(ack["queued"], true, "{ack}");
    assert_eq!(ack["recipients"], 1, "{ack}");
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "to a/b");
    bc.ack(&push).await.must();
    assert_no_push(&mut cc, "carol (a/x) for @a/b").await;

    let ack = ac.send_message("@a", "to a", "now", None).await.must();
    assert_eq!(
        ack["recipients"], 2,
        "bob and carol, not alice herself: {ack}"
    );
    for (conn, who) in [(&mut bc, "bob"), (&mut cc, "carol")] {
        let push = conn
            .expect("push", WAIT)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e:#}"));
        assert_eq!(push["ciphertext"], "to a");
    }
    assert_no_push(&mut dc, "dave (no group)").await;
    assert_no_push(&mut ac, "alice (sender, in group a)").await;
}

#[actix_web::test]
async fn join_and_leave_group_change_group_delivery() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    bc.send_json(&json!({"type": "join_group", "name": "ops"}))
        .await
        .must();
    bc.list_peers(None).await.must(); // the join has been handled
    let ack = ac.send_message("@ops", "ops 1", "now", None).await.must();
    assert_eq!(ack["recipients"], 1, "{ack}");
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "ops 1");
    bc.ack(&push).await.must();
    bc.send_json(&json!({"type": "leave_group", "name": "ops"}))
        .await
        .must();
    bc.list_peers(None).await.must();
    let ack = ac.send_message("@ops", "ops 2", "now", None).await.must();
    assert_ne!(ack["recipients"], 1, "{ack}");
    assert_no_push(&mut bc, "bob after leave_group").await;
}

#[actix_web::test]
async fn an_unacked_push_is_pushed_again_after_the_lease() {
    let env = TestEnv::start().await; // lease 1s, sweeper 200ms
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "ack me", "now", None)
        .await
        .must();
    let first = bc.expect("push", WAIT).await.must();
    assert_eq!(first["attempt"], 1, "{first}");
    // No other event: nobody sends or connects.
    let second = bc.expect("push", WAIT).await.must();
    assert_eq!(second["messageId"], ack["messageId"], "{second}");
    assert_eq!(second["attempt"], 2, "{second}");
    bc.ack(&second).await.must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    env.wait_rows(&deliveries_of(&mid), "delivered", |r| {
        !r[0]["delivered_at"].is_null()
    })
    .await;
    env.wait_metric("meshbroker_deliveries_redelivered_total", &[], |v| v >= 1.0)
        .await;
}

#[actix_web::test]
async fn closing_before_the_ack_redelivers_at_once_on_reconnect() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(60)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "unacked", "now", None)
        .await
        .must();
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["attempt"], 1);
    bc.close().await.must();
    // The lease (60 s) is far away: only the release on close explains this.
    let mut bc = env.connect(&b).await;
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], ack["messageId"], "{push}");
    assert_eq!(push["attempt"], 2, "{push}");
}

#[actix_web::test]
async fn an_ack_from_another_member_changes_nothing() {
    let env = TestEnv::start().await; // lease 1s
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let c = env.member("carol").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let mut cc = env.connect(&c).await;
    let ack = ac
        .send_message(&b.pubkey(), "for bob only", "now", None)
        .await
        .must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    let push = bc.expect("push", WAIT).await.must();
    cc.ack(&push).await.must();
    cc.send_json(&json!({"type": "client_ack", "clientMessageId": mid}))
        .await
        .must();
    cc.list_peers(None).await.must(); // carol's acks have been handled
    let rows = env.rows(&deliveries_of(&mid)).await;
    assert!(
        rows[0]["delivered_at"].is_null(),
        "carol's ack marked bob's delivery: {rows:?}"
    );
    // Bob still gets it again when the lease runs out.
    let again = bc.expect("push", WAIT).await.must();
    assert_eq!(again["messageId"], mid.as_str());
    assert_eq!(again["attempt"], 2);
}

#[actix_web::test]
async fn an_ack_by_client_message_id_is_accepted() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "x", "now", Some("cmid-7"))
        .await
        .must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    bc.expect("push", WAIT).await.must();
    bc.send_json(&json!({"type": "client_ack", "clientMessageId": "cmid-7"}))
        .await
        .must();
    env.wait_rows(&deliveries_of(&mid), "delivered via clientMessageId", |r| {
        !r[0]["delivered_at"].is_null()
    })
    .await;
}

#[actix_web::test]
async fn a_delivery_pushed_max_attempts_times_is_dead_lettered() {
    let env = TestEnv::start_with(|c| c.delivery.max_attempts = 2).await; // lease 1s
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "poison", "now", None)
        .await
        .must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    assert_eq!(bc.expect("push", WAIT).await.must()["attempt"], 1);
    assert_eq!(bc.expect("push", WAIT).await.must()["attempt"], 2);
    let rows = env
        .wait_rows(&deliveries_of(&mid), "dead_at set", |r| {
            !r[0]["dead_at"].is_null()
        })
        .await;
    assert!(
        rows[0]["dead_reason"].is_string(),
        "kept with a reason: {rows:?}"
    );
    assert!(rows[0]["delivered_at"].is_null());
    env.wait_metric("meshbroker_deliveries_dead_lettered_total", &[], |v| {
        v >= 1.0
    })
    .await;
    let more = pushes_within(&mut bc, Duration::from_millis(1500)).await;
    assert!(
        more.is_empty(),
        "a dead delivery is never pushed again: {more:?}"
    );
}

#[actix_web::test]
async fn nack_pushes_again() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(60)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "try again", "now", None)
        .await
        .must();
    let push = bc.expect("push", WAIT).await.must();
    bc.send_json(&json!({"type": "nack", "brokerMessageId": push["messageId"]}))
        .await
        .must();
    let again = bc.expect("push", WAIT).await.must();
    assert_eq!(again["messageId"], ack["messageId"]);
    assert_eq!(again["attempt"], 2, "{again}");
}

#[actix_web::test]
async fn in_progress_extends_the_lease() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(2)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "slow work", "now", None)
        .await
        .must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    let push = bc.expect("push", WAIT).await.must();
    let pushed_at = Instant::now();
    let before = env.rows(&deliveries_of(&mid)).await;
    let original_expiry = before[0]["claim_expires_at"]
        .as_str()
        .expect("claimed")
        .to_owned();

    tokio::time::sleep(Duration::from_millis(1000)).await;
    bc.send_json(&json!({"type": "in_progress", "brokerMessageId": push["messageId"]}))
        .await
        .must();
    let original = chrono::DateTime::parse_from_rfc3339(&original_expiry).unwrap();
    env.wait_rows(&deliveries_of(&mid), "claim_expires_at moved later", |r| {
        r[0]["claim_expires_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .is_some_and(|t| t > original + chrono::Duration::milliseconds(500))
    })
    .await;
    // Not pushed again at (or shortly after) the original expiry.
    let until = Duration::from_millis(2700).saturating_sub(pushed_at.elapsed());
    let early = pushes_within(&mut bc, until).await;
    assert!(
        early.is_empty(),
        "redelivered before the extended lease ran out: {early:?}"
    );
    // It is pushed again once the extended lease runs out.
    let again = bc.expect("push", WAIT).await.must();
    assert_eq!(again["attempt"], 2, "{again}");
}

#[actix_web::test]
async fn the_priority_gate_holds_next_while_working() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    bc.set_status("working").await.must();
    let peers = bc.list_peers(None).await.must();
    let me = peers
        .iter()
        .find(|p| p["memberPubkey"] == b.pubkey().as_str())
        .expect("bob listed");
    assert_eq!(me["status"], "working", "{me}");

    let held = ac
        .send_message(&b.pubkey(), "next one", "next", None)
        .await
        .must();
    let low = ac
        .send_message(&b.pubkey(), "low one", "low", None)
        .await
        .must();
    let urgent = ac
        .send_message(&b.pubkey(), "now one", "now", None)
        .await
        .must();
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(
        push["messageId"], urgent["messageId"],
        "only `now` passes while working: {push}"
    );
    bc.ack(&push).await.must();
    assert_no_push(&mut bc, "bob while working").await;

    bc.set_status("idle").await.must();
    let p1 = bc.expect("push", WAIT).await.must();
    let p2 = bc.expect("push", WAIT).await.must();
    assert_eq!(p1["messageId"], held["messageId"], "oldest first: {p1}");
    assert_eq!(p2["messageId"], low["messageId"], "{p2}");
}

#[actix_web::test]
async fn dnd_gets_only_now() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    bc.set_status("dnd").await.must();
    bc.list_peers(None).await.must();
    ac.send_message(&b.pubkey(), "later", "low", None)
        .await
        .must();
    let urgent = ac
        .send_message(&b.pubkey(), "urgent", "now", None)
        .await
        .must();
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], urgent["messageId"], "{push}");
    assert_no_push(&mut bc, "bob in dnd").await;
}

#[actix_web::test]
async fn a_repeated_client_message_id_is_idempotent() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;

    let mut frame = send_frame(&b.pubkey(), "once", "now");
    frame["client_message_id"] = json!("idem-1");
    frame["request_fingerprint"] = json!("fp-1");
    let first = ac.send_frame(frame.clone()).await.must();
    assert_eq!(first["queued"], true, "{first}");
    assert_eq!(first["duplicate"], false, "{first}");
    let again = ac.send_frame(frame.clone()).await.must();
    assert_eq!(again["queued"], true, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["messageId"], first["messageId"], "{again}");

    let mut changed = frame.clone();
    changed["request_fingerprint"] = json!("fp-2");
    let refused = ac.send_frame(changed).await.must();
    assert_eq!(refused["queued"], false, "{refused}");
    assert_refused(&refused, "idempotency_key_reused");

    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], first["messageId"]);
    assert_eq!(push["client_message_id"], "idem-1", "relayed: {push}");
    assert_eq!(push["request_fingerprint"], "fp-1", "relayed: {push}");
    bc.ack(&push).await.must();
    assert_no_push(&mut bc, "bob (the duplicate created nothing)").await;
    let rows = env
        .rows("SELECT id FROM mesh.message WHERE client_message_id = 'idem-1'")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
}

#[actix_web::test]
async fn max_in_flight_bounds_unacked_pushes() {
    let env = TestEnv::start_with(|c| {
        c.delivery.max_in_flight = 2;
        c.delivery.lease = Dur::secs(30);
    })
    .await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    for i in 0..5 {
        let ack = ac
            .send_message(&b.pubkey(), &format!("m{i}"), "now", None)
            .await
            .must();
        assert_eq!(ack["queued"], true);
    }
    let mut got = vec![
        bc.expect("push", WAIT).await.must(),
        bc.expect("push", WAIT).await.must(),
    ];
    let extra = pushes_within(&mut bc, Duration::from_millis(500)).await;
    assert!(
        extra.is_empty(),
        "more than max_in_flight=2 unacked pushes: {extra:?}"
    );
    bc.ack(&got[0]).await.must();
    got.push(bc.expect("push", WAIT).await.must());
    let extra = pushes_within(&mut bc, QUIET).await;
    assert!(extra.is_empty(), "one ack frees one slot: {extra:?}");
    for p in got.clone() {
        bc.ack(&p).await.must();
    }
    got.push(bc.expect("push", WAIT).await.must());
    got.push(bc.expect("push", WAIT).await.must());
    let texts: Vec<&str> = got
        .iter()
        .map(|p| p["ciphertext"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);
}

#[actix_web::test]
async fn reply_to_id_and_mentions_are_relayed() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let mut frame = send_frame(&b.pubkey(), "re", "now");
    frame["replyToId"] = json!("orig-1");
    frame["mentions"] = json!(["bob"]);
    ac.send_frame(frame).await.must();
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["replyToId"], "orig-1", "{push}");
    assert_eq!(push["mentions"], json!(["bob"]), "{push}");
}

#[actix_web::test]
async fn nack_with_a_delay_waits_before_pushing_again() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(60)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    ac.send_message(&b.pubkey(), "later please", "now", None)
        .await
        .must();
    let push = bc.expect("push", WAIT).await.must();
    let nacked_at = Instant::now();
    bc.send_json(&json!({"type": "nack", "brokerMessageId": push["messageId"], "delay": "2s"}))
        .await
        .must();
    let early = pushes_within(&mut bc, Duration::from_millis(1200)).await;
    assert!(
        early.is_empty(),
        "pushed again before the nack's delay: {early:?}"
    );
    let again = bc.expect("push", WAIT).await.must();
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(1900),
        "delay honoured"
    );
    assert_eq!(again["attempt"], 2, "{again}");
}

#[actix_web::test]
async fn an_expired_message_is_never_pushed() {
    let env = TestEnv::start_with(|c| c.delivery.message_ttl = Dur::secs(1)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let ack = ac
        .send_message(&b.pubkey(), "stale soon", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    // Let the message outlive its ttl while bob is offline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = ac
        .send_message(&b.pubkey(), "fresh", "now", None)
        .await
        .must();
    let mut bc = env.connect(&b).await;
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(
        push["messageId"], fresh["messageId"],
        "only the unexpired message: {push}"
    );
    bc.ack(&push).await.must();
    assert_no_push(&mut bc, "bob (expired message)").await;
}

/// docs/protocol.md §4: an attempt is a push the socket accepted. A claim
/// that never reached its connection (it left while the claim ran, or was
/// being cut off) is given back by claim id with its attempt taken back;
/// a delivery claimed again meanwhile is left alone.
#[actix_web::test]
async fn claims_never_pushed_are_given_back_without_using_an_attempt() {
    use meshbroker::db::queries::{self, ClaimSpec};
    use meshbroker::ids::{ClaimId, NodeId, PresenceId};
    let env = TestEnv::start().await;
    let (a, b) = (env.member("alice").await, env.member("bob").await);
    let mut ac = env.connect(&a).await;
    let ack = ac
        .send_frame(send_frame(&b.pubkey(), "x", "now"))
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    let attempts = || async {
        env.rows("SELECT attempts, claim_id IS NOT NULL AS claimed FROM mesh.message_queue")
            .await
    };
    let spec = ClaimSpec {
        member_id: b.id.parse().unwrap(),
        presence_id: PresenceId::new(),
        key: "",
        member_wide: true,
        limit: 10,
        lease: Duration::from_secs(30),
        node_id: NodeId::new(),
        max_attempts: 10,
    };
    let mut conn = env.pool.get().await.expect("db conn");
    let first = queries::claim(&mut conn, &spec).await.expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(attempts().await[0]["attempts"], 1);
    let ids: Vec<_> = first.iter().map(|r| ClaimId(r.claim_id)).collect();
    assert_eq!(
        queries::release_unpushed(&mut conn, spec.member_id, &ids)
            .await
            .expect("give back"),
        1
    );
    let row = &attempts().await[0];
    assert_eq!(
        (row["attempts"].clone(), row["claimed"].clone()),
        (json!(0), json!(false))
    );

    let second = queries::claim(&mut conn, &spec).await.expect("claim");
    assert_eq!(
        second[0].attempts, 1,
        "the given-back claim counted nothing"
    );
    assert_eq!(
        queries::release_unpushed(&mut conn, spec.member_id, &ids)
            .await
            .expect("give back"),
        0,
        "a stale claim id gives back nothing"
    );
    let row = &attempts().await[0];
    assert_eq!(
        (row["attempts"].clone(), row["claimed"].clone()),
        (json!(1), json!(true))
    );
}
