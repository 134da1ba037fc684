//! Isolation: nothing of one mesh is visible or reachable from another
//! sharing the database and the broker — hellos, peers lists, system
//! events, sends, acks / nacks / in_progress, kicks, status. And a delivery
//! is settled only by its own recipient.

use meshbroker::client::{self, hello_frame, now_ms, session_hello_frame, HelloOptions};
use meshbroker::config::Dur;
use meshbroker::ids::MeshId;
use serde_json::Value;

use crate::support::*;

/// A second mesh in the test's database.
async fn other_mesh(env: &TestEnv) -> MeshId {
    let mut conn = env.pool.get().await.expect("db conn");
    meshbroker::admin::create_mesh(&mut conn, "other-mesh")
        .await
        .expect("create mesh")
        .id
}

fn named(name: &str) -> HelloOptions {
    HelloOptions {
        display_name: Some(name.into()),
        ..Default::default()
    }
}

/// The settlement state of one message's deliveries.
fn deliveries_of(message_id: &str) -> String {
    format!(
        "SELECT id, delivered_at, claimed_at, claim_id, claim_expires_at, claim_presence_id, \
                not_before, attempts, dead_at \
           FROM mesh.message_queue WHERE message_id = '{message_id}' ORDER BY id"
    )
}

#[actix_web::test]
async fn a_member_of_one_mesh_cannot_hello_into_another() {
    let env = TestEnv::start().await;
    let y = other_mesh(&env).await;
    let alice = env.member("alice").await;
    let yuri = env.member_in(y, "yuri", false).await;

    // Alice's own key, correctly signed, naming mesh Y (with her id, then
    // with a Y member's id).
    for member_id in [alice.id.clone(), yuri.id.clone()] {
        let mut creds = alice.creds.clone();
        creds.mesh_id = y.to_string();
        creds.member_id = member_id;
        let frame = hello_frame(&creds, &HelloOptions::default(), now_ms());
        expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
    }
    // A session attested by alice, claiming mesh Y.
    let sk = client::generate_session_key();
    let mut creds = alice.creds.clone();
    creds.mesh_id = y.to_string();
    let now = now_ms();
    let mut frame =
        session_hello_frame(&creds, &sk, now + 3_600_000, &HelloOptions::default(), now);
    frame.as_object_mut().unwrap().remove("parentMemberId");
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
    // And the other way round.
    let mut creds = yuri.creds.clone();
    creds.mesh_id = env.mesh_id.to_string();
    let frame = hello_frame(&creds, &HelloOptions::default(), now_ms());
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
    let rows = env.rows("SELECT id FROM mesh.presence").await;
    assert!(rows.is_empty(), "a refused hello left presence: {rows:?}");
}

#[actix_web::test]
async fn one_key_in_two_meshes_is_two_members_that_never_meet() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let y = other_mesh(&env).await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    // The operator adds alice's public key to mesh Y too.
    let alice_y = {
        let mut conn = env.pool.get().await.expect("db conn");
        let m =
            meshbroker::admin::add_member(&mut conn, y, "alice-y", Some(&alice.pubkey()), false)
                .await
                .expect("add member");
        let mut creds = alice.creds.clone();
        creds.mesh_id = y.to_string();
        creds.member_id = m.id.to_string();
        creds
    };
    let mut ax = env.connect_as(&alice, "alice-x").await;
    let (mut ay, _) = client::hello(&env.ws_url, &alice_y, &named("alice-y"))
        .await
        .must();
    let mut bc = env.connect(&bob).await;
    let ack = bc
        .send_message(&alice.pubkey(), "for alice in X", "now", None)
        .await
        .must();
    assert_eq!(ack["recipients"], 1, "{ack}");
    let push = ax.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "for alice in X");
    assert_no_push(&mut ay, "alice's connection in mesh Y").await;
    let peers = ay.list_peers(None).await.must();
    let names: Vec<&str> = peers
        .iter()
        .filter_map(|p| p["displayName"].as_str())
        .collect();
    assert_eq!(names, ["alice-y"], "{peers:?}");
}

#[actix_web::test]
async fn peers_lists_and_system_events_stay_in_their_mesh() {
    let env = TestEnv::start().await;
    let y = other_mesh(&env).await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let yuri = env.member_in(y, "yuri", false).await;
    let yara = env.member_in(y, "yara", false).await;
    let mut ac = env.connect(&alice).await;
    let (mut bs, _) = env.session(&bob, "bob-session").await;
    let mut yc = env.connect(&yuri).await;
    let (mut ys, _) = env.session(&yara, "yara-session").await;

    let listed = |peers: Vec<Value>| -> Vec<String> {
        let mut n: Vec<String> = peers
            .iter()
            .map(|p| p["displayName"].as_str().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        listed(ac.list_peers(None).await.must()),
        ["alice", "bob-session"]
    );
    assert_eq!(
        listed(yc.list_peers(None).await.must()),
        ["yara-session", "yuri"]
    );
    // Yuri heard yara join; alice heard bob, never yara.
    yc.expect_system("peer_joined", WAIT).await.must();
    let frames = ac.drain_for(QUIET).await.must();
    let heard: Vec<&Value> = frames
        .iter()
        .filter(|f| client::is_system_push(f))
        .collect();
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0]["eventData"]["name"], "bob-session");
    // Hiding and leaving in Y is not announced in X.
    ys.send_json(&json!({"type": "set_visible", "visible": false, "_reqId": "v"}))
        .await
        .must();
    ys.expect("ack", WAIT).await.must();
    yc.expect_system("peer_hidden", WAIT).await.must();
    ys.close().await.must();
    yc.expect_system("peer_left", WAIT).await.must();
    let frames = ac.drain_for(QUIET).await.must();
    assert!(
        frames.iter().all(|f| f["meshId"] != y.to_string().as_str()),
        "mesh Y events reached alice: {frames:?}"
    );
    assert!(frames.is_empty(), "{frames:?}");
    let frames = bs.drain_for(QUIET).await.must();
    assert!(
        frames
            .iter()
            .all(|f| f["eventData"]["name"] != "yara-session"),
        "{frames:?}"
    );
}

#[actix_web::test]
async fn sends_never_cross_meshes() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let y = other_mesh(&env).await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let yuri = env.member_in(y, "yuri", false).await;
    let mut ac = env.connect(&alice).await;
    let in_ops = |name: &str| HelloOptions {
        groups: vec!["ops".into()],
        ..named(name)
    };
    let mut bc = env.connect_opts(&bob, in_ops("bob")).await.0;
    let mut yc = env.connect_opts(&yuri, in_ops("yuri")).await.0;
    let (mut ys, yk) = env.session(&yuri, "yuri-session").await;

    // Another mesh's member and session keys are unknown here.
    for target in [yuri.pubkey(), spub(&yk)] {
        let ack = ac.send_message(&target, "across", "now", None).await.must();
        assert_refused(&ack, "not_found");
    }
    // Broadcast and groups reach only this mesh.
    for target in ["*", "@all", "@ops"] {
        let ack = ac.send_message(target, target, "now", None).await.must();
        assert_eq!(ack["recipients"], 1, "{target}: {ack}");
        let push = bc.expect("push", WAIT).await.must();
        assert_eq!(push["ciphertext"], target);
        bc.ack(&push).await.must();
    }
    assert_no_push(&mut yc, "yuri").await;
    assert_no_push(&mut ys, "yuri's session").await;
    let crossed = env
        .rows(&format!(
            "SELECT q.id FROM mesh.message_queue q JOIN mesh.member m ON m.id = q.recipient_member_id \
              WHERE m.mesh_id = '{y}'"
        ))
        .await;
    assert!(crossed.is_empty(), "{crossed:?}");
    // And the other way round.
    let ack = yc
        .send_message(&alice.pubkey(), "back", "now", None)
        .await
        .must();
    assert_refused(&ack, "not_found");
    let ack = yc.send_message("*", "y-all", "now", None).await.must();
    assert_eq!(
        ack["recipients"], 0,
        "yuri's mesh has no other member: {ack}"
    );
    assert_no_push(&mut ac, "alice").await;
}

#[actix_web::test]
async fn acks_nacks_and_in_progress_for_a_delivery_not_the_askers_change_nothing() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let y = other_mesh(&env).await;
    let alice = env.member("alice").await;
    let carol = env.member("carol").await;
    let yuri = env.member_in(y, "yuri", false).await;
    let yara = env.member_in(y, "yara", false).await;
    let mut ac = env.connect(&alice).await;
    let mut cc = env.connect(&carol).await;
    let (mut cs, _) = env.session(&carol, "carol-session").await;
    let mut yc = env.connect(&yuri).await;
    let mut yr = env.connect(&yara).await;

    // A delivery in Y (yuri → yara), pushed and unacknowledged.
    let ack = yc
        .send_message(&yara.pubkey(), "y-secret", "now", Some("cmid-y"))
        .await
        .must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    let push = yr.expect("push", WAIT).await.must();
    let before = env.rows(&deliveries_of(&mid)).await;
    assert!(before[0]["claim_id"].is_string(), "claimed: {before:?}");

    // Every settling frame, from another mesh (alice, carol's session) and
    // from the same mesh's sender (yuri), by broker id and by client id.
    let hostile = [
        json!({"type": "client_ack", "brokerMessageId": mid}),
        json!({"type": "client_ack", "clientMessageId": "cmid-y"}),
        json!({"type": "client_ack", "clientMessageId": mid}),
        json!({"type": "nack", "brokerMessageId": mid}),
        json!({"type": "in_progress", "brokerMessageId": mid}),
    ];
    for conn in [&mut ac, &mut cs, &mut yc] {
        for frame in &hostile {
            conn.send_json(frame).await.must();
        }
        conn.list_peers(None).await.must();
    }
    tokio::time::sleep(QUIET).await;
    let after = env.rows(&deliveries_of(&mid)).await;
    assert_eq!(after, before, "a stranger's settlement changed the row");
    assert_no_push(&mut yr, "yara (no nack may push it again)").await;

    // The same in mesh X, between members: alice → carol's daemon.
    let ack = ac
        .send_message(&carol.pubkey(), "x-secret", "now", None)
        .await
        .must();
    let xmid = ack["messageId"].as_str().unwrap().to_owned();
    let xpush = cc.expect("push", WAIT).await.must();
    let xbefore = env.rows(&deliveries_of(&xmid)).await;
    for frame in [
        json!({"type": "nack", "brokerMessageId": xmid}),
        json!({"type": "in_progress", "brokerMessageId": xmid}),
        json!({"type": "client_ack", "brokerMessageId": xmid}),
    ] {
        yr.send_json(&frame).await.must();
        ac.send_json(&frame).await.must();
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(env.rows(&deliveries_of(&xmid)).await, xbefore);

    // The recipients themselves can settle them: the checks above could fail.
    yr.send_json(&json!({"type": "in_progress", "brokerMessageId": mid}))
        .await
        .must();
    env.wait_rows(&deliveries_of(&mid), "yara's in_progress", |r| {
        r[0]["claim_expires_at"] != before[0]["claim_expires_at"]
    })
    .await;
    yr.ack(&push).await.must();
    cc.ack(&xpush).await.must();
    for m in [&mid, &xmid] {
        env.wait_rows(&deliveries_of(m), "acked by its recipient", |r| {
            r[0]["delivered_at"].is_string()
        })
        .await;
    }
}

#[actix_web::test]
async fn kicks_and_disconnects_stay_in_their_mesh() {
    let env = TestEnv::start().await;
    let y = other_mesh(&env).await;
    let root = env.admin("root").await;
    let bob = env.member("bob").await;
    let yuri = env.member_in(y, "yuri", false).await;
    let mut rc = env.connect(&root).await;
    // The same display name in both meshes.
    let (mut bs, _) = env.session(&bob, "worker").await;
    let (mut ys, yk) = env.session(&yuri, "worker").await;
    let mut yd = env.connect_as(&yuri, "yuri-daemon").await;

    let ack = rc
        .request(json!({"type": "kick", "target": "worker"}), WAIT)
        .await
        .must();
    assert_eq!(ack["kicked"], json!(["worker"]), "{ack}");
    assert_eq!(bs.expect_close(WAIT).await.must().0, Some(4001));
    for target in [yuri.pubkey(), spub(&yk), yuri.pubkey()[..8].to_owned()] {
        let ack = rc
            .request(json!({"type": "kick", "target": target}), WAIT)
            .await
            .must();
        assert_eq!(ack["affected"], json!([]), "{target}: {ack}");
    }
    for ty in ["kick", "disconnect"] {
        let ack = rc
            .request(json!({"type": ty, "all": true}), WAIT)
            .await
            .must();
        assert!(
            !ack["affected"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == "yuri-daemon"),
            "{ack}"
        );
        let ack = rc
            .request(json!({"type": ty, "stale": -1}), WAIT)
            .await
            .must();
        assert!(
            !ack["affected"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == "yuri-daemon" || n == "worker"),
            "{ack}"
        );
    }
    for (conn, who) in [(&mut ys, "yuri's session"), (&mut yd, "yuri's daemon")] {
        let frames = conn.drain_for(QUIET).await.must();
        assert!(!conn.is_closed(), "{who} was closed: {frames:?}");
        conn.list_peers(None).await.must();
    }
}

#[actix_web::test]
async fn status_and_replacement_stay_in_their_mesh() {
    let env = TestEnv::start().await;
    let y = other_mesh(&env).await;
    let alice = env.member("alice").await;
    let yuri = env.member_in(y, "yuri", false).await;
    let sid = format!("sid-{}", uuid::Uuid::new_v4());
    let with_sid = |name: &str| HelloOptions {
        session_id: Some(sid.clone()),
        ..named(name)
    };
    let (mut ax, _) = env.connect_opts(&alice, with_sid("alice")).await;
    let key = client::generate_session_key();
    let (mut asess, _) = env
        .session_opts(&alice, &key, with_sid("alice-session"))
        .await;
    // Yuri, in Y, with the very same sessionId: replaces nothing in X.
    let (mut yh, _) = client::hello(&env.ws_url, &yuri.creds, &with_sid("yuri"))
        .await
        .must();
    let (mut ysess, _) = client::session_hello(
        &env.ws_url,
        &yuri.creds,
        &client::generate_session_key(),
        &with_sid("yuri-session"),
    )
    .await
    .must();
    let frames = ax.drain_for(QUIET).await.must();
    assert!(!ax.is_closed(), "alice replaced from mesh Y: {frames:?}");
    // Yuri's status changes are his alone.
    ysess.set_status("dnd").await.must();
    yh.set_status("working").await.must();
    ysess.list_peers(None).await.must();
    yh.list_peers(None).await.must();
    let peers = asess.list_peers(None).await.must();
    assert!(
        peers.iter().all(|p| p["status"] == "idle"),
        "mesh Y statuses leaked into X: {peers:?}"
    );
    let statuses = env
        .rows(&format!(
            "SELECT status FROM mesh.presence WHERE mesh_id = '{y}' ORDER BY status"
        ))
        .await;
    assert_eq!(
        statuses,
        vec![json!({"status": "dnd"}), json!({"status": "working"})]
    );
}
