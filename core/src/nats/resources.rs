//! Connecting to NATS and creating every stream, bucket and consumer Kiln needs. Creation is
//! idempotent (`get_or_create`), so every node runs it at start and the first one wins.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use dashmap::DashMap;

use super::{Lane, Names, StoreError};
use crate::config::ClusterConfig;
// Connecting is the client's (`kiln_client::connect`): one way for nodes, the CLI and any
// Rust program.
pub use kiln_client::connect::{connect, connect_options, install_crypto_provider};

/// How long job records are kept, at least: far longer than any job waits in the queue.
const JOB_RECORD_MIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The window in which JetStream drops a second publish with the same `Nats-Msg-Id` (job id).
pub const QUEUE_DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// Bounds the history of one job so a chatty engine cannot fill the events stream.
const MAX_EVENTS_PER_JOB: i64 = 10_000;
/// Consumers allowed on each stream Kiln creates. nats-server 2.15 gives a stream that sets
/// none a limit of 1,000 (and treats -1 as "its default"), and every client following a job's
/// events or downloading an object holds an ordered consumer for a while: `kiln chaos` hit
/// "maximum consumers limit reached" downloading 3,000 results with 16 in flight.
pub const MAX_CONSUMERS_PER_STREAM: i32 = 100_000;

/// The `max_ack_pending` of a queue without a `max_running` quota: more than any cluster runs.
pub(crate) const UNLIMITED_ACK_PENDING: i64 = 100_000;

/// One fair-share key's jobs of a model ([`Resources::key_queue`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyJobs {
    /// Waiting to start, both lanes.
    pub queued: u64,
    /// Delivered and not acked yet (running, or waiting for a retry), both lanes.
    pub running: u64,
}

/// Cheap-to-clone handle on every NATS resource of one Kiln deployment: one `Arc`. (Cloned
/// field by field, with its KV stores and stream handles, a clone cost allocations and copies
/// that showed in a no-op job's profile: every job clones it several times.)
#[derive(Clone)]
pub struct Resources(Arc<ResourceHandles>);

impl std::ops::Deref for Resources {
    type Target = ResourceHandles;
    fn deref(&self) -> &ResourceHandles {
        &self.0
    }
}

/// What a [`Resources`] holds.
pub struct ResourceHandles {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub(crate) jobs_kv: kv::Store,
    pub(crate) gpus_kv: kv::Store,
    pub(crate) nodes_kv: kv::Store,
    pub(crate) held_kv: kv::Store,
    pub(crate) reuse_kv: kv::Store,
    pub(crate) batches_kv: kv::Store,
    pub(crate) files: object_store::ObjectStore,
    /// The events stream, held so that reading a job's last event is one request to the
    /// stream's leader (opening the stream each time cost a stream info request too). Not a
    /// direct get: that may answer from a replica that lags, and the readers fence on it.
    pub(crate) events: stream::Stream,
    /// One results bucket per model (each with the model's result TTL), opened on first use.
    pub(crate) results: Arc<DashMap<String, object_store::ObjectStore>>,
    pub(crate) ack_wait: Duration,
    pub(crate) registry_ttl: Duration,
    /// Which queue a job goes to (`crate::fair`).
    pub(crate) fair_share: crate::config::FairShareConfig,
    /// Each key's `max_running` is its consumers' `max_ack_pending` (`crate::fair::quota_of`).
    pub(crate) quota: crate::config::QuotaConfig,
    /// The fair-share keys' consumers this process made sure of, `(model, lane, key)`.
    pub(crate) keyed_consumers: Arc<dashmap::DashSet<(String, Lane, String)>>,
}

impl Resources {
    /// Creates (or opens) every stream, bucket and consumer for `config`.
    pub async fn ensure(client: async_nats::Client, config: &ClusterConfig) -> Result<Self, StoreError> {
        let names = Names::new(&config.nats.prefix);
        let js = jetstream::new(client.clone());
        // Every stream, bucket and object store below has this many replicas (RAFT on a
        // NATS cluster); an existing one is brought to it.
        let replicas = config.nats.replicas;
        let result_ttl = Duration::from_secs(config.storage.result_ttl_s);

        let jobs_stream = js
            .get_or_create_stream(stream::Config {
                name: names.jobs_stream(),
                subjects: vec![names.jobs_subject_all()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: QUEUE_DEDUP_WINDOW,
                num_replicas: replicas,
                // A queued job's position is counted with direct gets (`nats::queue`).
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| creation_error(&names.jobs_stream(), replicas, e))?;
        settle_stream(&js, &names.jobs_stream(), replicas, false).await?;
        allow_direct_gets(&js, &names.jobs_stream()).await?;

        js.get_or_create_stream(stream::Config {
            name: names.events_stream(),
            subjects: vec![names.events_subject_all()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: result_ttl,
            max_messages_per_subject: MAX_EVENTS_PER_JOB,
            duplicate_window: QUEUE_DEDUP_WINDOW,
            max_consumers: MAX_CONSUMERS_PER_STREAM,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| creation_error(&names.events_stream(), replicas, e))?;
        settle_stream(&js, &names.events_stream(), replicas, true).await?;
        let events = js.get_stream(names.events_stream()).await.map_err(StoreError::nats)?;

        // The results feed (seed 000's backend consumer): each job's end once, kept as long as
        // results are, read by durable consumers that clients create and resume.
        js.get_or_create_stream(stream::Config {
            name: names.finished_stream(),
            subjects: vec![names.finished_subject_all()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: result_ttl,
            duplicate_window: QUEUE_DEDUP_WINDOW,
            max_consumers: MAX_CONSUMERS_PER_STREAM,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| creation_error(&names.finished_stream(), replicas, e))?;
        settle_stream(&js, &names.finished_stream(), replicas, true).await?;
        ensure_previews_stream(&js, &names, replicas).await?;

        let jobs_kv = open_kv(
            &js,
            kv::Config {
                bucket: names.jobs_bucket(),
                description: "kiln job records: the source of truth".into(),
                history: 1,
                max_age: JOB_RECORD_MIN_TTL.max(result_ttl),
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let registry_ttl = Duration::from_millis(config.node.registry_ttl_ms);
        // Per-key TTL (server 2.11+): a key not refreshed within its TTL disappears and its
        // watchers see a delete marker, so a dead node's entries vanish on their own.
        let registry_config = |bucket: String, description: &str| kv::Config {
            bucket,
            description: description.into(),
            history: 1,
            storage: stream::StorageType::File,
            limit_markers: Some(Duration::from_secs(1)),
            num_replicas: replicas,
            ..Default::default()
        };
        let gpus_kv = open_kv(&js, registry_config(names.gpus_bucket(), "kiln registry: one key per GPU slot")).await?;
        let nodes_kv = open_kv(&js, registry_config(names.nodes_bucket(), "kiln registry: one key per node")).await?;
        let held_kv = open_kv(&js, registry_config(names.held_bucket(), "kiln registry: the deliveries each node holds")).await?;

        let files = open_object_store(&js, names.files_bucket(), Duration::from_secs(config.storage.files_ttl_s), replicas).await?;
        // Result reuse: content key -> job id, kept as long as the longest result TTL (a hit
        // is still checked against its own model's TTL).
        let longest_result_ttl = config.models.iter().map(|m| config.result_ttl_s(m)).max().unwrap_or(config.storage.result_ttl_s);
        let reuse_kv = open_kv(
            &js,
            kv::Config {
                bucket: names.reuse_bucket(),
                description: "kiln result reuse: request content key to job id".into(),
                history: 1,
                max_age: Duration::from_secs(longest_result_ttl),
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;

        let batches_kv = open_kv(
            &js,
            kv::Config {
                bucket: names.batches_bucket(),
                description: "kiln batch parent records: items and their end states".into(),
                history: 1,
                max_age: JOB_RECORD_MIN_TTL.max(result_ttl),
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;

        Resources::ensure_webhook_streams(&js, config).await?;

        let resources = Resources(Arc::new(ResourceHandles {
            client,
            js,
            names,
            jobs_kv,
            gpus_kv,
            nodes_kv,
            held_kv,
            reuse_kv,
            batches_kv,
            files,
            events,
            results: Arc::new(DashMap::new()),
            ack_wait: Duration::from_millis(config.nats.ack_wait_ms),
            registry_ttl,
            fair_share: config.fair_share.clone(),
            quota: config.quota.clone(),
            keyed_consumers: Default::default(),
        }));

        for model in &config.models {
            let ttl = Duration::from_secs(config.result_ttl_s(model));
            let store = open_object_store(&resources.js, resources.names.results_bucket(&model.name), ttl, replicas).await?;
            resources.results.insert(model.name.clone(), store);
            for lane in Lane::ALL {
                resources.ensure_consumer(&jobs_stream, &model.name, lane).await?;
            }
        }
        Ok(resources)
    }

    async fn ensure_consumer(&self, stream: &stream::Stream, model: &str, lane: Lane) -> Result<(), StoreError> {
        self.queue_consumer(stream, model, lane, None).await.map(drop)
    }

    /// The durable pull consumer of one queue of a model's lane, created if missing: the lane's
    /// shared queue (`key` `None`), or one fair-share key's (`crate::fair`). Every node's puller
    /// shares it. A key's `max_running` quota is its `max_ack_pending` (JetStream then delivers
    /// no more of its jobs while that many are unacknowledged, i.e. running or waiting for a
    /// retry); an existing consumer whose figure differs from the config is updated, since
    /// `get_or_create` keeps the config a consumer was created with.
    async fn queue_consumer<I>(
        &self,
        stream: &stream::Stream<I>,
        model: &str,
        lane: Lane,
        key: Option<&str>,
    ) -> Result<consumer::PullConsumer, StoreError> {
        let (name, filter_subject) = match key {
            None => (self.names.consumer(model, lane), self.names.job_subject(model, lane)),
            Some(key) => (self.names.consumer_keyed(model, lane, key), self.names.job_subject_keyed(model, lane, key)),
        };
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Attempts are counted in the job record, not here: JetStream must keep
            // redelivering until a node writes an outcome.
            max_deliver: -1,
            max_ack_pending: max_ack_pending(&self.quota, key),
            ..Default::default()
        };
        let mut consumer = stream.get_or_create_consumer(&name, config.clone()).await.map_err(StoreError::nats)?;
        if consumer.cached_info().config.max_ack_pending != config.max_ack_pending {
            tracing::info!(consumer = %name, max_ack_pending = config.max_ack_pending, "the key's max_running quota changed: updating its consumer");
            consumer = stream.update_consumer(config).await.map_err(StoreError::nats)?;
        }
        Ok(consumer)
    }

    /// Jobs of the fair-share key `key` in `model`'s two lanes: waiting to start (its
    /// consumers' `num_pending`) and delivered, not yet acked (`num_ack_pending`: running or
    /// waiting for a retry). A consumer not made yet holds none. One consumer-info request per
    /// lane, both at once. Feeds the `max_queued` quota.
    pub async fn key_queue(&self, model: &str, key: &str) -> Result<KeyJobs, StoreError> {
        let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        let lanes = Lane::ALL.map(|lane| {
            let stream = &stream;
            let name = self.names.consumer_keyed(model, lane, key);
            async move {
                match stream.consumer_info(&name).await {
                    Ok(info) => Ok(KeyJobs { queued: info.num_pending, running: info.num_ack_pending as u64 }),
                    Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(KeyJobs::default()),
                    Err(e) => Err(StoreError::nats(e)),
                }
            }
        });
        let mut total = KeyJobs::default();
        for lane in futures::future::join_all(lanes).await {
            let lane = lane?;
            total.queued += lane.queued;
            total.running += lane.running;
        }
        Ok(total)
    }

    /// The pull consumer of one model's lane (shared by every node).
    pub async fn consumer(&self, model: &str, lane: Lane) -> Result<consumer::PullConsumer, StoreError> {
        let stream = self.js.get_stream(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        stream.get_consumer(&self.names.consumer(model, lane)).await.map_err(StoreError::nats)
    }

    /// The pull consumer of one fair-share key's queue in a model's lane, created if missing.
    pub async fn keyed_consumer(&self, model: &str, lane: Lane, key: &str) -> Result<consumer::PullConsumer, StoreError> {
        let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        let consumer = self.queue_consumer(&stream, model, lane, Some(key)).await?;
        self.keyed_consumers.insert((model.to_string(), lane, key.to_string()));
        Ok(consumer)
    }

    /// Makes sure a fair-share key's consumer exists before its first job is enqueued (once per
    /// key in this process): its queue then counts in the queue figures and admission control
    /// from the first job on, even while no node serves the model.
    pub(crate) async fn ensure_keyed_consumer(&self, model: &str, lane: Lane, key: &str) -> Result<(), StoreError> {
        if !self.keyed_consumers.contains(&(model.to_string(), lane, key.to_string())) {
            self.keyed_consumer(model, lane, key).await?;
        }
        Ok(())
    }

    /// The queues of `model` that hold messages now, by subject: each lane's shared queue and
    /// its keys' (`JobSubject::parse` reads them), with how many messages each holds (waiting,
    /// running or waiting for a redelivery). One stream-info request.
    pub async fn queues_holding_jobs(&self, model: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        let mut subjects = stream.info_with_subjects(self.names.jobs_subject_model(model)).await.map_err(StoreError::nats)?;
        let mut held = vec![];
        while let Some(entry) = futures::StreamExt::next(&mut subjects).await {
            let (subject, count) = entry.map_err(StoreError::nats)?;
            if count > 0 {
                held.push((subject, count as u64));
            }
        }
        Ok(held)
    }

    /// Jobs waiting (not yet delivered) in a model's two lanes, every queue of each; feeds
    /// admission control.
    pub async fn queued_count(&self, model: &str) -> Result<u64, StoreError> {
        let mut total = 0;
        for lane in Lane::ALL {
            total += self.lane_consumers(model, lane).await?.iter().map(|c| c.num_pending).sum::<u64>();
        }
        Ok(total)
    }

    /// The consumers of one lane of a model, as they are now: its shared queue's and each
    /// fair-share key's (`crate::fair`). Lists the queue stream's consumers (one request per
    /// 256 of them).
    pub async fn lane_consumers(&self, model: &str, lane: Lane) -> Result<Vec<consumer::Info>, StoreError> {
        let stream = self.js.get_stream_no_info(self.names.jobs_stream()).await.map_err(StoreError::nats)?;
        let shared = self.names.job_subject(model, lane);
        let keyed = format!("{shared}.");
        let mut infos = stream.consumers();
        let mut lane_consumers = vec![];
        while let Some(info) = futures::StreamExt::next(&mut infos).await {
            let info = info.map_err(StoreError::nats)?;
            if info.config.filter_subject == shared || info.config.filter_subject.starts_with(&keyed) {
                lane_consumers.push(info);
            }
        }
        Ok(lane_consumers)
    }

    /// The job an identical request (`key`: model, input contents and params) made.
    pub async fn reuse_lookup(&self, key: &str) -> Result<Option<String>, StoreError> {
        let entry = self.reuse_kv.get(key).await.map_err(StoreError::nats)?;
        Ok(entry.map(|b| String::from_utf8_lossy(&b).to_string()))
    }

    pub async fn reuse_remember(&self, key: &str, job_id: &str) -> Result<(), StoreError> {
        self.reuse_kv.put(key, job_id.to_string().into()).await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// The JetStream streams behind every stream, bucket and object store [`Resources::ensure`]
    /// creates (a bucket `b` is stream `KV_b`, an object store `OBJ_b`). The per-model results
    /// stores are left out: they are made on first use.
    pub fn stream_names(&self) -> Vec<String> {
        let n = &self.names;
        let buckets = [n.jobs_bucket(), n.gpus_bucket(), n.nodes_bucket(), n.held_bucket(), n.batches_bucket(), n.reuse_bucket()];
        let mut names = vec![n.jobs_stream(), n.events_stream(), n.finished_stream(), n.previews_stream()];
        names.extend(buckets.iter().map(|b| format!("KV_{b}")));
        names.push(format!("OBJ_{}", n.files_bucket()));
        names
    }

    /// Which of [`Resources::stream_names`] the server does not have now (one stream info
    /// request each, all at once): a node's readiness. An error is a server that did not answer.
    pub async fn missing_streams(&self) -> Result<Vec<String>, StoreError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        use async_nats::jetstream::ErrorCode;
        let names = self.stream_names();
        let answers = futures::future::join_all(names.iter().map(|name| self.js.get_stream(name))).await;
        let mut missing = vec![];
        for (name, answer) in names.into_iter().zip(answers) {
            match answer {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
                    missing.push(name)
                }
                Err(e) => return Err(StoreError::nats(e)),
            }
        }
        Ok(missing)
    }

    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }
    pub fn registry_ttl(&self) -> Duration {
        self.registry_ttl
    }
}

/// A stream, bucket or object store could not be made: when the server is not a cluster, or
/// the cluster has fewer JetStream servers than `nats.replicas`, say so (the server's own words
/// are "replicas > 1 not supported in non-clustered mode" and "insufficient resources").
pub(crate) fn creation_error(what: &str, replicas: usize, error: impl std::fmt::Display) -> StoreError {
    let text = error.to_string();
    let lower = text.to_lowercase();
    if replicas > 1 && (lower.contains("insufficient resources") || lower.contains("non-clustered")) {
        return StoreError::Nats(format!(
            "cannot create {what} with nats.replicas = {replicas}: that needs a NATS cluster with at least {replicas} \
             JetStream servers up (run them, or lower nats.replicas): {text}"
        ));
    }
    StoreError::Nats(format!("cannot create {what}: {text}"))
}

/// The `max_ack_pending` of a queue's consumer: a fair-share key's `max_running` quota where one
/// is set, else [`UNLIMITED_ACK_PENDING`].
fn max_ack_pending(quota: &crate::config::QuotaConfig, key: Option<&str>) -> i64 {
    match key.map(|key| crate::fair::quota_of(quota, key).max_running) {
        Some(max_running) if max_running > 0 => max_running as i64,
        _ => UNLIMITED_ACK_PENDING,
    }
}

async fn open_kv(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, StoreError> {
    let store = match js.get_key_value(&config.bucket).await {
        Ok(store) => store,
        Err(_) => match js.create_key_value(config.clone()).await {
            Ok(store) => store,
            // Another node created it between our get and create.
            Err(e) => js.get_key_value(&config.bucket).await.map_err(|_| creation_error(&config.bucket, config.num_replicas, e))?,
        },
    };
    settle_stream(js, &format!("KV_{}", config.bucket), config.num_replicas, false).await?;
    Ok(store)
}

/// Brings an existing stream up to `replicas`, and with `raise_consumers` to the consumer
/// limit [`MAX_CONSUMERS_PER_STREAM`] (a stream made by an older Kiln, or an object store's,
/// whose config async-nats does not expose). A deployment made with one replica moves to three
/// when a node starts with `nats.replicas = 3`. The server scales a stream in place (new peers catch up from the
/// leader, its consumers follow), so no job is lost on the way: `tests/nats_cluster.rs`.
pub(crate) async fn settle_stream(js: &jetstream::Context, stream: &str, replicas: usize, raise_consumers: bool) -> Result<(), StoreError> {
    let mut s = js.get_stream(stream).await.map_err(StoreError::nats)?;
    let mut config = s.info().await.map_err(StoreError::nats)?.config.clone();
    let mut changed = false;
    if raise_consumers && config.max_consumers != MAX_CONSUMERS_PER_STREAM {
        config.max_consumers = MAX_CONSUMERS_PER_STREAM;
        changed = true;
    }
    // Only ever up: a node started without `nats.replicas` must not shrink a replicated
    // deployment (scaling down is the operator's call: `nats stream edit --replicas`).
    if config.num_replicas < replicas {
        tracing::info!(stream, from = config.num_replicas, to = replicas, "raising the stream's replicas (nats.replicas)");
        config.num_replicas = replicas;
        changed = true;
    } else if config.num_replicas > replicas {
        tracing::warn!(
            stream,
            has = config.num_replicas,
            configured = replicas,
            "the stream has more replicas than nats.replicas; leaving it"
        );
    }
    if changed {
        js.update_stream(config).await.map_err(|e| creation_error(stream, replicas, e))?;
    }
    Ok(())
}

/// Turns direct gets on for a stream made by an older Kiln without them.
async fn allow_direct_gets(js: &jetstream::Context, stream: &str) -> Result<(), StoreError> {
    let mut s = js.get_stream(stream).await.map_err(StoreError::nats)?;
    let mut config = s.info().await.map_err(StoreError::nats)?.config.clone();
    if !config.allow_direct {
        config.allow_direct = true;
        js.update_stream(config).await.map_err(StoreError::nats)?;
    }
    Ok(())
}

/// Opens (or creates) an object store, then settles its stream: `replicas`, and the consumer
/// limit (an object store's config does not expose it).
async fn open_object_store(
    js: &jetstream::Context,
    bucket: String,
    max_age: Duration,
    replicas: usize,
) -> Result<object_store::ObjectStore, StoreError> {
    let store = match js.get_object_store(&bucket).await {
        Ok(store) => store,
        Err(_) => {
            let config = object_store::Config {
                bucket: bucket.clone(),
                max_age,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            };
            match js.create_object_store(config).await {
                Ok(store) => store,
                // Another node created it between our get and create.
                Err(e) => js.get_object_store(&bucket).await.map_err(|_| creation_error(&bucket, replicas, e))?,
            }
        }
    };
    settle_stream(js, &format!("OBJ_{bucket}"), replicas, true).await?;
    Ok(store)
}

// The previews stream (`previews.rs` publishes into it).

/// Most bytes the previews stream holds: the newest preview of 1,000 jobs at the size limit.
/// Past it the oldest go first (previews of jobs that ended long ago).
const MAX_PREVIEW_STREAM_BYTES: i64 = 1000 * crate::preview::MAX_PREVIEW_BYTES as i64;

/// The stream's settings: the newest message of each job, in memory (a preview is worth less
/// than a disk write, and a nats-server restart losing one costs nothing a job needs).
pub(crate) fn previews_stream_config(names: &Names, replicas: usize) -> stream::Config {
    stream::Config {
        name: names.previews_stream(),
        description: Some("kiln live previews: the newest of each job".into()),
        subjects: vec![names.previews_subject_all()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::Memory,
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(crate::preview::PREVIEW_MAX_AGE_S),
        max_bytes: MAX_PREVIEW_STREAM_BYTES,
        // Headers and all: a preview at the limit fits.
        max_message_size: crate::preview::MAX_PREVIEW_BYTES as i32 + 4096,
        discard: stream::DiscardPolicy::Old,
        max_consumers: MAX_CONSUMERS_PER_STREAM,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Makes the previews stream (idempotent), or brings an existing one to `replicas`.
pub(crate) async fn ensure_previews_stream(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<(), StoreError> {
    let config = previews_stream_config(names, replicas);
    js.get_or_create_stream(config).await.map_err(|e| creation_error(&names.previews_stream(), replicas, e))?;
    settle_stream(js, &names.previews_stream(), replicas, true).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_crypto_provider_is_installed_for_tls_connections() {
        super::install_crypto_provider();
        super::install_crypto_provider(); // twice is fine
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
