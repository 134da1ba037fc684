//! Issue 10 §5: the live status page at `/` and `/status`, and the
//! `/status.json` it polls. The page itself is loaded in headless Chromium
//! against a broker under traffic and the numbers it shows are checked; that
//! test needs a Chromium (`MESHBROKER_CHROMIUM`, or `chromium` /
//! `chromium-browser` / `google-chrome` on PATH) and says it was skipped
//! when there is none.
//!
//! `MESHBROKER_STATUS_SCREENSHOTS=<dir>` makes it also write
//! `status-page.png` (desktop) and `status-page-phone.png` there, taken
//! while the traffic runs: that is how the docs' screenshots were made.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use meshbroker::client::{hello_frame, now_ms, Connection, HelloOptions};
use meshbroker::config::Dur;
use meshbroker::crypto;

use crate::support::*;

/// A broker with what the page shows, set up so that each figure is known:
/// three deliveries waiting for an offline member, one dead letter, one
/// refused hello, and connections of every role.
struct Scene {
    env: TestEnv,
    alice: Connection,
    bob: Connection,
    bob_member: Member,
    node_id: String,
    /// Kept open: the connections the page counts.
    _others: Vec<Connection>,
}

/// Sends the scene makes before any traffic: 3 for carol, 1 for dave.
const SETUP_SENDS: u64 = 4;

async fn scene() -> Scene {
    // One push per delivery, and a short lease: dave's unacked push is a
    // dead letter a second later.
    let env = TestEnv::start_with(|c| {
        c.delivery.max_attempts = 1;
        c.delivery.lease = Dur::secs(1);
    })
    .await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let carol = env.member("carol").await;
    let d = env.member("dave").await;
    let s = env.member("svc").await;
    let mut alice = env.connect(&a).await;
    let bob = env.connect(&b).await;
    let (mut dave, _) = env.session(&d, "dave").await;
    let (svc, _) = env
        .connect_opts(
            &s,
            HelloOptions {
                role: Some("service".into()),
                ..Default::default()
            },
        )
        .await;
    for i in 0..3 {
        alice
            .send_message(&carol.pubkey(), &format!("for later {i}"), "next", None)
            .await
            .must();
    }
    let ack = alice
        .send_message(&d.pubkey(), "never acked", "now", None)
        .await
        .must();
    dave.expect("push", WAIT).await.must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    env.wait_rows(
        &format!("SELECT dead_at FROM mesh.message_queue WHERE message_id = '{mid}'"),
        "dave's delivery dead-lettered",
        |r| !r[0]["dead_at"].is_null(),
    )
    .await;
    let mut frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    frame["signature"] = json!(crypto::sign_hex(&a.creds.key, "something else"));
    expect_refusal(&env.ws_url, &frame, "bad_signature", 1008).await;
    let (_, health) = http_get(&format!("{}/health", env.http_url)).await;
    let health: Value = serde_json::from_str(&health).unwrap();
    Scene {
        node_id: health["node"].as_str().unwrap().to_owned(),
        env,
        alice,
        bob,
        bob_member: b,
        _others: vec![dave, svc],
    }
}

#[actix_web::test]
async fn the_page_is_one_file_of_its_own_and_its_json_has_the_figures() {
    let sc = scene().await;
    let env = &sc.env;
    for path in ["/", "/status"] {
        let (status, body) = http_get(&format!("{}{path}", env.http_url)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("<title>meshbroker status</title>"), "{path}");
        for outside in ["src=", "href=", "@import", "url(", "http://", "https://"] {
            assert!(
                !body.contains(outside),
                "{path} loads nothing from elsewhere, found {outside:?}"
            );
        }
    }
    let (status, body) = http_get(&format!("{}/status.json", env.http_url)).await;
    assert_eq!(status, 200, "{body}");
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["node"]["id"], sc.node_id.as_str());
    let c = &s["cluster"];
    assert_eq!(c["queue"]["pending"], 3, "{c}");
    assert_eq!(c["queue"]["dead"], 1, "{c}");
    assert_eq!(c["nodes"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c["nodes"][0]["alive"], true, "{c}");
    let live = &s["live"];
    assert_eq!(live["messages"]["accepted"], SETUP_SENDS, "{live}");
    assert_eq!(live["messages"]["dead_lettered"], 1, "{live}");
    let by_role = |v: &Value| -> Vec<(String, i64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().into(),
                    c["value"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        by_role(&live["connections"]),
        [("control-plane", 2), ("session", 1), ("service", 1)]
            .map(|(r, n)| (r.to_owned(), n))
            .to_vec()
    );
    let refusal = &live["recent_refusals"][0];
    assert_eq!(refusal["code"], "bad_signature", "{live}");
    assert_eq!(refusal["client"], "127.0.0.1", "{live}");
    assert_eq!(live["refusals_total"], json!([["bad_signature", 1]]));
}

/// alice sends to bob and bob acks, one message at a time, until `stop`.
struct Traffic {
    stop: Rc<Cell<bool>>,
    sent: Rc<Cell<u64>>,
    task: actix_web::rt::task::JoinHandle<(Connection, Connection)>,
}

fn start_traffic(mut alice: Connection, mut bob: Connection, to: String) -> Traffic {
    let stop = Rc::new(Cell::new(false));
    let sent = Rc::new(Cell::new(0));
    let (stop2, sent2) = (stop.clone(), sent.clone());
    let task = actix_web::rt::spawn(async move {
        while !stop2.get() {
            alice.send_message(&to, "traffic", "now", None).await.must();
            sent2.set(sent2.get() + 1);
            let push = bob.expect("push", WAIT).await.must();
            bob.ack(&push).await.must();
        }
        (alice, bob)
    });
    Traffic { stop, sent, task }
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESHBROKER_CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// Headless Chromium on `url`: its page after `budget` of virtual time
/// (the page's timers run, its requests are real), as the DOM it built, and
/// a screenshot of it at `size` if `screenshot` is given.
async fn chromium_load(
    chromium: &PathBuf,
    url: &str,
    budget: Duration,
    size: (u32, u32),
    screenshot: Option<PathBuf>,
) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--virtual-time-budget={}", budget.as_millis()))
    .arg(format!("--window-size={},{}", size.0, size.1));
    match &screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    cmd.arg(url);
    // Blocking the test's thread would stop the broker it looks at.
    let out = actix_web::rt::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(profile);
    String::from_utf8(out.stdout).expect("the DOM is text")
}

/// The text of the element with `id` in a dumped DOM.
fn shown(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].trim().to_owned()
}

/// A figure the page shows, as a number (`1,234` → 1234).
fn shown_number(dom: &str, id: &str) -> f64 {
    let text = shown(dom, id);
    text.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("#{id} shows {text:?}, not a number"))
}

/// A latency the page shows: `12 ms`, `1.5 s`.
fn shown_seconds(dom: &str, id: &str) -> f64 {
    let text = shown(dom, id);
    let (n, unit) = text
        .split_once(' ')
        .unwrap_or_else(|| panic!("#{id} shows {text:?}, not a time"));
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("#{id} shows {text:?}"));
    match unit {
        "ms" => n / 1000.0,
        "s" => n,
        _ => panic!("#{id} shows {text:?}, not a time"),
    }
}

#[actix_web::test]
async fn the_page_in_chromium_shows_the_broker_under_traffic() {
    let Some(chromium) = chromium() else {
        eprintln!(
            "SKIPPED the_page_in_chromium_shows_the_broker_under_traffic: no Chromium \
             (install the chromium package or set MESHBROKER_CHROMIUM)"
        );
        return;
    };
    let sc = scene().await;
    let url = format!("{}/status", sc.env.http_url);
    let traffic = start_traffic(sc.alice, sc.bob, sc.bob_member.pubkey());
    let warm = Instant::now();
    while traffic.sent.get() < 20 {
        assert!(warm.elapsed() < WAIT, "traffic does not flow");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }

    if let Some(dir) = std::env::var_os("MESHBROKER_STATUS_SCREENSHOTS") {
        let dir = PathBuf::from(dir);
        for (name, size) in [
            ("status-page.png", (1280, 1000)),
            ("status-page-phone.png", (390, 1900)),
        ] {
            chromium_load(
                &chromium,
                &url,
                Duration::from_secs(12),
                size,
                Some(dir.join(name)),
            )
            .await;
        }
    }

    // Under traffic: the page has polled a few times, rates and latency
    // come from what moved between its polls.
    let before = traffic.sent.get();
    let dom = chromium_load(&chromium, &url, Duration::from_secs(7), (1280, 1000), None).await;
    let after = traffic.sent.get();
    assert!(
        shown_number(&dom, "nodes-live") == 1.0 && dom.contains(&sc.node_id),
        "one live node, this one"
    );
    assert_eq!(shown(&dom, "node-id"), sc.node_id);
    let accepted = shown_number(&dom, "total-accepted") as u64;
    assert!(
        (SETUP_SENDS + before..=SETUP_SENDS + after).contains(&accepted),
        "accepted shown {accepted}, sent {}..{} by then",
        SETUP_SENDS + before,
        SETUP_SENDS + after
    );
    for id in ["rate-accepted", "rate-pushed", "rate-acked"] {
        assert!(shown_number(&dom, id) > 0.0, "#{id} under traffic");
    }
    for id in ["push-p50", "push-p99", "ack-p50", "ack-p99"] {
        let s = shown_seconds(&dom, id);
        assert!(s > 0.0 && s <= 30.0, "#{id} = {s} s");
    }
    assert!(shown_seconds(&dom, "ack-p99") >= shown_seconds(&dom, "push-p50"));
    for (role, n) in [("control-plane", 2.0), ("session", 1.0), ("service", 1.0)] {
        assert_eq!(shown_number(&dom, &format!("conn-{role}")), n, "{role}");
    }
    let session_actors = dom
        .split("data-kind=\"session\"")
        .nth(1)
        .expect("a row for the session actors");
    let running = session_actors
        .split("<td class=\"n\">")
        .nth(1)
        .and_then(|c| c.split('<').next())
        .unwrap();
    assert_eq!(running, "4", "a session actor per connection");
    let refusals = &dom[dom.find("id=\"refusals\"").unwrap()..];
    assert!(
        refusals.contains("bad_signature") && refusals.contains("127.0.0.1"),
        "the refused hello is listed with its client"
    );
    assert_eq!(shown_number(&dom, "refusals-total"), 1.0);
    assert_eq!(shown_number(&dom, "queue-dead"), 1.0);
    assert!(
        !dom.contains("class=\"shown\""),
        "no error banner: {}",
        shown(&dom, "error")
    );

    // Traffic stopped and settled: the figures are exact.
    traffic.stop.set(true);
    let (alice, bob) = traffic.task.await.unwrap();
    let n = traffic.sent.get();
    sc.env
        .wait_metric("meshbroker_deliveries_acked_total", &[], |v| v >= n as f64)
        .await;
    let dom = chromium_load(&chromium, &url, Duration::from_secs(5), (1280, 1000), None).await;
    assert_eq!(shown_number(&dom, "total-accepted") as u64, SETUP_SENDS + n);
    assert_eq!(shown_number(&dom, "total-acked") as u64, n);
    assert_eq!(shown_number(&dom, "total-dead_lettered"), 1.0);
    assert_eq!(shown_number(&dom, "queue-pending"), 3.0);
    assert_eq!(shown_number(&dom, "queue-claimed"), 0.0);
    assert_eq!(shown_number(&dom, "queue-dead"), 1.0);
    assert!(shown_seconds(&dom, "queue-oldest") > 0.0);
    let dead = &dom[dom.find("id=\"dead-meshes\"").unwrap()..];
    assert!(dead.contains("test-mesh"), "dead letters by mesh");
    drop((alice, bob));
}
