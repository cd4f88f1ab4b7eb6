//! The invariants of a chaos run, read back from NATS after the storm: the job records (through
//! the API), every event in `KILN_EVENTS` (one ordered pass), the artifacts (downloaded and
//! hashed), the batches and the registry.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{ClusterReply, Event, EventKind, GpuState, JobView};

use super::{Accepted, FaultKind, InjectedFault, Invariant, Profile};
use kiln_client::Client;

/// How long the registry may take to show the truth again once every job has ended.
pub const REGISTRY_BOUND_MS: u64 = 10_000;
/// How long a SIGKILLed node may still be shown alive (loss detection is 1 s in the chaos
/// cluster, plus a tick, plus the claim).
pub const DEAD_NODE_BOUND_MS: u64 = 5_000;

#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    /// Jobs that needed more than one attempt.
    pub retried: u32,
    pub completed: u32,
    pub failed: BTreeMap<String, u32>,
    pub cancelled: u32,
}

pub struct Checker {
    client: Client,
    dir: PathBuf,
    pub outcomes: Outcomes,
}

/// What is wrong with the registry now, for a cluster whose nodes should all be up and idle.
pub fn registry_problems(c: &ClusterReply, profile: &Profile, names: &[String]) -> Vec<String> {
    let mut problems = vec![];
    for name in names {
        if !c.nodes.iter().any(|n| &n.node == name) {
            problems.push(format!("node {name} is missing"));
        }
        let slots = c.gpus.iter().filter(|g| &g.node == name && g.state != GpuState::Dead).count();
        if slots != profile.slots_per_node {
            problems.push(format!("node {name} shows {slots} live slots"));
        }
    }
    for n in &c.nodes {
        if !names.contains(&n.node) {
            problems.push(format!("unknown node {} shown alive", n.node));
        }
        if n.running_jobs != 0 {
            problems.push(format!("node {} shows {} running jobs with nothing left to run", n.node, n.running_jobs));
        }
    }
    for g in &c.gpus {
        if g.state == GpuState::Busy || g.current_job.is_some() {
            problems.push(format!("{}/{} shows {:?} with job {:?} though every job has ended", g.node, g.slot, g.state, g.current_job));
        }
    }
    problems
}

/// What is wrong with one job's history, against its record.
#[derive(Debug, Default)]
pub struct HistoryCheck {
    /// Not exactly one terminal event, or one that disagrees with the record.
    pub endings: Vec<String>,
    /// Missing or out-of-order events.
    pub order: Vec<String>,
    /// Events of an older (fenced) attempt stored after the ending: allowed, counted.
    pub stale_after_end: u32,
    /// Events of an older attempt stored after a newer attempt's: allowed, counted.
    pub interleaved: u32,
}

/// Checks one job's event history (in stream order) against its record: one ending that
/// matches the record; `queued` first; the ending attempt's events begin with its `running`;
/// nothing from the ending attempt or a later one after the ending; a completed job's
/// completing attempt has its `running` event and announced every artifact the record holds,
/// with the same sha256. Events of older, fenced attempts may come late; they are counted.
pub fn check_history(id: &str, view: &JobView, history: &[Event]) -> HistoryCheck {
    let mut c = HistoryCheck::default();
    let terminals: Vec<&Event> = history.iter().filter(|e| e.is_terminal()).collect();
    if terminals.len() != 1 {
        c.endings.push(format!("{id} has {} terminal events", terminals.len()));
        return c;
    }
    let end = terminals[0];
    if end.status != Some(view.status) {
        c.endings.push(format!("{id}: record says {}, its last event {:?}", view.status.as_str(), end.status));
    }
    match history.first() {
        Some(first) if first.kind == EventKind::Status && first.status == Some(JobState::Queued) && first.attempt == 0 => {}
        other => c.order.push(format!("{id} does not start with queued: {:?}", other.map(|e| (e.kind, e.status)))),
    }
    let end_at = history.iter().position(|e| e.is_terminal()).expect("one terminal");
    for e in &history[end_at + 1..] {
        if e.attempt >= end.attempt && e.attempt != 0 {
            c.order.push(format!("{id}: an event of attempt {} after the end ({:?})", e.attempt, e.kind));
        } else {
            c.stale_after_end += 1;
        }
    }
    // Attempts may interleave when one is taken over (PROTOCOL.md): a fenced older attempt
    // can still publish, even late. Those are counted; the ending attempt's own events must
    // begin with its `running` and end with the ending.
    let mut newest = 0;
    for e in &history[..end_at] {
        if e.attempt != 0 && e.attempt < newest {
            c.interleaved += 1;
        }
        newest = newest.max(e.attempt);
    }
    if end.attempt > 0 {
        // Its `retrying` event (why it runs) comes just before its `running`.
        let own: Vec<&Event> = history.iter().filter(|e| e.attempt == end.attempt && e.kind != EventKind::Retrying).collect();
        if own.first().is_some_and(|e| !(e.kind == EventKind::Status && e.status == Some(JobState::Running))) {
            c.order.push(format!("{id}: attempt {} does not begin with its running event", end.attempt));
        }
    }
    if view.status == JobState::Completed {
        if !history.iter().any(|e| e.status == Some(JobState::Running) && e.attempt == view.attempt) {
            c.order.push(format!("{id}: no running event for its completing attempt {}", view.attempt));
        }
        for a in &view.artifacts {
            let announced = history.iter().any(|e| {
                e.kind == EventKind::Artifact && e.attempt == view.attempt && e.artifact.as_ref().is_some_and(|x| x.sha256 == a.sha256)
            });
            if !announced {
                c.order.push(format!("{id}: artifact {} never announced by attempt {}", a.name, view.attempt));
            }
        }
    }
    c
}

/// Every SIGTERM sent to a node during its start-up ended in a drain: exit 0.
pub fn stop_signals_drained(faults: &[InjectedFault]) -> Invariant {
    let terms: Vec<&InjectedFault> = faults.iter().filter(|f| f.fault.kind == FaultKind::StartupTerm && f.skipped.is_empty()).collect();
    let problems = terms
        .iter()
        .filter(|f| f.exit_code != Some(0))
        .map(|f| match f.exit_code {
            Some(i32::MIN) => format!("{} did not exit within 30 s of SIGTERM {} ms into its start-up", f.target, f.fault.duration_ms),
            Some(code) => format!("{} exited {code} after SIGTERM {} ms into its start-up", f.target, f.fault.duration_ms),
            None => format!("{}: no exit code recorded", f.target),
        })
        .collect();
    invariant("every stop signal is a drain", problems, format!("{} nodes SIGTERMed during start-up each exited 0", terms.len()))
}

pub fn invariant(name: &str, problems: Vec<String>, ok_detail: String) -> Invariant {
    let ok = problems.is_empty();
    let detail = if ok {
        ok_detail
    } else {
        let shown: Vec<String> = problems.iter().take(10).cloned().collect();
        format!("{} problems: {}{}", problems.len(), shown.join("; "), if problems.len() > 10 { "; ..." } else { "" })
    };
    Invariant { name: name.into(), ok, detail }
}

impl Checker {
    pub fn new(client: Client, dir: &Path) -> Checker {
        Checker { client, dir: dir.to_path_buf(), outcomes: Outcomes::default() }
    }

    /// Every event in the events stream, grouped by job (or batch) id, in stream order.
    async fn all_events(&self) -> Result<HashMap<String, Vec<Event>>, String> {
        let js = async_nats::jetstream::new(self.client.nats().clone());
        let mut stream = js.get_stream("KILN_EVENTS").await.map_err(|e| e.to_string())?;
        let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
        let mut by_id: HashMap<String, Vec<Event>> = HashMap::new();
        if last == 0 {
            return Ok(by_id);
        }
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: "kiln.events.>".into(),
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next()).await;
            let Ok(Some(Ok(m))) = next else { return Err("the events stream stopped before its end".into()) };
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(last);
            if let Ok(e) = serde_json::from_slice::<Event>(&m.payload) {
                by_id.entry(e.job_id.clone()).or_default().push(e);
            }
            if seq >= last {
                return Ok(by_id);
            }
        }
    }

    pub async fn check_all(
        &mut self,
        accepted: &[Accepted],
        faults: &[InjectedFault],
        profile: &Profile,
        names: &[String],
        registry_converged: bool,
        registry_converged_ms: u64,
    ) -> Vec<Invariant> {
        let mut out = vec![];
        let client = self.client.clone().with_timeout(std::time::Duration::from_secs(10));

        // The records, through the API, as a client sees them.
        let ids: Vec<(String, usize, usize)> = accepted
            .iter()
            .enumerate()
            .flat_map(|(a, acc)| acc.job_ids.iter().enumerate().map(move |(i, id)| (id.clone(), a, i)))
            .collect();
        let reads: Vec<_> = ids.iter().map(|(id, _, _)| client.status(id)).collect();
        let views: Vec<_> = futures::stream::iter(reads).buffered(16).collect().await;
        let mut jobs: HashMap<String, JobView> = HashMap::new();
        let mut missing = vec![];
        for ((id, _, _), v) in ids.iter().zip(views) {
            match v {
                Ok(v) => {
                    jobs.insert(id.clone(), v);
                }
                Err(e) => missing.push(format!("{id}: {e}")),
            }
        }
        let open: Vec<String> =
            jobs.values().filter(|v| !v.status.is_terminal()).map(|v| format!("{} is {}", v.job_id, v.status.as_str())).collect();
        let mut problems = missing;
        problems.extend(open);
        out.push(invariant(
            "every accepted job reached a terminal state",
            problems,
            format!("{} of {} jobs ended (completed, failed with a reason, or cancelled)", jobs.len(), ids.len()),
        ));
        for v in jobs.values() {
            match v.status {
                JobState::Completed => self.outcomes.completed += 1,
                JobState::Cancelled => self.outcomes.cancelled += 1,
                JobState::Failed => {
                    let code = v.error.as_ref().map(|e| e.code.as_str()).unwrap_or("no error recorded");
                    *self.outcomes.failed.entry(code.to_string()).or_insert(0) += 1;
                }
                _ => {}
            }
        }
        let unexplained: Vec<String> = jobs
            .values()
            .filter(|v| matches!(v.status, JobState::Failed | JobState::Cancelled) && v.error.as_ref().is_none_or(|e| e.message.is_empty()))
            .map(|v| v.job_id.clone())
            .collect();
        out.push(invariant("every failed or cancelled job says why", unexplained, "each has a coded error with a message".into()));

        // The histories.
        let events = match self.all_events().await {
            Ok(e) => e,
            Err(e) => {
                out.push(Invariant { name: "event histories readable".into(), ok: false, detail: e });
                return out;
            }
        };
        let mut two_endings = vec![];
        let mut history_problems = vec![];
        let mut stale_after_end = 0u32;
        let mut interleaved = 0u32;
        for (id, view) in &jobs {
            let history = events.get(id).map(Vec::as_slice).unwrap_or(&[]);
            let check = check_history(id, view, history);
            two_endings.extend(check.endings);
            history_problems.extend(check.order);
            stale_after_end += check.stale_after_end;
            interleaved += check.interleaved;
            if view.attempt > 1 {
                self.outcomes.retried += 1;
            }
        }
        out.push(invariant(
            "no job has two terminal states",
            two_endings,
            format!("{} histories, each with exactly one ending, matching its record", jobs.len()),
        ));
        out.push(invariant(
            "every event history is complete and ordered",
            history_problems,
            format!(
                "queued first, one ending, the ending attempt's events begin with its running, a completed job's artifacts announced; fenced older attempts: {interleaved} events after a newer attempt's, {stale_after_end} after the ending"
            ),
        ));

        // Visible results: one set per completed job, none for the others.
        let mut visible = vec![];
        for v in jobs.values() {
            let mut names: Vec<&str> = v.artifacts.iter().map(|a| a.name.as_str()).collect();
            let n = names.len();
            names.sort_unstable();
            names.dedup();
            if names.len() != n {
                visible.push(format!("{} shows two results under one name", v.job_id));
            }
            if v.status != JobState::Completed && n > 0 {
                visible.push(format!("{} is {} but shows {n} results", v.job_id, v.status.as_str()));
            }
            if v.status == JobState::Completed && n == 0 {
                visible.push(format!("{} completed without a result", v.job_id));
            }
        }
        out.push(invariant("no job shows two results", visible, "one set of artifacts per completed job, none otherwise".into()));

        // Every artifact downloads with the sha256 recorded, and equal inputs gave equal bytes.
        let mut downloads = vec![];
        for acc in accepted {
            for (i, id) in acc.job_ids.iter().enumerate() {
                let Some(v) = jobs.get(id) else { continue };
                for a in &v.artifacts {
                    downloads.push((acc.inputs[i].clone(), a.clone(), self.dir.join("artifacts").join(id).join(&a.name)));
                }
            }
        }
        let fetches: Vec<_> = downloads.iter().map(|(_, a, dest)| client.download(a, dest)).collect();
        let results: Vec<_> = futures::stream::iter(fetches).buffered(16).collect().await;
        let mut sha_problems = vec![];
        let mut by_input: HashMap<(String, u64), String> = HashMap::new();
        for ((input, a, _), r) in downloads.iter().zip(results) {
            if let Err(e) = r {
                sha_problems.push(format!("{}: {e}", a.object));
            }
            if a.name.ends_with(".png") {
                match by_input.get(input) {
                    Some(sha) if sha != &a.sha256 => sha_problems.push(format!("{:?}: two different images for one input", input)),
                    Some(_) => {}
                    None => {
                        by_input.insert(input.clone(), a.sha256.clone());
                    }
                }
            }
        }
        out.push(invariant(
            "every artifact's sha256 matches what the engine produced",
            sha_problems,
            format!(
                "{} artifacts downloaded and hashed, each equal to its recorded sha256; equal inputs gave equal images across nodes and attempts ({} distinct inputs)",
                downloads.len(),
                by_input.len()
            ),
        ));

        // Batches: finished, counted right, their histories whole.
        let mut batch_problems = vec![];
        let mut batches = 0;
        for acc in accepted {
            let Some(batch_id) = &acc.batch_id else { continue };
            batches += 1;
            let b = match client.batch(batch_id).await {
                Ok(b) => b,
                Err(e) => {
                    batch_problems.push(format!("{batch_id}: {e}"));
                    continue;
                }
            };
            let states: Vec<JobState> = b.items.iter().map(|i| i.status).collect();
            let count = |s: JobState| states.iter().filter(|x| **x == s).count() as u32;
            let s = b.summary;
            if (s.completed, s.failed, s.cancelled) != (count(JobState::Completed), count(JobState::Failed), count(JobState::Cancelled)) {
                batch_problems.push(format!("{batch_id}: summary {s:?} does not match its items {states:?}"));
            }
            let history = events.get(batch_id).map(Vec::as_slice).unwrap_or(&[]);
            match history.split_last() {
                Some((last, items)) if last.kind == EventKind::BatchFinished => {
                    // `batch_progress` events come between the items' (at most one per item).
                    let mut seen: Vec<u32> = items.iter().filter_map(|e| e.item.as_ref().map(|i| i.index)).collect();
                    seen.sort_unstable();
                    let expected: Vec<u32> = b.items.iter().map(|i| i.index).collect();
                    let others = items.iter().filter(|e| e.item.is_none() && e.kind != EventKind::BatchProgress).count();
                    if seen != expected || others > 0 {
                        batch_problems.push(format!("{batch_id}: item events {seen:?}, items {expected:?}"));
                    }
                    if last.summary != Some(s) {
                        batch_problems.push(format!("{batch_id}: batch_finished says {:?}, the batch {s:?}", last.summary));
                    }
                }
                _ => batch_problems.push(format!("{batch_id}: history does not end with batch_finished")),
            }
        }
        out.push(invariant(
            "every batch ended with one event per item and a true summary",
            batch_problems,
            format!("{batches} batches checked"),
        ));

        // The registry.
        let mut registry = vec![];
        if !registry_converged {
            let now = client.cluster().await.map(|c| registry_problems(&c, profile, names)).unwrap_or_else(|e| vec![e.to_string()]);
            registry.extend(now);
        } else if registry_converged_ms > REGISTRY_BOUND_MS {
            registry.push(format!("took {registry_converged_ms} ms (bound {REGISTRY_BOUND_MS} ms)"));
        }
        out.push(invariant(
            "the registry converged: every node up, no slot busy without a job",
            registry,
            format!("within {registry_converged_ms} ms of the last job ending (bound {REGISTRY_BOUND_MS} ms)"),
        ));
        let kills: Vec<&InjectedFault> = faults.iter().filter(|f| f.fault.kind == FaultKind::NodeKill && f.skipped.is_empty()).collect();
        let worst = kills.iter().filter_map(|f| f.dead_visible_ms).max().unwrap_or(0);
        let shown_alive: Vec<String> = kills
            .iter()
            .filter(|f| f.dead_visible_ms.is_none_or(|ms| ms > DEAD_NODE_BOUND_MS))
            .map(|f| format!("{} shown alive for {:?} ms after its SIGKILL", f.target, f.dead_visible_ms))
            .collect();
        out.push(invariant(
            "no dead node is shown alive",
            shown_alive,
            format!("{} killed nodes each gone from the registry within {worst} ms (bound {DEAD_NODE_BOUND_MS} ms)", kills.len()),
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::protocol::{Artifact, GpuEntry, NodeEntry};
    use kiln_core::retry_reason::RetryReason;

    fn view(status: JobState, attempt: u32, artifacts: Vec<Artifact>) -> JobView {
        JobView {
            job_id: "j".into(),
            model: "m".into(),
            status,
            attempt,
            max_attempts: 3,
            priority: 0,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            node: None,
            slot: None,
            error: None,
            artifacts,
            cancel_requested: false,
            dead_letter: false,
            labels: Default::default(),
            stage: None,
            progress: None,
            pending: None,
            batch: None,
            inputs: Default::default(),
            params: Default::default(),
        }
    }

    fn artifact(sha: &str) -> Artifact {
        Artifact {
            name: "image.png".into(),
            bucket: "b".into(),
            object: "j/image.png".into(),
            size: 1,
            content_type: "image/png".into(),
            sha256: sha.into(),
        }
    }

    fn good_history() -> Vec<Event> {
        vec![
            Event::status("j", 0, JobState::Queued),
            Event::status("j", 1, JobState::Running),
            Event::status("j", 1, JobState::Retrying),
            // Why attempt 2 runs, just before its `running` (issue 23 item 7).
            Event::retrying("j", 2, RetryReason::WorkerCrashed, "attempt 1 failed".into(), None),
            Event::status("j", 2, JobState::Running),
            Event::artifact("j", 2, artifact("aa")),
            Event::status("j", 2, JobState::Completed),
        ]
    }

    #[test]
    fn a_whole_history_passes_and_a_late_event_of_a_fenced_attempt_is_only_counted() {
        let v = view(JobState::Completed, 2, vec![artifact("aa")]);
        let c = check_history("j", &v, &good_history());
        assert!(c.endings.is_empty() && c.order.is_empty(), "{c:?}");
        let mut h = good_history();
        h.push(Event::message("j", 1, "the fenced attempt 1 still talking".into()));
        let c = check_history("j", &v, &h);
        assert!(c.order.is_empty() && c.stale_after_end == 1, "{c:?}");
    }

    #[test]
    fn each_broken_history_is_caught() {
        let v = view(JobState::Completed, 2, vec![artifact("aa")]);
        let mut two_ends = good_history();
        two_ends.push(Event::status("j", 2, JobState::Failed));
        assert_eq!(check_history("j", &v, &two_ends).endings.len(), 1, "two terminal events");
        let no_end: Vec<Event> = good_history().into_iter().take(6).collect();
        assert_eq!(check_history("j", &v, &no_end).endings.len(), 1, "no terminal event");
        let disagrees = view(JobState::Failed, 2, vec![]);
        assert_eq!(check_history("j", &disagrees, &good_history()).endings.len(), 1, "the record says otherwise");
        let no_queued: Vec<Event> = good_history().into_iter().skip(1).collect();
        assert_eq!(check_history("j", &v, &no_queued).order.len(), 1, "queued missing");
        let mut after_end = good_history();
        after_end.push(Event::progress("j", 2, None, Some(50.0)));
        assert_eq!(check_history("j", &v, &after_end).order.len(), 1, "the ending attempt went on");
        let other_sha = view(JobState::Completed, 2, vec![artifact("bb")]);
        assert_eq!(check_history("j", &other_sha, &good_history()).order.len(), 1, "an artifact never announced");
        let mut late_old = good_history();
        late_old.insert(5, Event::message("j", 1, "fenced attempt 1, late".into()));
        let c = check_history("j", &v, &late_old);
        assert!(c.order.is_empty() && c.interleaved == 1, "a fenced attempt's late event is counted, not an error: {c:?}");
        let mut no_running: Vec<Event> = good_history();
        no_running.remove(4);
        assert!(!check_history("j", &v, &no_running).order.is_empty(), "the ending attempt without its running event");
        let mut progress_first = good_history();
        progress_first.insert(4, Event::progress("j", 2, None, Some(10.0)));
        assert_eq!(check_history("j", &v, &progress_first).order.len(), 1, "attempt 2 progressed before it ran");
    }

    #[test]
    fn the_registry_check_sees_a_busy_slot_a_missing_node_and_a_ghost() {
        let profile = Profile { slots_per_node: 1, ..Profile::short() };
        let names = vec!["a".to_string(), "b".to_string()];
        let gpu = |node: &str, state: GpuState, job: Option<&str>| GpuEntry {
            node: node.into(),
            slot: "cpu:0".into(),
            state,
            models: vec![],
            warm_models: vec![],
            current_job: job.map(str::to_string),
            restarts: 0,
            last_error: None,
            heartbeat_ms: 0,
            group: vec![],
            memory_budget_bytes: 0,
            resident: vec![],
        };
        let node = |name: &str| NodeEntry {
            node: name.into(),
            version: "0".into(),
            slots: vec!["cpu:0".into()],
            started_ms: 0,
            heartbeat_ms: 0,
            running_jobs: 0,
            peers: vec![],
            models: vec![],
        };
        let fine =
            ClusterReply { nodes: vec![node("a"), node("b")], gpus: vec![gpu("a", GpuState::Idle, None), gpu("b", GpuState::Idle, None)] };
        assert!(registry_problems(&fine, &profile, &names).is_empty());
        let busy = ClusterReply { gpus: vec![gpu("a", GpuState::Busy, Some("j")), gpu("b", GpuState::Idle, None)], ..fine.clone() };
        assert_eq!(registry_problems(&busy, &profile, &names).len(), 1);
        let missing = ClusterReply { nodes: vec![node("a")], gpus: vec![gpu("a", GpuState::Idle, None)] };
        assert_eq!(registry_problems(&missing, &profile, &names).len(), 2, "node b and its slot");
        let ghost = ClusterReply { nodes: vec![node("a"), node("b"), node("zombie")], ..fine.clone() };
        assert_eq!(registry_problems(&ghost, &profile, &names).len(), 1);
    }
}
