//! What the gateway hands on with every job it submits for a request, on every submitting route
//! (`/v1/jobs`, `/v1/batches`, a batch's retry, the configured seed routes): the request's trace
//! (its `kiln.http` span, see [`super::request_span`]), and the name of the API key that
//! authenticated it as the job's `api_key` label ([`API_KEY_LABEL`]).
//!
//! The label is what lets the rest of Kiln tell keys apart without learning a key: the
//! fair-share key and quotas (`[fair_share] key = "api_key"`), a webhook endpoint's `api_keys`,
//! and `jobs` filters. The gateway sets it and removes one a client sent, so a caller cannot
//! pass as another key; without `[[http.api_keys]]` (a loopback gateway) the labels are the
//! client's own. Over NATS the label is whatever the client sends: NATS permissions, not
//! Kiln, decide who may submit there.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::Extensions;
use kiln_core::protocol::{BatchSubmitRequest, Labels, SubmitRequest, API_KEY_LABEL};
use kiln_core::telemetry::TraceContext;

use super::request_span::Forward;

/// The name (`[[http.api_keys]] name`) of the key a request was authenticated with; set by
/// the gateway's authentication, absent without configured keys.
#[derive(Clone, Debug)]
pub struct ApiKeyName(pub String);

/// A request's origin, as its jobs carry it.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub trace: Option<TraceContext>,
    pub api_key: Option<String>,
}

impl Origin {
    pub fn of(extensions: &Extensions) -> Origin {
        Origin { trace: extensions.get::<Forward>().map(|f| f.0.clone()), api_key: extensions.get::<ApiKeyName>().map(|k| k.0.clone()) }
    }

    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Sets a submit's `api_key` label (see [`stamp`]).
    pub fn stamp_submit(&self, submit: &mut SubmitRequest) {
        stamp(&mut submit.labels, self.api_key.as_deref());
    }

    /// Sets a batch's `api_key` label for all its items: on the batch, and removed from any
    /// item that names its own (an item's label would win over the batch's).
    pub fn stamp_batch(&self, batch: &mut BatchSubmitRequest) {
        if self.api_key.is_some() {
            stamp(&mut batch.labels, self.api_key.as_deref());
            for item in &mut batch.items {
                item.labels.remove(API_KEY_LABEL);
            }
        }
    }
}

/// The labels a job of a request authenticated with `api_key` carries: the client's, with
/// `api_key` set to the key's name (a client's own `api_key` replaced). Without a key (no keys
/// configured) the client's labels unchanged. Pure.
pub fn stamp(labels: &mut Labels, api_key: Option<&str>) {
    if let Some(name) = api_key {
        labels.insert(API_KEY_LABEL.to_string(), name.to_string());
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Origin, Infallible> {
        Ok(Origin::of(&parts.extensions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::protocol::BatchItemRequest;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_key_replaces_the_clients_api_key_label_and_keeps_the_others() {
        let mut l = labels(&[("api_key", "someone-else"), ("user_id", "u1")]);
        stamp(&mut l, Some("team-a"));
        assert_eq!(l, labels(&[("api_key", "team-a"), ("user_id", "u1")]));
    }

    #[test]
    fn without_a_key_the_clients_labels_stay_as_they_are() {
        let mut l = labels(&[("api_key", "mine")]);
        stamp(&mut l, None);
        assert_eq!(l, labels(&[("api_key", "mine")]));
    }

    #[test]
    fn every_item_of_a_batch_gets_the_keys_label() {
        let origin = Origin { trace: None, api_key: Some("team-a".into()) };
        let mut batch = BatchSubmitRequest {
            items: vec![
                BatchItemRequest { labels: labels(&[("api_key", "forged"), ("frame", "1")]), ..Default::default() },
                BatchItemRequest::default(),
            ],
            ..Default::default()
        };
        origin.stamp_batch(&mut batch);
        assert_eq!(batch.labels, labels(&[("api_key", "team-a")]));
        assert_eq!(batch.items[0].labels, labels(&[("frame", "1")]), "the batch's label wins for every item");
        assert!(batch.items[1].labels.is_empty());
    }
}
