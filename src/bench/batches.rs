//! What the brokers' batching actors did during a run, read from each one's
//! `/metrics` before and after, and added up over the brokers: a first profile of where the time went
//! (how busy the writer, claimer and acker were, and how large their
//! batches ran).

use std::collections::BTreeMap;

/// One batching actor's work over the run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BatchStat {
    pub rounds: f64,
    pub requests: f64,
    /// Time its rounds took.
    pub busy_s: f64,
}

/// Counters by kind, as `/metrics` shows them now.
pub type Snapshot = BTreeMap<String, BatchStat>;

/// `/metrics` of the broker serving `ws_url`; `None` if it cannot be read.
pub async fn snapshot(ws_url: &str) -> Option<Snapshot> {
    let url = metrics_url(ws_url)?;
    let mut res = awc::Client::new().get(&url).send().await.ok()?;
    let body = res.body().limit(4 << 20).await.ok()?;
    Some(parse(&String::from_utf8_lossy(&body)))
}

/// `ws://host:port/ws` → `http://host:port/metrics`.
fn metrics_url(ws_url: &str) -> Option<String> {
    let (scheme, rest) = ws_url.split_once("://")?;
    let scheme = match scheme {
        "ws" => "http",
        "wss" => "https",
        _ => return None,
    };
    let host = rest.split('/').next()?;
    Some(format!("{scheme}://{host}/metrics"))
}

fn parse(text: &str) -> Snapshot {
    let mut out = Snapshot::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once("{kind=\"") else {
            continue;
        };
        let kind = labels.trim_end_matches("\"}").to_owned();
        let stat = || BatchStat::default();
        match name {
            "meshbroker_batches_total" => out.entry(kind).or_insert_with(stat).rounds = value,
            "meshbroker_batched_requests_total" => {
                out.entry(kind).or_insert_with(stat).requests = value
            }
            "meshbroker_batch_seconds_total" => out.entry(kind).or_insert_with(stat).busy_s = value,
            _ => {}
        }
    }
    out
}

/// What happened between two snapshots.
pub fn between(before: &Snapshot, after: &Snapshot) -> Snapshot {
    after
        .iter()
        .map(|(kind, a)| {
            let b = before.get(kind).cloned().unwrap_or_default();
            let stat = BatchStat {
                rounds: a.rounds - b.rounds,
                requests: a.requests - b.requests,
                busy_s: a.busy_s - b.busy_s,
            };
            (kind.clone(), stat)
        })
        .collect()
}

/// Several brokers' work added up, kind by kind.
pub fn sum<'a>(snapshots: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
    let mut out = Snapshot::new();
    for snapshot in snapshots {
        for (kind, s) in snapshot {
            let t = out.entry(kind.clone()).or_default();
            t.rounds += s.rounds;
            t.requests += s.requests;
            t.busy_s += s.busy_s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_batch_series_and_their_differences() {
        assert_eq!(
            metrics_url("ws://127.0.0.1:7900/ws").as_deref(),
            Some("http://127.0.0.1:7900/metrics")
        );
        assert_eq!(metrics_url("tcp://x"), None);
        let text = "# HELP x\nmeshbroker_batches_total{kind=\"writer\"} 10\n\
                    meshbroker_batched_requests_total{kind=\"writer\"} 500\n\
                    meshbroker_batch_seconds_total{kind=\"writer\"} 0.25\n\
                    meshbroker_actors{kind=\"writer\"} 1\n";
        let after = parse(text);
        let w = &after["writer"];
        assert_eq!((w.rounds, w.requests, w.busy_s), (10.0, 500.0, 0.25));
        let mut before = after.clone();
        before.get_mut("writer").unwrap().rounds = 4.0;
        assert_eq!(between(&before, &after)["writer"].rounds, 6.0);
    }

    #[test]
    fn sums_kind_by_kind() {
        let one = parse(
            "meshbroker_batches_total{kind=\"writer\"} 10\n\
             meshbroker_batch_seconds_total{kind=\"writer\"} 0.5\n",
        );
        let two = parse(
            "meshbroker_batches_total{kind=\"writer\"} 5\n\
             meshbroker_batches_total{kind=\"acker\"} 3\n",
        );
        let total = sum([&one, &two]);
        assert_eq!(
            (total["writer"].rounds, total["writer"].busy_s),
            (15.0, 0.5)
        );
        assert_eq!(total["acker"].rounds, 3.0);
        assert!(sum([]).is_empty());
    }
}
