//! Reading the queue as it is now, for `kiln.api.queue` and the queue gauges: each lane's
//! consumer (depth, deliveries not yet settled), the oldest message it has not delivered, the
//! run times of a model's recent finished jobs from the results feed, and the registry's slots;
//! put together by the pure [`crate::autoscale::model_queue`].
//!
//! Cost of one model's figures: one listing of the queue stream's consumers per lane (a request
//! per 256 consumers: each lane's shared queue and its fair-share keys'), one message read per
//! queue with jobs waiting, one last-message read and one short-lived ordered consumer over at
//! most [`SERVICE_WINDOW`] messages of the results feed; and one registry read for all models.

use std::time::Duration;

use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, RawMessageErrorKind};
use futures::StreamExt;

use super::{Lane, Resources, StoreError};
use crate::autoscale::{mean_service_ms, model_queue, LaneFigures};
use crate::job::{JobRecord, JobState};
use crate::pending::{OtherQueue, WaitFacts};
use crate::protocol::{GpuEntry, JobView, KeyQueue, ModelDecl, QueueReply};

use async_nats::jetstream::consumer;

/// How far back in the results feed (in messages of every model) the mean run time looks: a
/// model's finished jobs among the last this many, and at least its last one.
pub const SERVICE_WINDOW: u64 = 64;
/// Longest a read of the results feed may take.
const READ_DEADLINE: Duration = Duration::from_secs(5);

impl Resources {
    /// One lane of `model` now, summed over its queues (the shared one and each fair-share
    /// key's): their consumers' pending and ack-pending counts, and when the oldest message not
    /// delivered yet was stored (per queue, the first message on its subject after its
    /// consumer's last delivered sequence: exact for jobs never delivered; a job waiting for a
    /// redelivery is counted in `delivered`, not here).
    pub async fn lane_figures(&self, model: &str, lane: Lane) -> Result<LaneFigures, StoreError> {
        let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        let mut figures = LaneFigures::default();
        for info in self.lane_consumers(model, lane).await? {
            figures.queued += info.num_pending;
            figures.delivered += info.num_ack_pending as u64;
            let key = crate::nats::names::JobSubject::parse(&info.config.filter_subject).and_then(|s| s.key);
            if info.num_pending + info.num_ack_pending as u64 > 0 {
                figures.keys.push(KeyQueue {
                    key: key.map(|k| crate::fair::shown_key(k).to_string()),
                    queued: info.num_pending,
                    running: info.num_ack_pending as u64,
                });
            }
            if info.num_pending == 0 {
                continue;
            }
            let next = stream
                .raw_message_builder()
                .sequence(info.delivered.stream_sequence + 1)
                .next_by_subject(info.config.filter_subject.clone())
                .send()
                .await;
            match next {
                Ok(message) => {
                    let at = (message.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                    figures.oldest_enqueued_ms = Some(figures.oldest_enqueued_ms.map_or(at, |t| t.min(at)));
                }
                // Delivered between the two requests.
                Err(e) if matches!(e.kind(), RawMessageErrorKind::NoMessageFound) => {}
                Err(e) => return Err(StoreError::nats(e)),
            }
        }
        // By key only where there are keys: the shared queue alone is the lane itself.
        if figures.keys.iter().all(|k| k.key.is_none()) {
            figures.keys.clear();
        }
        figures.keys.sort_by(|a, b| b.queued.cmp(&a.queued).then_with(|| b.running.cmp(&a.running)).then_with(|| a.key.cmp(&b.key)));
        Ok(figures)
    }

    /// The mean run time of `model`'s recent finished jobs and how many it is over (see
    /// [`mean_service_ms`]): its entries among the last [`SERVICE_WINDOW`] messages of the
    /// results feed, read with one ordered consumer.
    pub async fn recent_service_ms(&self, model: &str) -> Result<(Option<f64>, u32), StoreError> {
        let stream = self.js.get_stream_no_info(self.names.finished_stream()).await.map_err(StoreError::nats)?;
        let subject = self.names.finished_subject(model);
        let last = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message.sequence,
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => return Ok((None, 0)),
            Err(e) => return Err(StoreError::nats(e)),
        };
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("kiln queue: recent run times".into()),
                filter_subject: subject,
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: last.saturating_sub(SERVICE_WINDOW - 1).max(1) },
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(StoreError::nats)?;
        let mut finished = Vec::new();
        let mut messages = consumer.messages().await.map_err(StoreError::nats)?;
        let read = async {
            while let Some(message) = messages.next().await {
                let message = message.map_err(StoreError::nats)?;
                let info = message.info().map_err(StoreError::nats)?;
                let (sequence, pending) = (info.stream_sequence, info.pending);
                if let Ok(view) = serde_json::from_slice::<JobView>(&message.payload) {
                    finished.push(view);
                }
                // Up to the last one seen above: jobs finishing meanwhile do not keep it reading.
                if pending == 0 || sequence >= last {
                    break;
                }
            }
            Ok::<(), StoreError>(())
        };
        tokio::time::timeout(READ_DEADLINE, read)
            .await
            .map_err(|_| StoreError::Nats(format!("reading the results feed took over {READ_DEADLINE:?}")))??;
        Ok(mean_service_ms(&finished))
    }

    /// What the waiting jobs of one lane of `model` are judged by ([`LaneWaitSnapshot`]): the
    /// registry's slots, the lane's queues (and the high lane's, for the normal lane) and the
    /// model's recent run time. The same for every job of the lane, so a caller keeps it for a
    /// moment: clients poll the status of their queued jobs.
    pub async fn lane_wait_snapshot(&self, model: &str, lane: Lane) -> Result<LaneWaitSnapshot, StoreError> {
        let gpus = self.gpu_entries(None, false).await?;
        let mut queues: Vec<(consumer::Info, bool)> = self.lane_consumers(model, lane).await?.into_iter().map(|c| (c, false)).collect();
        if lane == Lane::Normal {
            queues.extend(self.lane_consumers(model, Lane::High).await?.into_iter().map(|c| (c, true)));
        }
        let mean_service_ms = self.recent_service_ms(model).await?.0;
        Ok(LaneWaitSnapshot { gpus, queues, mean_service_ms })
    }

    /// What a waiting job's reason, position and estimated start are decided from
    /// ([`crate::pending`]): `snapshot` (its lane's, [`lane_wait_snapshot`](Self::lane_wait_snapshot))
    /// and its position in its own queue, counted now: the messages on its subject between
    /// the queue consumer's last delivery (as of the snapshot) and its own, two direct gets.
    pub async fn wait_facts<'a>(
        &self,
        record: &JobRecord,
        snapshot: &'a LaneWaitSnapshot,
        owner_alive: bool,
    ) -> Result<WaitFacts<'a>, StoreError> {
        let lane = Lane::of_priority(record.priority);
        let key = crate::fair::job_key(&self.fair_share, &record.labels);
        let own_subject = match &key {
            Some(key) => self.names.job_subject_keyed(&record.model, lane, key),
            None => self.names.job_subject(&record.model, lane),
        };
        let mut facts = WaitFacts {
            gpus: &snapshot.gpus,
            owner_alive,
            weight: crate::fair::weight_of(&self.fair_share, key.as_deref()),
            mean_service_ms: snapshot.mean_service_ms,
            ..Default::default()
        };
        let mut own = None;
        for (info, higher_lane) in &snapshot.queues {
            if info.config.filter_subject == own_subject {
                own = Some(info);
                continue;
            }
            let other_key = crate::nats::names::JobSubject::parse(&info.config.filter_subject).and_then(|s| s.key);
            facts.others.push(OtherQueue {
                queued: info.num_pending,
                weight: crate::fair::weight_of(&self.fair_share, other_key),
                higher_lane: *higher_lane,
            });
        }
        // A key newer than the snapshot: its consumer is read now (one request).
        let fetched;
        let own = match (own, &key) {
            (None, Some(key)) => {
                let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
                fetched = stream.consumer_info(self.names.consumer_keyed(&record.model, lane, key)).await.ok();
                fetched.as_ref()
            }
            (own, _) => own,
        };
        if let Some(own) = own {
            facts.at_running_quota = own.config.max_ack_pending > 0
                && own.config.max_ack_pending < super::resources::UNLIMITED_ACK_PENDING
                && own.num_ack_pending as i64 >= own.config.max_ack_pending;
            if let (JobState::Queued, Some(seq)) = (record.state, record.queue_seq) {
                let delivered = own.delivered.stream_sequence;
                facts.position = Some(if seq <= delivered {
                    0
                } else {
                    let stream = self.names.jobs_stream();
                    let (from_next, from_own) = tokio::try_join!(
                        self.count_from(&stream, &own_subject, delivered + 1),
                        self.count_from(&stream, &own_subject, seq)
                    )?;
                    from_next.saturating_sub(from_own)
                });
            }
        }
        Ok(facts)
    }

    /// Removes the fair-share keys' queue consumers that are idle and empty
    /// ([`crate::fair::removable`]); their names. Each is looked at twice, the second time
    /// just before its removal, and kept if anything was delivered in between: a job fetched
    /// from a consumer in the instant before its removal would come back from the one made
    /// again, and its running attempt be taken over (fenced, not doubled; see ARCHITECTURE.md).
    pub async fn remove_idle_queues(&self, idle_after: Duration) -> Result<Vec<String>, StoreError> {
        let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        let mut infos = stream.consumers();
        let mut candidates = vec![];
        while let Some(info) = infos.next().await {
            let info = info.map_err(StoreError::nats)?;
            if crate::fair::removable(&activity(&info), idle_after) {
                candidates.push(info);
            }
        }
        let mut removed = vec![];
        for first in candidates {
            let name = first.name.clone();
            let again = match stream.consumer_info(&name).await {
                Ok(info) => info,
                Err(_) => continue,
            };
            if !crate::fair::removable(&activity(&again), idle_after) || again.delivered.stream_sequence != first.delivered.stream_sequence
            {
                continue;
            }
            stream.delete_consumer(&name).await.map_err(StoreError::nats)?;
            // This process makes it again for the key's next job.
            if let Some(s) = crate::nats::names::JobSubject::parse(&again.config.filter_subject) {
                if let Some(key) = s.key {
                    self.keyed_consumers.remove(&(s.model.to_string(), s.lane, key.to_string()));
                }
            }
            removed.push(name);
        }
        Ok(removed)
    }

    /// The queue of each of `models` now (in the order given), `desired_slots` computed for
    /// `target_wait_s` (in slots: a model's `gpus` per job).
    pub async fn queue_snapshot(&self, models: &[ModelDecl], target_wait_s: u64) -> Result<QueueReply, StoreError> {
        let gpus = self.gpu_entries(None, false).await?;
        let mut reply = QueueReply { measured_ms: crate::now_ms(), target_wait_s, models: Vec::with_capacity(models.len()) };
        for decl in models {
            let model = &decl.name;
            let (high, normal, service) = tokio::try_join!(
                self.lane_figures(model, Lane::High),
                self.lane_figures(model, Lane::Normal),
                self.recent_service_ms(model)
            )?;
            let lanes = [(Lane::High, high), (Lane::Normal, normal)];
            reply.models.push(model_queue(model, decl.gpus, &lanes, &gpus, service, crate::now_ms(), target_wait_s));
        }
        Ok(reply)
    }
}

/// What [`crate::fair::removable`] decides on, from a queue consumer's info.
fn activity(info: &consumer::Info) -> crate::fair::QueueActivity {
    let latest =
        [Some(info.created), info.delivered.last_active, info.ack_floor.last_active].into_iter().flatten().max().unwrap_or(info.created);
    let idle_for = (time::OffsetDateTime::now_utc() - latest).max(time::Duration::ZERO);
    crate::fair::QueueActivity {
        keyed: crate::nats::names::JobSubject::parse(&info.config.filter_subject).is_some_and(|s| s.key.is_some()),
        pending: info.num_pending,
        ack_pending: info.num_ack_pending as u64,
        waiting: info.num_waiting as u64,
        idle_for: Duration::from_secs_f64(idle_for.as_seconds_f64()),
    }
}

/// One lane of a model as its waiting jobs are judged ([`Resources::lane_wait_snapshot`]).
#[derive(Debug, Clone)]
pub struct LaneWaitSnapshot {
    pub gpus: Vec<GpuEntry>,
    /// The lane's queue consumers, and the high lane's for the normal lane (`true`).
    queues: Vec<(consumer::Info, bool)>,
    pub mean_service_ms: Option<f64>,
}
