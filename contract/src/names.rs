//! Every subject, stream and bucket name Kiln uses, derived from one prefix (default `kiln`),
//! so two Kiln deployments can share a NATS account without colliding.

#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

/// The two queue lanes of a model: `high` (priority above 0) is pulled before `normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    High,
    Normal,
}

impl Lane {
    /// Every lane, in the order they are pulled.
    pub const ALL: [Lane; 2] = [Lane::High, Lane::Normal];

    pub fn of_priority(priority: u8) -> Lane {
        if priority > 0 {
            Lane::High
        } else {
            Lane::Normal
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::High => "high",
            Lane::Normal => "normal",
        }
    }
    /// The lane [`as_str`](Self::as_str) names.
    pub fn parse(name: &str) -> Option<Lane> {
        match name {
            "high" => Some(Lane::High),
            "normal" => Some(Lane::Normal),
            _ => None,
        }
    }
}

/// A job subject read back: `<prefix>.jobs.<model>.<lane>` ([`Names::job_subject`], the
/// lane's shared queue) or `<prefix>.jobs.<model>.<lane>.<key>` ([`Names::job_subject_keyed`],
/// one fair-share key's queue). Read from the end, so it holds whatever the prefix; a key token
/// is never a lane's name (it begins `u-` or `h-`, see `kiln_core::fair::key_token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSubject<'a> {
    pub model: &'a str,
    pub lane: Lane,
    pub key: Option<&'a str>,
}

impl<'a> JobSubject<'a> {
    pub fn parse(subject: &'a str) -> Option<JobSubject<'a>> {
        let mut from_end = subject.rsplit('.');
        let last = from_end.next()?;
        if let Some(lane) = Lane::parse(last) {
            return Some(JobSubject { model: from_end.next()?, lane, key: None });
        }
        let lane = Lane::parse(from_end.next()?)?;
        Some(JobSubject { model: from_end.next()?, lane, key: Some(last) })
    }
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Names { prefix: prefix.to_string() }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    fn upper(&self) -> String {
        self.prefix.to_uppercase().replace('-', "_")
    }
    /// `kiln.api`: the group of the client service endpoints.
    pub fn api_group(&self) -> String {
        format!("{}.api", self.prefix)
    }
    pub fn api(&self, endpoint: &str) -> String {
        format!("{}.api.{endpoint}", self.prefix)
    }
    /// The NATS service name shown by `$SRV.INFO`.
    pub fn service_name(&self) -> String {
        format!("{}-api", self.prefix)
    }
    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper())
    }
    pub fn jobs_subject_all(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }
    pub fn job_subject(&self, model: &str, lane: Lane) -> String {
        format!("{}.jobs.{model}.{}", self.prefix, lane.as_str())
    }
    /// One fair-share key's queue in a lane of a model (see `kiln_core::fair`).
    pub fn job_subject_keyed(&self, model: &str, lane: Lane, key: &str) -> String {
        format!("{}.jobs.{model}.{}.{key}", self.prefix, lane.as_str())
    }
    /// Every queue of one model, both lanes, shared and keyed (a core-NATS subscription here
    /// sees every enqueue).
    pub fn jobs_subject_model(&self, model: &str) -> String {
        format!("{}.jobs.{model}.>", self.prefix)
    }
    /// The queue group of the nodes' pullers of one model: an enqueue wakes one of them.
    pub fn pullers_queue(&self, model: &str) -> String {
        format!("{}-pullers-{model}", self.prefix)
    }
    pub fn consumer(&self, model: &str, lane: Lane) -> String {
        format!("{model}-{}", lane.as_str())
    }
    /// The durable consumer of one fair-share key's queue ([`job_subject_keyed`](Self::job_subject_keyed)).
    pub fn consumer_keyed(&self, model: &str, lane: Lane, key: &str) -> String {
        format!("{model}-{}-{key}", lane.as_str())
    }
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper())
    }
    pub fn events_subject_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }
    pub fn events_subject(&self, job_id: &str) -> String {
        format!("{}.events.{job_id}", self.prefix)
    }
    /// Live previews of running jobs (`kiln_contract::preview`): the stream that keeps the
    /// newest of each job, and its subjects, one per job.
    pub fn previews_stream(&self) -> String {
        format!("{}_PREVIEWS", self.upper())
    }
    pub fn previews_subject_all(&self) -> String {
        format!("{}.previews.>", self.prefix)
    }
    /// Webhook messages waiting for delivery (a work queue, one subject per job), and each
    /// job's delivery log (every attempt, kept as long as results are).
    pub fn webhooks_stream(&self) -> String {
        format!("{}_WEBHOOKS", self.upper())
    }
    pub fn webhooks_subject_all(&self) -> String {
        format!("{}.webhooks.>", self.prefix)
    }
    pub fn webhooks_subject(&self, job_id: &str) -> String {
        format!("{}.webhooks.{job_id}", self.prefix)
    }
    pub fn webhook_log_stream(&self) -> String {
        format!("{}_WEBHOOK_LOG", self.upper())
    }
    pub fn webhook_log_subject_all(&self) -> String {
        format!("{}.webhooklog.>", self.prefix)
    }
    pub fn webhook_log_subject(&self, job_id: &str) -> String {
        format!("{}.webhooklog.{job_id}", self.prefix)
    }
    pub fn previews_subject(&self, job_id: &str) -> String {
        format!("{}.previews.{job_id}", self.prefix)
    }
    /// The results feed: every job's end, one message each, for consumers that start late.
    pub fn finished_stream(&self) -> String {
        format!("{}_FINISHED", self.upper())
    }
    pub fn finished_subject_all(&self) -> String {
        format!("{}.finished.>", self.prefix)
    }
    pub fn finished_subject(&self, model: &str) -> String {
        format!("{}.finished.{model}", self.prefix)
    }
    pub fn jobs_bucket(&self) -> String {
        format!("{}_jobs", self.prefix)
    }
    pub fn gpus_bucket(&self) -> String {
        format!("{}_gpus", self.prefix)
    }
    pub fn nodes_bucket(&self) -> String {
        format!("{}_nodes", self.prefix)
    }
    pub fn held_bucket(&self) -> String {
        format!("{}_held", self.prefix)
    }
    pub fn batches_bucket(&self) -> String {
        format!("{}_batches", self.prefix)
    }
    pub fn reuse_bucket(&self) -> String {
        format!("{}_reuse", self.prefix)
    }
    pub fn files_bucket(&self) -> String {
        format!("{}_files", self.prefix)
    }
    pub fn results_bucket(&self, model: &str) -> String {
        format!("{}_results_{model}", self.prefix)
    }
    /// Where a node accepts the opening request of an actor-cluster tunnel from a peer.
    pub fn tunnel_open(&self, node: &str) -> String {
        format!("{}.tunnel.open.{node}", self.prefix)
    }
    /// The frames of one tunnel session travelling towards `side` (`dialer` or `acceptor`).
    pub fn tunnel_frames(&self, session: &str, side: &str) -> String {
        format!("{}.tunnel.{session}.{side}", self.prefix)
    }
    /// Where a node is asked to dial the asker: of two nodes only the one whose name sorts first
    /// dials, so the other asks it here when it needs a session.
    pub fn tunnel_want(&self, node: &str) -> String {
        format!("{}.tunnel.want.{node}", self.prefix)
    }
    /// Where a node takes cancel notices for the jobs it runs (core NATS request/reply, body
    /// `{"job_id": ..}`): the API sends one to the owner after flagging a running job, so a
    /// cancel reaches the job whatever the state of the actor cluster.
    pub fn node_cancel(&self, node: &str) -> String {
        format!("{}.node.{node}.cancel", self.prefix)
    }
    /// One node's diagnostics: `ping` (times actor calls and NATS requests to a peer) and
    /// `echo` (the NATS floor of that measurement).
    pub fn node_diag(&self, node: &str, what: &str) -> String {
        format!("{}.node.{node}.{what}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_subject_is_parsed_back_into_its_model_lane_and_key() {
        for prefix in ["kiln", "a-b", "x.y"] {
            let names = Names::new(prefix);
            for lane in Lane::ALL {
                let shared = names.job_subject("image-to-splat", lane);
                assert_eq!(JobSubject::parse(&shared), Some(JobSubject { model: "image-to-splat", lane, key: None }));
                let keyed = names.job_subject_keyed("image-to-splat", lane, "u-alice");
                assert_eq!(JobSubject::parse(&keyed), Some(JobSubject { model: "image-to-splat", lane, key: Some("u-alice") }));
            }
        }
        assert_eq!(JobSubject::parse("kiln.jobs.noop.bogus"), None);
        assert_eq!(JobSubject::parse("kiln.jobs.noop.bogus.u-a"), None);
        assert_eq!(JobSubject::parse("normal"), None);
    }
}
