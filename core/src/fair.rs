//! Fair share of a model's slots between the values of one label (`[fair_share]`): which queue
//! a job goes to, what weight a key has, and in which order a node takes the keys' jobs; and
//! each key's `[quota]` limits, matched by value or class as weights are. Pure: the puller
//! (kiln-actors `puller.rs`) does the fetching, the API (`src/api/quota.rs`) the quotas.
//!
//! Each key (a value of the label) has its own queue in each lane of a model: the subject
//! `<prefix>.jobs.<model>.<lane>.<token>` with its own durable consumer; jobs without the label
//! stay on the lane's shared subject (`<prefix>.jobs.<model>.<lane>`), one more key. A node
//! with free slots for a model asks [`FairOrder`] which keys to take them from: start-time fair
//! queueing (Goyal et al., 1996), a job of key `k` costing `1 / weight(k)` of virtual time, the
//! key with the earliest virtual start first; a key that comes back from idle starts at the
//! current virtual time, so time spent idle is not banked. The high lane's keys are all served
//! before the normal lane's (priority keeps its meaning; fairness holds within a lane).
//!
//! What is exact and what approximate (docs/ARCHITECTURE.md says the same):
//! - on one node, the jobs started of any two keys that both had work stay within one job per
//!   weight of their weighted shares (the bound of start-time fair queueing), counted in jobs,
//!   not in GPU-seconds (a model's jobs are taken as equally long);
//! - each node keeps its own order: across nodes each one is fair among the keys it sees, so
//!   the cluster's shares are fair to within about one job per key per node;
//! - a key is seen by a node when one of its jobs is published (the wake-up) or at the next
//!   idle re-check (250 ms).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::config::{FairShareConfig, KeyQuota, QuotaConfig};
use crate::protocol::Labels;

/// The longest label value used as its own token; longer values, and values with characters a
/// NATS subject or consumer name cannot hold, are hashed.
const PLAIN_TOKEN_MAX: usize = 48;

/// The token of a key's queue: `u-<value>` when the value is a plain name (letters, digits,
/// `-`, `_`, at most 48), else `h-` and 16 hex digits of its SHA-256. Never a lane's name, so
/// a keyed subject reads back unambiguously (`JobSubject::parse`).
pub fn key_token(value: &str) -> String {
    let plain =
        !value.is_empty() && value.len() <= PLAIN_TOKEN_MAX && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("u-{value}")
    } else {
        let digest = Sha256::digest(value.as_bytes());
        format!("h-{}", hex::encode(&digest[..8]))
    }
}

/// The key a token names, as shown (`kiln.api.queue`): the value itself for a plain name, the
/// token for a hashed one.
pub fn shown_key(token: &str) -> &str {
    token.strip_prefix("u-").unwrap_or(token)
}

/// The key token of a job with `labels` under `config`: `None` when fair share is off or the
/// job does not carry the key's label (it goes to the lane's shared queue).
pub fn job_key(config: &FairShareConfig, labels: &Labels) -> Option<String> {
    if config.key.is_empty() {
        return None;
    }
    labels.get(&config.key).map(|value| key_token(value))
}

/// The weight of the key with `token` (`None`: the shared queue of jobs without the label):
/// its entry in `weights` ([`by_value_or_class`]), else the default.
pub fn weight_of(config: &FairShareConfig, token: Option<&str>) -> u32 {
    token.and_then(|token| by_value_or_class(&config.weights, token)).map_or(config.default_weight, |w| *w)
}

/// The limits of the key with `token` (`crate::config::QuotaConfig`): `[quota]`'s, with its
/// entry in `quota.keys` ([`by_value_or_class`]) over them.
pub fn quota_of(config: &QuotaConfig, token: &str) -> KeyQuota {
    let defaults = config.defaults();
    by_value_or_class(&config.keys, token).map_or(defaults, |o| o.over(defaults))
}

/// The entry of `table` (by value, or by class `name*`) that applies to the key with `token`:
/// an exact value first, then the longest class the value begins with. A hashed token matches
/// exact values only (its value cannot be read back). Weights and quotas both match so.
pub fn by_value_or_class<'a, T>(table: &'a BTreeMap<String, T>, token: &str) -> Option<&'a T> {
    let Some(value) = token.strip_prefix("u-") else {
        return table.iter().find(|(name, _)| !name.ends_with('*') && key_token(name) == token).map(|(_, v)| v);
    };
    if let Some(exact) = table.get(value) {
        return Some(exact);
    }
    table
        .iter()
        .filter_map(|(name, v)| name.strip_suffix('*').filter(|prefix| value.starts_with(prefix)).map(|prefix| (prefix.len(), v)))
        .max_by_key(|(len, _)| *len)
        .map(|(_, v)| v)
}

/// What the sweep of idle queues knows of one queue consumer of `KILN_JOBS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueActivity {
    /// A fair-share key's queue (the lanes' shared ones are never removed).
    pub keyed: bool,
    pub pending: u64,
    pub ack_pending: u64,
    /// Pull requests waiting on it.
    pub waiting: u64,
    /// Since its creation, its last delivery or its last ack, whichever is latest.
    pub idle_for: std::time::Duration,
}

/// Whether a key's queue consumer may be removed: nothing queued, running or asked for, and
/// idle for `idle_after` (0: never). Its next job makes it again (`Resources::keyed_consumer`).
pub fn removable(q: &QueueActivity, idle_after: std::time::Duration) -> bool {
    !idle_after.is_zero() && q.keyed && q.pending == 0 && q.ack_pending == 0 && q.waiting == 0 && q.idle_for >= idle_after
}

/// One key's place in the order.
#[derive(Debug, Clone, PartialEq)]
struct Flow {
    weight: f64,
    /// The virtual time its next job starts at.
    start: f64,
    /// It may hold jobs: seen published, or listed by a re-check, and not found empty since.
    backlogged: bool,
}

/// The order in which one node takes one lane's keys ([module docs](self)). `K` names a key.
#[derive(Debug, Clone)]
pub struct FairOrder<K: Ord + Clone> {
    flows: BTreeMap<K, Flow>,
    /// The virtual start of the job taken last: where a key back from idle starts.
    clock: f64,
}

impl<K: Ord + Clone> Default for FairOrder<K> {
    fn default() -> Self {
        FairOrder { flows: BTreeMap::new(), clock: 0.0 }
    }
}

impl<K: Ord + Clone> FairOrder<K> {
    /// `key` may hold jobs now (with `weight`, which may have changed). A key that was idle
    /// starts at the current virtual time, never earlier: idleness is not saved up.
    pub fn backlogged(&mut self, key: K, weight: u32) {
        let clock = self.clock;
        let flow = self.flows.entry(key).or_insert(Flow { weight: 1.0, start: clock, backlogged: false });
        flow.weight = f64::from(weight.max(1));
        if !flow.backlogged {
            flow.start = flow.start.max(clock);
            flow.backlogged = true;
        }
    }

    /// `key` holds no job now (a fetch came back short).
    pub fn idle(&mut self, key: &K) {
        if let Some(flow) = self.flows.get_mut(key) {
            flow.backlogged = false;
        }
    }

    /// Whether any key may hold jobs.
    pub fn any_backlogged(&self) -> bool {
        self.flows.values().any(|f| f.backlogged)
    }

    /// Every key it keeps (backlogged or not).
    pub fn known_keys(&self) -> Vec<K> {
        self.flows.keys().cloned().collect()
    }

    /// The keys that may hold jobs.
    pub fn backlogged_keys(&self) -> Vec<K> {
        self.flows.iter().filter(|(_, f)| f.backlogged).map(|(k, _)| k.clone()).collect()
    }

    /// Shares `slots` out between the backlogged keys, one at a time to the key with the
    /// earliest virtual start (ties to the smallest key): how many jobs to take from each, in
    /// the order first chosen. Each job taken advances its key by `1 / weight`.
    pub fn take(&mut self, slots: usize) -> Vec<(K, usize)> {
        let mut taken: Vec<(K, usize)> = vec![];
        for _ in 0..slots {
            let Some((key, flow)) = self
                .flows
                .iter_mut()
                .filter(|(_, f)| f.backlogged)
                .min_by(|(ka, a), (kb, b)| a.start.total_cmp(&b.start).then_with(|| ka.cmp(kb)))
            else {
                break;
            };
            self.clock = self.clock.max(flow.start);
            flow.start += 1.0 / flow.weight;
            match taken.iter_mut().find(|(k, _)| k == key) {
                Some((_, n)) => *n += 1,
                None => taken.push((key.clone(), 1)),
            }
        }
        taken
    }

    /// `key` had `unused` of the jobs [`take`](Self::take) gave it left over (its queue had
    /// fewer): their virtual time goes back, and the key is idle.
    pub fn returned(&mut self, key: &K, unused: usize) {
        if let Some(flow) = self.flows.get_mut(key) {
            flow.start -= unused as f64 / flow.weight;
            flow.backlogged = false;
        }
    }

    /// Forgets the keys idle for good (none backlogged is kept); bounds the memory to the keys
    /// seen since the last call. Their virtual starts are not needed: one coming back starts at
    /// the clock anyway.
    pub fn forget_idle(&mut self) {
        let clock = self.clock;
        self.flows.retain(|_, f| f.backlogged || f.start > clock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(weights: &[(&str, u32)]) -> FairShareConfig {
        FairShareConfig { weights: weights.iter().map(|(k, w)| (k.to_string(), *w)).collect(), ..Default::default() }
    }

    #[test]
    fn a_plain_value_is_its_own_token_and_any_other_is_hashed() {
        assert_eq!(key_token("alice"), "u-alice");
        assert_eq!(key_token("user_42-b"), "u-user_42-b");
        for odd in ["a.b", "a b", "*", ">", "ü", &"x".repeat(49), ""] {
            let token = key_token(odd);
            assert!(token.starts_with("h-") && token.len() == 18, "{odd:?}: {token}");
        }
        assert_ne!(key_token("a.b"), key_token("a.c"));
        let labels: Labels = [("user_id".to_string(), "bob".to_string())].into();
        assert_eq!(job_key(&FairShareConfig::default(), &labels).as_deref(), Some("u-bob"));
        assert_eq!(job_key(&FairShareConfig::default(), &Labels::new()), None);
        assert_eq!(job_key(&FairShareConfig { key: String::new(), ..Default::default() }, &labels), None);
    }

    #[test]
    fn weights_by_value_then_longest_class_then_default() {
        let c = config(&[("alice", 3), ("team-*", 2), ("team-gpu-*", 5), ("a.b", 7)]);
        assert_eq!(weight_of(&c, Some("u-alice")), 3);
        assert_eq!(weight_of(&c, Some("u-team-x")), 2);
        assert_eq!(weight_of(&c, Some("u-team-gpu-1")), 5);
        assert_eq!(weight_of(&c, Some("u-bob")), 1);
        assert_eq!(weight_of(&c, Some(&key_token("a.b"))), 7);
        assert_eq!(weight_of(&c, None), 1);
    }

    #[test]
    fn quotas_match_like_weights_and_an_override_keeps_what_it_leaves_out() {
        let over = |max_queued: Option<u64>, max_running: Option<u64>| crate::config::QuotaOverride {
            max_queued,
            max_running,
            ..Default::default()
        };
        let config = QuotaConfig {
            max_queued: 100,
            max_running: 8,
            submits_per_s: 5.0,
            burst: 10,
            keys: [
                ("free-*".to_string(), over(Some(10), None)),
                ("free-trial-*".to_string(), over(Some(1), Some(1))),
                ("free-vip".to_string(), over(None, Some(0))),
                ("a.b".to_string(), over(Some(3), None)),
            ]
            .into(),
        };
        let limits = |value: &str| quota_of(&config, &key_token(value));
        assert_eq!(limits("bob"), config.defaults());
        assert_eq!(limits("free-x"), KeyQuota { max_queued: 10, ..config.defaults() }, "a class; the rest kept");
        assert_eq!(limits("free-trial-1"), KeyQuota { max_queued: 1, max_running: 1, ..config.defaults() }, "the longest class");
        assert_eq!(limits("free-vip"), KeyQuota { max_running: 0, ..config.defaults() }, "an exact value over any class");
        assert_eq!(limits("a.b").max_queued, 3, "a hashed value matches exactly");
        assert_eq!(limits("a.c"), config.defaults());
    }

    #[test]
    fn a_key_back_from_idle_does_not_jump_the_queue_with_saved_time() {
        let mut order = FairOrder::default();
        order.backlogged("a", 1);
        assert_eq!(order.take(100), vec![("a", 100)]);
        // b arrives after a took 100: it alternates with a from now on, not 100 in a row.
        order.backlogged("b", 1);
        let next = order.take(10);
        assert_eq!(next.iter().map(|(_, n)| n).sum::<usize>(), 10);
        assert!(next.iter().all(|(_, n)| *n == 5), "{next:?}");
    }

    #[test]
    fn a_short_fetch_gives_its_time_back() {
        let mut order = FairOrder::default();
        order.backlogged("a", 1);
        order.backlogged("b", 1);
        assert_eq!(order.take(4), vec![("a", 2), ("b", 2)]);
        order.returned(&"b", 1);
        assert_eq!(order.take(2), vec![("a", 2)]);
        order.backlogged("b", 1);
        // b, a job behind a's share now, goes first.
        assert_eq!(order.take(1), vec![("b", 1)]);
    }

    #[test]
    fn only_an_idle_empty_keyed_queue_is_removed() {
        let idle = QueueActivity { keyed: true, pending: 0, ack_pending: 0, waiting: 0, idle_for: std::time::Duration::from_secs(700) };
        let ten_minutes = std::time::Duration::from_secs(600);
        assert!(removable(&idle, ten_minutes));
        assert!(!removable(&idle, std::time::Duration::ZERO), "0 keeps them");
        assert!(!removable(&QueueActivity { keyed: false, ..idle }, ten_minutes), "a lane's shared queue stays");
        assert!(!removable(&QueueActivity { pending: 1, ..idle }, ten_minutes));
        assert!(!removable(&QueueActivity { ack_pending: 1, ..idle }, ten_minutes), "a job of it runs");
        assert!(!removable(&QueueActivity { waiting: 1, ..idle }, ten_minutes));
        assert!(!removable(&QueueActivity { idle_for: std::time::Duration::from_secs(599), ..idle }, ten_minutes));
    }

    proptest! {
        /// Keys that stay backlogged get jobs in proportion to their weights, within one job
        /// per weight (start-time fair queueing's bound), however the slots come in.
        #[test]
        fn backlogged_keys_share_by_weight(weights in proptest::collection::vec(1u32..6, 1..6), rounds in proptest::collection::vec(1usize..9, 1..200)) {
            let mut order = FairOrder::default();
            for (k, w) in weights.iter().enumerate() {
                order.backlogged(k, *w);
            }
            let mut served = vec![0usize; weights.len()];
            for slots in rounds {
                let taken = order.take(slots);
                prop_assert_eq!(taken.iter().map(|(_, n)| n).sum::<usize>(), slots);
                for (k, n) in taken {
                    served[k] += n;
                }
            }
            for i in 0..weights.len() {
                for j in 0..weights.len() {
                    let (wi, wj) = (f64::from(weights[i]), f64::from(weights[j]));
                    let gap = served[i] as f64 / wi - served[j] as f64 / wj;
                    prop_assert!(gap <= 1.0 / wi + 1.0 / wj + 1e-9, "{served:?} by {weights:?}");
                }
            }
        }

        /// Nothing goes to a key that is idle, and every slot goes somewhere while one is not.
        #[test]
        fn only_backlogged_keys_are_given_slots(events in proptest::collection::vec((0usize..4, 0u8..3, 1usize..5), 1..100)) {
            let mut order = FairOrder::default();
            for (key, what, n) in events {
                match what {
                    0 => order.backlogged(key, 1 + key as u32),
                    1 => order.idle(&key),
                    _ => {
                        let backlogged = order.backlogged_keys();
                        let taken = order.take(n);
                        prop_assert!(taken.iter().all(|(k, _)| backlogged.contains(k)));
                        let given: usize = taken.iter().map(|(_, n)| n).sum();
                        prop_assert_eq!(given, if backlogged.is_empty() { 0 } else { n });
                    }
                }
            }
        }
    }
}
