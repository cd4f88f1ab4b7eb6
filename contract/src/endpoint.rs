//! Every `kiln.api.*` endpoint, listed once: its subject suffix, the file that serves it, its
//! request and reply types and what it does. The service loop subscribes and dispatches from
//! [`Endpoint::ALL`], `$SRV.INFO` and `$SRV.STATS` list it, the gateway's OpenAPI document
//! takes the endpoints' request and reply schemas from it, and a test checks that
//! `docs/PROTOCOL.md` has a section for each; so an endpoint's name is written here and nowhere
//! else in the server.
//!
//! It lives with the wire types (`protocol`): the server (`kiln::api`), the Rust client and the
//! gateway's OpenAPI document all take the names from here.

use crate::protocol::*;
use schemars::{Schema, SchemaGenerator};

/// The endpoint's family: the server serves each family from one file of `src/api/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `jobs.rs`: one job at a time.
    Jobs,
    /// `batches.rs`: a batch of N items, each a job.
    Batches,
    /// `control.rs`: the cluster's models, nodes and slots, and operators' commands.
    Control,
}

/// Declares [`Endpoint`] from one row per endpoint:
/// `Variant = "subject suffix", Family, Request => Reply, "description";`.
macro_rules! endpoints {
    ($($variant:ident = $name:literal, $family:ident, $request:ty => $reply:ty, $description:literal;)*) => {
        /// One endpoint of the `kiln-api` service, on subject `kiln.api.<name>`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Endpoint {
            $(#[doc = $description] $variant,)*
        }

        impl Endpoint {
            /// Every endpoint, in the order `$SRV.INFO` lists them.
            pub const ALL: [Endpoint; [$($name),*].len()] = [$(Endpoint::$variant),*];

            /// The subject suffix (`kiln.api.<name>`), and the endpoint's name in `$SRV.INFO`,
            /// `$SRV.STATS` and the metrics' `endpoint` label.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Endpoint::$variant => $name,)*
                }
            }

            /// What the endpoint does, in one line.
            pub const fn description(self) -> &'static str {
                match self {
                    $(Endpoint::$variant => $description,)*
                }
            }

            /// The file of `src/api/` that serves it.
            pub const fn family(self) -> Family {
                match self {
                    $(Endpoint::$variant => Family::$family,)*
                }
            }

            /// The JSON schema of its request body.
            pub fn request_schema(self, generator: &mut SchemaGenerator) -> Schema {
                match self {
                    $(Endpoint::$variant => generator.subschema_for::<$request>(),)*
                }
            }

            /// The JSON schema of its reply on success (a failure is an [`ErrorReply`]).
            pub fn reply_schema(self, generator: &mut SchemaGenerator) -> Schema {
                match self {
                    $(Endpoint::$variant => generator.subschema_for::<$reply>(),)*
                }
            }
        }
    };
}

endpoints! {
    Submit = "submit", Jobs, SubmitRequest => SubmitReply,
        "Submit a job: validated, admitted, then made durable (record, queue message, event)";
    Status = "status", Jobs, JobRef => JobView, "A job as it is now";
    Cancel = "cancel", Jobs, JobRef => JobView,
        "Cancel a job: a queued one at once, a running one through its owner";
    Result = "result", Jobs, JobRef => ResultReply, "A job's artifacts, or its error";
    Jobs = "jobs", Jobs, ListJobsRequest => ListJobsReply,
        "List jobs, newest first, by status, model, labels or dead letter";
    Models = "models", Control, NoFields => ModelsReply,
        "The cluster's models, the slots serving each and where each is warm";
    Cluster = "cluster", Control, NoFields => ClusterReply, "Every live node and GPU slot";
    Control = "control", Control, ControlRequest => ControlReply,
        "Drain a node, restart a GPU slot, ping a node (through the actor cluster)";
    SubmitBatch = "submit_batch", Batches, BatchSubmitRequest => BatchReply,
        "Submit a batch: every item validated before anything is written, one job per item";
    Batch = "batch", Batches, BatchRef => BatchView, "A batch: its summary and each item's job";
    CancelBatch = "cancel_batch", Batches, BatchRef => BatchView,
        "Cancel a batch: its held items and every job that has not ended";
    RetryBatch = "retry_batch", Batches, BatchRef => BatchReply,
        "A new batch of a finished batch's failed and cancelled items";
    Queue = "queue", Control, QueueRequest => QueueReply,
        "Each model's queue: depth by lane, oldest wait, running, slots serving it, desired slots";
    Webhooks = "webhooks", Jobs, JobRef => WebhooksReply,
        "A job's webhook delivery log: each attempt, its status code or error, its latency";
    WebhooksRedeliver = "webhooks_redeliver", Jobs, JobRef => RedeliverReply,
        "Send a job's last event to its webhooks again (a new attempt series, same webhook-id)";
}

/// The endpoints' names, in [`Endpoint::ALL`]'s order.
pub const ENDPOINTS: [&str; Endpoint::ALL.len()] = {
    let mut names = [""; Endpoint::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Endpoint::ALL[i].name();
        i += 1;
    }
    names
};

impl Endpoint {
    /// The endpoint with this subject suffix.
    pub fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Its subject in the API group `api_group` (`kiln.api`).
    pub fn subject(self, api_group: &str) -> String {
        format!("{api_group}.{}", self.name())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_subject_tokens_and_found_again() {
        for e in Endpoint::ALL {
            assert!(crate::ids::is_valid_token(e.name()), "{e:?}: {:?} is not one subject token", e.name());
            assert_eq!(Endpoint::from_name(e.name()), Some(e));
            assert_eq!(Endpoint::ALL.iter().filter(|o| o.name() == e.name()).count(), 1, "{e:?} named twice");
            assert!(!e.description().is_empty(), "{e:?} has no description");
            assert_eq!(e.subject("kiln.api"), format!("kiln.api.{}", e.name()));
        }
        assert_eq!(Endpoint::from_name("submit "), None);
        assert_eq!(Endpoint::from_name(""), None);
    }

    /// `$SRV.INFO` lists the endpoints in this order, as it did before the enum (new ones last).
    #[test]
    fn the_wire_names_and_their_order_stay() {
        let listed = [
            "submit",
            "status",
            "cancel",
            "result",
            "jobs",
            "models",
            "cluster",
            "control",
            "submit_batch",
            "batch",
            "cancel_batch",
            "retry_batch",
            "queue",
            "webhooks",
            "webhooks_redeliver",
        ];
        assert_eq!(ENDPOINTS, listed);
    }

    /// Each endpoint's schemas resolve, and the request schemas are objects (every request is a
    /// JSON object, or empty where the endpoint takes no field).
    #[test]
    fn every_endpoint_has_request_and_reply_schemas() {
        let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
        for e in Endpoint::ALL {
            let request = serde_json::to_value(e.request_schema(&mut generator)).expect("schema");
            let reply = serde_json::to_value(e.reply_schema(&mut generator)).expect("schema");
            assert!(request.get("$ref").is_some() || request.get("type").is_some(), "{e:?}: {request}");
            assert!(reply.get("$ref").is_some() || reply.get("type").is_some(), "{e:?}: {reply}");
        }
    }

    /// The wire contract documents every endpoint under a heading of its own (or one it shares
    /// with its family): an endpoint added here without its section fails.
    #[test]
    fn protocol_md_has_a_section_for_every_endpoint() {
        let protocol = include_str!("../../docs/PROTOCOL.md");
        let headings: Vec<&str> = protocol.lines().filter(|l| l.starts_with('#')).collect();
        for e in Endpoint::ALL {
            let full = format!("`kiln.api.{}`", e.name());
            let short = format!("`{}`", e.name());
            assert!(
                headings.iter().any(|h| h.contains(&full) || (h.contains("`kiln.api.") && h.contains(&short))),
                "docs/PROTOCOL.md has no heading for {full}"
            );
        }
    }
}
