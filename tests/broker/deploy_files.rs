//! `deploy/grafana/meshbroker.json` and `deploy/prometheus/alerts.yml`:
//! every expression parses as PromQL and names only series a real broker
//! exports (and only labels those series carry), the dashboard has the
//! panels and the rules file the alerts an operator expects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use promql_parser::parser::{self, Expr};
use serde_json::Value;

use meshbroker::client;
use meshbroker::crypto;

use crate::support::*;

/// Series Prometheus makes itself, not the broker.
const PROMETHEUS_OWN: &[&str] = &["up"];
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// What one `/metrics` text exports: series name → label names seen on it.
/// A histogram exports `_bucket` (with `le`), `_sum` and `_count`.
#[derive(Debug, Default)]
struct Exported(BTreeMap<String, BTreeSet<String>>);

impl Exported {
    fn parse(text: &str) -> Exported {
        let mut series = BTreeMap::<String, BTreeSet<String>>::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                let (name, kind) = (words.next().unwrap(), words.next().unwrap());
                let names: Vec<String> = match kind {
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .map(|s| format!("{name}{s}"))
                        .collect(),
                    "summary" => vec![name.into(), format!("{name}_sum"), format!("{name}_count")],
                    _ => vec![name.into()],
                };
                for n in names {
                    series.entry(n).or_default();
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                let labels = series.entry(line[..name_end].to_owned()).or_default();
                if let Some(inner) = line[name_end..]
                    .strip_prefix('{')
                    .and_then(|r| r.split_once('}'))
                {
                    for pair in inner.0.split(',').filter(|p| !p.is_empty()) {
                        labels.insert(pair.split('=').next().unwrap().to_owned());
                    }
                }
            }
        }
        Exported(series)
    }

    /// What is wrong with `expr`: unknown series, and labels a selector or
    /// grouping names that its series never carry.
    fn problems(&self, expr: &str) -> Vec<String> {
        let ast = match parser::parse(expr) {
            Ok(ast) => ast,
            Err(e) => return vec![format!("does not parse as PromQL: {e}")],
        };
        let mut uses = Uses::default();
        uses.walk(&ast);
        let mut problems = Vec::new();
        for (name, labels) in &uses.selectors {
            if PROMETHEUS_OWN.contains(&name.as_str()) {
                continue;
            }
            let Some(known) = self.0.get(name) else {
                problems.push(format!("series {name} is not exported by the broker"));
                continue;
            };
            // A series with no sample yet says nothing of its labels.
            if known.is_empty() {
                continue;
            }
            for label in labels {
                if !known.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!("series {name} has no label {label:?}"));
                }
            }
        }
        problems
    }
}

/// The series an expression selects, with the labels its matchers name.
#[derive(Default)]
struct Uses {
    selectors: Vec<(String, BTreeSet<String>)>,
}

impl Uses {
    fn walk(&mut self, expr: &Expr) {
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(a) => {
                self.walk(&a.expr);
                if let Some(p) = &a.param {
                    self.walk(p);
                }
            }
            Expr::Unary(u) => self.walk(&u.expr),
            Expr::Binary(b) => {
                self.walk(&b.lhs);
                self.walk(&b.rhs);
            }
            Expr::Paren(p) => self.walk(&p.expr),
            Expr::Subquery(s) => self.walk(&s.expr),
            Expr::Call(c) => c.args.args.iter().for_each(|a| self.walk(a)),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }

    fn selector(&mut self, vs: &promql_parser::parser::VectorSelector) {
        let mut name = vs.name.clone();
        let mut labels = BTreeSet::new();
        for m in &vs.matchers.matchers {
            if m.name == "__name__" {
                name = Some(m.value.clone());
            } else {
                labels.insert(m.name.clone());
            }
        }
        self.selectors
            .push((name.unwrap_or_else(|| "(no name)".into()), labels));
    }
}

/// Grafana's variables, replaced by what a query would carry.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "30s")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
}

fn deploy_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&deploy_file("deploy/grafana/meshbroker.json"))
        .expect("deploy/grafana/meshbroker.json is JSON")
}

fn alert_rules() -> Vec<serde_yaml::Value> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&deploy_file("deploy/prometheus/alerts.yml"))
            .expect("deploy/prometheus/alerts.yml is YAML");
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

/// (where, expression) of every query of both files.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("dashboard panel {:?}", panel["title"].as_str().unwrap()),
                grafana_to_promql(target["expr"].as_str().expect("expr")),
            ));
        }
    }
    for rule in alert_rules() {
        out.push((
            format!("alert {}", rule["alert"].as_str().expect("alert name")),
            rule["expr"].as_str().expect("expr").to_owned(),
        ));
    }
    out
}

#[test]
fn the_check_finds_unknown_series_labels_and_bad_syntax() {
    let exported = Exported::parse(
        "# TYPE a_total counter\na_total{kind=\"x\"} 1\n# TYPE h_seconds histogram\n\
         h_seconds_bucket{le=\"+Inf\"} 0\n# TYPE quiet gauge\n",
    );
    assert!(exported
        .problems("sum by (kind) (rate(a_total[1m]))")
        .is_empty());
    assert!(exported
        .problems("histogram_quantile(0.9, sum by (le) (rate(h_seconds_bucket[1m])))")
        .is_empty());
    assert!(exported
        .problems("quiet{whatever=\"1\"} > 0 or up == 0")
        .is_empty());
    assert_eq!(
        exported.problems("rate(b_total[1m]) + a_total{kind=\"x\", role=\"y\"}"),
        [
            "series b_total is not exported by the broker",
            "series a_total has no label \"role\""
        ]
    );
    assert!(exported.problems("sum(rate(a_total[1m])")[0].contains("does not parse"));
}

#[actix_web::test]
async fn every_dashboard_and_alert_expression_names_series_the_broker_exports() {
    let env = TestEnv::start().await;
    // Traffic, so that labelled series have samples: a delivery pushed and
    // acked, one waiting for a member who is offline, a refused hello.
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let offline = env.member("carol").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    ac.send_message(&b.pubkey(), "hi", "now", None).await.must();
    let push = bc.expect("push", WAIT).await.must();
    bc.ack(&push).await.must();
    ac.send_message(&offline.pubkey(), "later", "now", None)
        .await
        .must();
    let (_, secret) = crypto::generate_keypair();
    let stranger = client::Credentials::from_secret_hex(&a.creds.mesh_id, &a.id, &secret).unwrap();
    assert!(client::hello(&env.ws_url, &stranger, &Default::default())
        .await
        .is_err());
    env.wait_metric("meshbroker_deliveries_acked_total", &[], |v| v >= 1.0)
        .await;
    // The per-mesh gauges come from the leader, after its first heartbeat.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = env.metrics().await;
        if text.contains("meshbroker_queue_oldest_undelivered_seconds{")
            || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let exported = Exported::parse(&text);

    let mut problems = Vec::new();
    let all = expressions();
    for (place, expr) in &all {
        for p in exported.problems(expr) {
            problems.push(format!("{place}: {p}\n    {expr}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in deploy/ (series from a real broker's /metrics):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(all.len() > 30, "only {} expressions found", all.len());
}

#[test]
fn the_dashboard_has_the_panels_an_operator_expects() {
    let dashboard = dashboard();
    let titles: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    let wanted = [
        "actors by kind",
        "actor message rates",
        "connections by role",
        "accepted / pushed / acked",
        "send → push latency",
        "send → ack latency",
        "queue by state",
        "oldest undelivered",
        "lease expiries",
        "dead letters",
        "pool use",
        "nodes",
    ];
    let missing: Vec<_> = wanted
        .iter()
        .filter(|w| !titles.iter().any(|t| t.contains(*w)))
        .collect();
    assert!(
        missing.is_empty(),
        "no panel for {missing:?}; panels: {titles:?}"
    );
    assert_eq!(
        dashboard["__inputs"][0]["name"], "DS_PROMETHEUS",
        "importable with a datasource of the user's choice"
    );
}

#[test]
fn the_alerts_an_operator_expects_exist_with_a_severity_and_summary() {
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for wanted in [
        "MeshbrokerDown",
        "MeshbrokerNodeCountDropped",
        "MeshbrokerOldestUndeliveredHigh",
        "MeshbrokerDeadLettersGrowing",
        "MeshbrokerLeaseExpiriesHigh",
        "MeshbrokerActorRestarts",
        "MeshbrokerPoolSaturated",
        "MeshbrokerSlowConsumersCutOff",
    ] {
        assert!(names.contains(&wanted), "no alert {wanted}: {names:?}");
    }
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            rule["labels"]["severity"].as_str().is_some(),
            "{name}: no severity"
        );
        assert!(
            rule["annotations"]["summary"].as_str().is_some(),
            "{name}: no summary"
        );
    }
}
