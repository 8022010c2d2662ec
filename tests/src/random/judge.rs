//! The router's answer judged against one Postgres holding every row: the
//! same, refused, or wrong; and the tally of answers and refusals per feature.

use std::collections::BTreeMap;
use std::fmt;

use tokio_postgres::Client;

use super::answer::{Answer, Protocol};
use super::query::{Feature, Query};

#[derive(Debug)]
pub enum Verdict {
    Same,
    /// Refused with 0A000 (the message): what the router cannot answer
    /// exactly.
    Refused(String),
    /// A different answer, another error, or a refusal of a read that runs
    /// on one shard as it is: the query and both answers.
    Wrong(String),
}

/// Runs `q` on the single server and through the router in `protocol`.
pub async fn judge(single: &Client, router: &Client, q: &Query, protocol: Protocol) -> Verdict {
    let want = Answer::of(single, q, protocol).await.normalized(q);
    let got = Answer::of(router, q, protocol).await.normalized(q);
    let sql = match protocol {
        Protocol::Simple => q.simple_sql(),
        Protocol::Extended => format!("{} with {:?}", q.sql, q.params),
    };
    let wrong = |what: &str| {
        Verdict::Wrong(format!("{what} ({protocol:?} protocol)\nquery: {sql}\none Postgres: {want}\nrouter: {got}"))
    };
    if want.sqlstate().is_some() {
        return wrong("one Postgres failed the query: the generator wrote a bad query");
    }
    match got.sqlstate() {
        None if got == want => Verdict::Same,
        None => wrong("the router's answer differs"),
        Some("0A000") if POSTGRES_0A000.contains(&got.message()) => wrong("a shard failed the query"),
        Some("0A000") if !q.one_tenant => Verdict::Refused(got.message().to_string()),
        Some("0A000") => wrong("the router refused a read of one tenant"),
        Some(_) => wrong("the router failed the query"),
    }
}

/// Errors of Postgres's own with SQLSTATE 0A000, which are no refusal of the
/// router's: one Postgres answered the same query.
const POSTGRES_0A000: &[&str] = &["cached plan must not change result type"];

/// Answers and refusals, per protocol and feature.
#[derive(Default)]
pub struct Tally {
    /// (protocol, feature or None for all queries) → [answered, refused].
    counts: BTreeMap<(Protocol, Option<Feature>), [u64; 2]>,
    /// Queries of the grammar merged today, without a tenant: [answered, refused].
    merged_today: BTreeMap<Protocol, [u64; 2]>,
    /// Why reads were refused: the start of each message, and how often.
    reasons: BTreeMap<String, u64>,
}

impl Tally {
    /// Counts a query's verdict in one protocol (a wrong one is not counted).
    pub fn count(&mut self, q: &Query, protocol: Protocol, verdict: &Verdict) {
        let refused = match verdict {
            Verdict::Same => false,
            Verdict::Refused(why) => {
                // Names in quotes aside, so that one reason counts once.
                let reason: String =
                    why.split('"').step_by(2).collect::<Vec<_>>().join("\"…\"").chars().take(70).collect();
                *self.reasons.entry(reason).or_default() += 1;
                true
            }
            Verdict::Wrong(_) => return,
        };
        let i = usize::from(refused);
        self.counts.entry((protocol, None)).or_default()[i] += 1;
        for f in &q.features {
            self.counts.entry((protocol, Some(*f))).or_default()[i] += 1;
        }
        if q.merged_today() && !q.one_tenant {
            self.merged_today.entry(protocol).or_default()[i] += 1;
        }
    }

    /// The share of cross-shard reads of today's grammar that were answered.
    pub fn answered_share(&self, protocol: Protocol) -> f64 {
        let [answered, refused] = self.merged_today.get(&protocol).copied().unwrap_or_default();
        answered as f64 / (answered + refused).max(1) as f64
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<28} {:>18} {:>18}", "answered / refused", "simple", "extended")?;
        let mut rows: Vec<Option<Feature>> = self.counts.keys().map(|(_, feature)| *feature).collect();
        rows.sort();
        rows.dedup();
        let cell = |p: Protocol, feature: Option<Feature>| {
            let [a, r] = self.counts.get(&(p, feature)).copied().unwrap_or_default();
            format!("{a} / {r}")
        };
        for feature in rows {
            let name = feature.map_or("all queries".to_string(), |f| format!("{f:?}"));
            writeln!(
                f,
                "{name:<28} {:>18} {:>18}",
                cell(Protocol::Simple, feature),
                cell(Protocol::Extended, feature)
            )?;
        }
        let share = |p| format!("{:.0}%", 100.0 * self.answered_share(p));
        writeln!(
            f,
            "{:<28} {:>18} {:>18}",
            "answered, today's grammar",
            share(Protocol::Simple),
            share(Protocol::Extended)
        )?;
        let mut reasons: Vec<(&String, &u64)> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        writeln!(f, "refusals, by reason:")?;
        for (reason, n) in reasons {
            writeln!(f, "{n:>8}  {reason}")?;
        }
        Ok(())
    }
}
