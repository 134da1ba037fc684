//! §7 admin frames: kick, disconnect, forbidden.

use std::time::Duration;

use meshbroker::client::HelloOptions;

use crate::support::*;

fn strs(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("names are strings").to_owned())
        .collect();
    out.sort();
    out
}

#[actix_web::test]
async fn kick_skips_control_plane_and_closes_others_with_4001() {
    let env = TestEnv::start().await;
    let admin = env.admin("root").await;
    let b = env.member("bob").await;
    let mut rc = env.connect(&admin).await;
    let mut daemon = env.connect_as(&b, "bob-daemon").await;
    let (mut session, _) = env.session(&b, "bob-session").await;
    let (mut bot, _) = env
        .connect_opts(
            &b,
            HelloOptions {
                display_name: Some("bob-bot".into()),
                role: Some("service".into()),
                ..Default::default()
            },
        )
        .await;

    let ack = rc
        .request(json!({"type": "kick", "target": b.pubkey()}), WAIT)
        .await
        .must();
    assert_eq!(ack["type"], "kick_ack", "{ack}");
    assert_eq!(strs(&ack["kicked"]), ["bob-bot", "bob-session"], "{ack}");
    assert_eq!(strs(&ack["skipped_control_plane"]), ["bob-daemon"], "{ack}");
    assert!(ack["affected"].is_array(), "{ack}");
    for (conn, who) in [(&mut session, "session"), (&mut bot, "service")] {
        let (code, reason) = conn
            .expect_close(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e:#}"));
        assert_eq!(code, Some(4001), "{who} close reason {reason:?}");
        assert_eq!(reason, "kicked", "{who}");
    }
    let _ = daemon.drain_for(Duration::from_millis(200)).await.must();
    assert!(
        !daemon.is_closed(),
        "the control-plane connection must survive a kick"
    );
    daemon.list_peers(None).await.must();
}

#[actix_web::test]
async fn kick_by_display_name_and_all() {
    let env = TestEnv::start().await;
    let admin = env.admin("root").await;
    let b = env.member("bob").await;
    let mut rc = env.connect(&admin).await;
    let (mut s1, _) = env.session(&b, "worker-1").await;
    let (mut s2, _) = env.session(&b, "worker-2").await;
    let mut daemon = env.connect_as(&b, "bob-daemon").await;
    let ack = rc
        .request(json!({"type": "kick", "target": "worker-1"}), WAIT)
        .await
        .must();
    assert_eq!(strs(&ack["kicked"]), ["worker-1"], "{ack}");
    assert_eq!(s1.expect_close(WAIT).await.must().0, Some(4001));
    let ack = rc
        .request(json!({"type": "kick", "all": true}), WAIT)
        .await
        .must();
    assert_eq!(ack["type"], "kick_ack", "{ack}");
    assert!(
        strs(&ack["kicked"]).contains(&"worker-2".to_owned()),
        "{ack}"
    );
    assert!(
        strs(&ack["skipped_control_plane"]).contains(&"bob-daemon".to_owned()),
        "{ack}"
    );
    assert_eq!(s2.expect_close(WAIT).await.must().0, Some(4001));
    let _ = daemon
        .drain_for(std::time::Duration::from_millis(200))
        .await
        .must();
    assert!(
        !daemon.is_closed(),
        "kick all skips control-plane connections"
    );
    assert!(!rc.is_closed());
}

#[actix_web::test]
async fn disconnect_skips_nothing_and_closes_with_1000() {
    let env = TestEnv::start().await;
    let admin = env.admin("root").await;
    let b = env.member("bob").await;
    let mut rc = env.connect(&admin).await;
    let mut daemon = env.connect_as(&b, "bob-daemon").await;
    let (mut session, _) = env.session(&b, "bob-session").await;
    let ack = rc
        .request(json!({"type": "disconnect", "target": b.pubkey()}), WAIT)
        .await
        .must();
    assert_eq!(ack["type"], "disconnect_ack", "{ack}");
    assert_eq!(strs(&ack["kicked"]), ["bob-daemon", "bob-session"], "{ack}");
    assert_eq!(
        strs(&ack["skipped_control_plane"]),
        Vec::<String>::new(),
        "{ack}"
    );
    for (conn, who) in [(&mut daemon, "daemon"), (&mut session, "session")] {
        let (code, reason) = conn
            .expect_close(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e:#}"));
        assert_eq!(
            (code, reason.as_str()),
            (Some(1000), "disconnected"),
            "{who}"
        );
    }
}

#[actix_web::test]
async fn non_admins_are_forbidden() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (mut bs, _) = env.session(&b, "bob-session").await;
    for ty in ["kick", "disconnect"] {
        let err = ac
            .request(json!({"type": ty, "target": b.pubkey()}), WAIT)
            .await
            .must();
        assert_eq!(err["type"], "error", "{ty}: {err}");
        assert_eq!(err["code"], "forbidden", "{ty}: {err}");
    }
    let frames = bs.drain_for(QUIET).await.must();
    assert!(
        !bs.is_closed(),
        "forbidden kick closed the target: {frames:?}"
    );
}
