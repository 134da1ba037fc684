//! Issue 10 §5: the live status page at `/` and `/status`, and the
//! `/status.json` it polls. The page itself is loaded in headless Chromium
//! (driven over the DevTools protocol, in real time) against a broker under
//! traffic and the numbers it shows are checked; that
//! test needs a Chromium (`MESHBROKER_CHROMIUM`, or `chromium` /
//! `chromium-browser` / `google-chrome` on PATH) and says it was skipped
//! when there is none.
//!
//! `MESHBROKER_STATUS_SCREENSHOTS=<dir>` makes it also write
//! `status-page.png` (desktop) and `status-page-phone.png` there, taken
//! while the traffic runs: that is how the docs' screenshots were made.

use std::cell::Cell;
use std::io::BufRead as _;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use base64::Engine as _;

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
    // One push per delivery: dave's nacked push is a dead letter at the
    // next sweep. The lease is long, so that no traffic delivery, however
    // slow a loaded machine makes it, expires into a dead letter too.
    // The traffic runs as fast as one message at a time goes, above the
    // default send rate.
    let env = TestEnv::start_with(|c| {
        c.delivery.max_attempts = 1;
        c.delivery.lease = Dur::secs(60);
        c.limits.send_per_sec = 100_000;
        c.limits.send_burst = 100_000;
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
        .send_message(&d.pubkey(), "given back", "now", None)
        .await
        .must();
    let push = dave.expect("push", WAIT).await.must();
    dave.send_json(&json!({"type": "nack", "brokerMessageId": push["messageId"]}))
        .await
        .must();
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    env.wait_rows(
        &format!("SELECT dead_at FROM mesh.message_queue WHERE message_id = '{mid}'"),
        "dave's delivery dead-lettered",
        |r| !r[0]["dead_at"].is_null(),
    )
    .await;
    // The sweeper counts it after its transaction committed.
    env.wait_metric("meshbroker_deliveries_dead_lettered_total", &[], |v| {
        v >= 1.0
    })
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
            let ack = alice.send_message(&to, "traffic", "now", None).await.must();
            assert_eq!(ack["queued"], true, "{ack}");
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

/// Headless Chromium showing one page, driven over the DevTools protocol
/// (its WebSocket, through the crate's own client): the page runs in real
/// time, so the rates it shows are the broker's.
struct Browser {
    child: Child,
    page: Connection,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn open(chromium: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        // Chromium names its DevTools port on stderr; the rest of stderr
        // is read away so that it never blocks on a full pipe.
        let endpoint = actix_web::rt::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr);
            let mut line = String::new();
            let mut seen = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).unwrap_or(0) == 0 {
                    panic!("chromium ended before its DevTools endpoint:\n{seen}");
                }
                if let Some(at) = line.find("DevTools listening on ") {
                    let endpoint = line[at + "DevTools listening on ".len()..]
                        .trim()
                        .to_owned();
                    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
                    return endpoint;
                }
                seen.push_str(&line);
            }
        })
        .await
        .unwrap();
        let host = endpoint
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("a DevTools endpoint: {endpoint}"))
            .to_owned();
        let (status, list) = http_get(&format!("http://{host}/json/list")).await;
        assert_eq!(status, 200, "{list}");
        let targets: Value = serde_json::from_str(&list).unwrap();
        let target = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .unwrap_or_else(|| panic!("a page target: {targets}"));
        let page = Connection::connect(target["webSocketDebuggerUrl"].as_str().unwrap())
            .await
            .must();
        Browser {
            child,
            page,
            next_id: 0,
            _profile: profile,
        }
    }

    /// One DevTools command, and its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.page
            .send_json(&json!({"id": id, "method": method, "params": params}))
            .await
            .must();
        let mut reply = self
            .page
            .expect_where(method, WAIT, |f| f["id"] == id)
            .await
            .must();
        assert!(reply["error"].is_null(), "{method}: {reply}");
        reply["result"].take()
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true});
        self.call("Runtime.evaluate", params).await["result"]["value"].take()
    }

    /// How many times the page has shown a fresh `/status.json`.
    async fn updates(&mut self) -> u64 {
        let v = self
            .eval("Number(document.body.dataset.updates || 0)")
            .await;
        v.as_u64().unwrap_or(0)
    }

    /// Waits until the page has updated `n` more times, then returns its DOM.
    async fn dom_after(&mut self, n: u64) -> String {
        let goal = self.updates().await + n;
        let start = Instant::now();
        while self.updates().await < goal {
            assert!(
                start.elapsed() < WAIT + Duration::from_secs(2 * n),
                "the page stopped updating"
            );
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        let dom = self.eval("document.documentElement.outerHTML").await;
        dom.as_str().unwrap().to_owned()
    }

    /// The whole page as a PNG.
    async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Lays the page out as a phone shows it.
    async fn as_phone(&mut self) {
        let metrics = json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true});
        self.call("Emulation.setDeviceMetricsOverride", metrics)
            .await;
    }
}

/// The text of the element with `id` in the page's DOM.
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

    // Under traffic: the page has polled a few times, rates and latency
    // come from what moved between its polls.
    let before = traffic.sent.get();
    let mut browser = Browser::open(&chromium, &url).await;
    let dom = browser.dom_after(3).await;
    // A send is counted when accepted, before its ack reaches the loop.
    let after = traffic.sent.get() + 1;
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

    if let Some(dir) = std::env::var_os("MESHBROKER_STATUS_SCREENSHOTS") {
        let dir = PathBuf::from(dir);
        // Enough polls for the sparkline to show something.
        browser.dom_after(8).await;
        browser.screenshot(&dir.join("status-page.png")).await;
        browser.as_phone().await;
        browser.dom_after(1).await;
        browser.screenshot(&dir.join("status-page-phone.png")).await;
    }

    // Traffic stopped and settled: the figures are exact.
    traffic.stop.set(true);
    let (alice, bob) = traffic.task.await.unwrap();
    let n = traffic.sent.get();
    sc.env
        .wait_metric("meshbroker_deliveries_acked_total", &[], |v| v >= n as f64)
        .await;
    let dom = browser.dom_after(2).await;
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
