//! The end of a job, written out once: its terminal event and its results feed entry, then its
//! settle into its batch. Every path that ends a job goes through [`finish_job`]: a delivery's
//! outcome, a delivery that finds its job ended before it ran (or ended by a crashed one), and
//! the API's cancel of a job that has not started.
//!
//! The order is the contract: the ending is stored before the batch hears of it, and both
//! before the queue message is acked, so whatever fails in between is done again by the
//! message's redelivery, which finds the record ended. Every step is idempotent: the ending
//! and the feed entry are de-duplicated by their ids, the settle finds itself done.

use kiln_core::job::JobRecord;
use kiln_core::nats::{ride_out, CasError, StoreError};
use kiln_core::policy::Patience;
use kiln_core::protocol::Event;
use kiln_core::store::JobStore;

/// What of the job's end still has to be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Its terminal event and its results feed entry (`JobStore::publish_end`).
    EndingAndFeed,
    /// Its results feed entry alone: the ending is in its history already.
    FeedOnly,
}

/// Which step of [`finish_job`] failed; the steps before it are done.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    /// The ending (or the feed entry, with [`Publish::FeedOnly`]) is not stored; the batch was
    /// not told.
    #[error("{0}")]
    Publish(StoreError),
    /// The ending is stored, but the job's batch does not know yet.
    #[error("{error}")]
    Settle { job_id: String, error: CasError },
}

impl FinishError {
    /// For a caller that leaves the batch settle to the job's queue message (whose delivery
    /// finds the job ended and settles it): a failed settle is logged and forgiven, only a
    /// failed publish is returned.
    pub fn unless_settle(self) -> Result<(), StoreError> {
        match self {
            FinishError::Publish(e) => Err(e),
            FinishError::Settle { job_id, error } => {
                tracing::warn!(job_id = %job_id, error = %error, "cannot settle the cancelled job into its batch now");
                Ok(())
            }
        }
    }
}

/// The terminal event of an ended job: its state, labels and error, numbered by its last
/// attempt.
pub fn ending_event(record: &JobRecord) -> Event {
    let event = Event::status(&record.job_id, record.attempt, record.state).labelled(&record.labels);
    match &record.error {
        Some(e) => event.with_error(e.clone()),
        None => event,
    }
}

/// Publishes the end of the ended job `record` (what `publish` says), then settles it into its
/// batch if it is a batch item, each step riding out NATS trouble for `patience`. Safe to
/// repeat (a redelivery does).
pub async fn finish_job(store: &dyn JobStore, record: &JobRecord, publish: Publish, patience: Patience) -> Result<(), FinishError> {
    let job_id = &record.job_id;
    let published = match publish {
        Publish::EndingAndFeed => {
            let event = ending_event(record);
            ride_out(patience, job_id, "publishing the terminal event", || store.publish_end(&event, record)).await
        }
        Publish::FeedOnly => ride_out(patience, job_id, "publishing the results feed entry", || store.publish_finished(record)).await,
    };
    published.map_err(FinishError::Publish)?;
    ride_out(patience, job_id, "settling into the batch", || store.settle_batch_item(record))
        .await
        .map_err(|error| FinishError::Settle { job_id: job_id.clone(), error })
}

#[cfg(test)]
mod tests {
    use kiln_core::config::ClusterConfig;
    use kiln_core::job::{self, JobState};
    use kiln_core::nats::NatsServer;
    use kiln_core::protocol::ErrorCode;

    use super::*;

    /// Against a real nats-server: finishing a job again (a redelivery does) stores nothing
    /// twice, and a feed-only finish adds nothing to the history.
    #[tokio::test]
    async fn a_job_finished_again_has_one_ending_and_one_feed_entry() {
        let server = NatsServer::start_temp().expect("nats-server");
        let config = ClusterConfig::from_toml(&format!("[nats]\nurl = \"{}\"\n", server.url()), "test").expect("config");
        let client = kiln_core::nats::resources::connect(&config.nats, "finish-test").await.expect("connect");
        let resources = kiln_core::nats::Resources::ensure(client, &config).await.expect("resources");
        let cancelled = job::cancel_before_run(&JobRecord::queued("j1", "m", 3, 0), 5).expect("cancellable");
        for publish in [Publish::EndingAndFeed, Publish::EndingAndFeed, Publish::FeedOnly] {
            finish_job(&resources, &cancelled, publish, Patience::ONCE).await.expect("finished");
        }
        let last = resources.last_event("j1").await.expect("read").expect("an ending");
        assert_eq!((last.status, last.attempt), (Some(JobState::Cancelled), 0));
        let stored = |stream: String| {
            let js = resources.js.clone();
            async move { js.get_stream(stream).await.expect("stream").info().await.expect("info").state.messages }
        };
        assert_eq!(stored(resources.names.events_stream()).await, 1);
        assert_eq!(stored(resources.names.finished_stream()).await, 1);
    }

    #[test]
    fn the_ending_carries_the_records_state_attempt_labels_and_error() {
        let queued = JobRecord::queued("j", "m", 3, 0);
        let cancelled = job::cancel_before_run(&queued, 5).expect("a queued job may be cancelled");
        let event = ending_event(&cancelled);
        assert_eq!((event.job_id.as_str(), event.attempt, event.status), ("j", 0, Some(JobState::Cancelled)));
        assert!(event.is_terminal());
        assert_eq!(event.error.as_ref().map(|e| e.code), Some(ErrorCode::Cancelled));
        assert_eq!(event.labels, cancelled.labels);
    }
}
