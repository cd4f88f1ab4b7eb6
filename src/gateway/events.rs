//! Job and batch events for HTTP clients: one JetStream consumer per job however many SSE
//! clients follow it ([`Feeds`]), and the rule that resumes a stream after a reconnect.
//!
//! Every event's SSE `id` is its sequence number in the events stream. That number is the same
//! on every gateway (it is the stream's), so a client that reconnects to another gateway with
//! `Last-Event-ID: n` gets exactly the events after `n`: no gap, no repeat.
//!
//! A feed replays the job's whole history into memory, then follows live; a subscriber gets
//! the history past its `Last-Event-ID`, then the live events, and ends after the terminal
//! one. The feed's consumer stops when its last subscriber goes (a client that disconnects
//! leaves no consumer behind) or after the terminal event.
//!
//! Every SSE response starts with a `retry:` field ([`RETRY`]), and one that would resume
//! after the terminal event is answered `204 No Content` instead ([`resumed_after_the_end`]):
//! the `EventSource` spec's way to tell a browser to stop reconnecting (an empty 200 made it
//! reconnect in a loop).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use kiln_core::nats::Names;
use kiln_core::protocol::Event;
use kiln_core::task::{self, TaskKind};
use tokio::sync::broadcast;

/// An event with its sequence number in the events stream (its SSE `id`).
pub type Sequenced = (u64, Event);

/// Live events buffered per feed for slow subscribers; one that falls further behind catches
/// up from the feed's history instead (nothing is skipped).
const LIVE_BUFFER: usize = 1024;
/// How often a feed checks whether anyone still follows it.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// How long a browser waits before it reconnects a broken stream: the `retry:` field each
/// stream starts with (browsers' own default is about 3 s, and varies).
pub const RETRY: Duration = Duration::from_millis(3000);

/// How long a resumed stream of a settled job or batch waits for its feed to say whether an
/// event follows the client's last one, before it streams anyway (the feed replays the
/// history, a matter of milliseconds).
pub const SETTLED_PATIENCE: Duration = Duration::from_secs(5);

/// Whether a request is answered `204 No Content` instead of a stream: it resumes (`after`,
/// from `Last-Event-ID`), the job or batch has settled, and no event follows the client's last
/// one (`next`, as the feed says): the client has the terminal event. A settled job's
/// feed ends after its terminal event, so `next` is `None` only then. Pure.
pub fn resumed_after_the_end(after: Option<u64>, settled: bool, next: Option<u64>) -> bool {
    after.is_some() && settled && next.is_none()
}

/// An SSE response of `events`: a `retry:` field first, keep-alive comments while idle, and the
/// count of open streams (`kiln_http_sse_clients`) up while it is open.
pub fn sse_response<S>(events: S) -> Response
where
    S: Stream<Item = Result<SseEvent, std::convert::Infallible>> + Send + 'static,
{
    let open = SseClient::open();
    let retry = futures::stream::once(async { Ok(SseEvent::default().retry(RETRY)) });
    let events = retry.chain(events).map(move |e| {
        let _open = &open;
        e
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// One open SSE stream, counted in `kiln_http_sse_clients` until it drops (its end, or its
/// client gone).
struct SseClient;

impl SseClient {
    fn open() -> SseClient {
        metrics::gauge!(kiln_core::metrics::HTTP_SSE_CLIENTS).increment(1.0);
        SseClient
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        metrics::gauge!(kiln_core::metrics::HTTP_SSE_CLIENTS).decrement(1.0);
    }
}

/// `204 No Content`, for a stream resumed after its end ([`resumed_after_the_end`]).
pub fn no_content() -> Response {
    axum::http::StatusCode::NO_CONTENT.into_response()
}

/// Parses a `Last-Event-ID` header: the sequence number of the last event the client got.
/// `None` for no header; an error for one that is not a number Kiln sent.
pub fn parse_last_event_id(value: Option<&str>) -> Result<Option<u64>, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| format!("Last-Event-ID {v:?} is not an event id this gateway sent (a number)")),
    }
}

/// The events after `after` in `history`, in order. Pure: what a (re)connecting subscriber is
/// sent before the live ones.
pub fn events_after(history: &[Sequenced], after: Option<u64>) -> Vec<Sequenced> {
    history.iter().filter(|(seq, _)| after.is_none_or(|a| *seq > a)).cloned().collect()
}

struct Feed {
    /// Every event so far, and the sender of live ones: `None` once the feed stopped.
    state: Mutex<FeedState>,
}

struct FeedState {
    history: Vec<Sequenced>,
    live: Option<broadcast::Sender<Sequenced>>,
}

impl Feed {
    /// Stopped before the terminal event (NATS failed under it): a new subscriber needs a new
    /// feed.
    fn broken(&self) -> bool {
        let state = self.state.lock().expect("feed lock");
        state.live.is_none() && !state.history.last().is_some_and(|(_, e)| e.is_terminal())
    }
}

/// The feeds of one tenant's connection, by job (or batch) id.
#[derive(Clone)]
pub struct Feeds {
    js: jetstream::Context,
    names: Names,
    feeds: Arc<Mutex<HashMap<String, Weak<Feed>>>>,
    /// The events stream's handle, looked up once: every feed creates its consumer on it, and
    /// a lookup per feed would put one more JetStream round trip before each client's first
    /// event.
    stream: Arc<tokio::sync::OnceCell<jetstream::stream::Stream>>,
}

impl Feeds {
    pub fn new(nats: async_nats::Client, names: Names) -> Feeds {
        Feeds { js: jetstream::new(nats), names, feeds: Default::default(), stream: Default::default() }
    }

    fn feed(&self, id: &str) -> Arc<Feed> {
        let mut feeds = self.feeds.lock().expect("feeds lock");
        if let Some(feed) = feeds.get(id).and_then(Weak::upgrade).filter(|f| !f.broken()) {
            return feed;
        }
        feeds.retain(|_, w| w.strong_count() > 0);
        let live = broadcast::channel(LIVE_BUFFER).0;
        let feed = Arc::new(Feed { state: Mutex::new(FeedState { history: vec![], live: Some(live) }) });
        feeds.insert(id.to_string(), Arc::downgrade(&feed));
        let (js, stream, name) = (self.js.clone(), self.stream.clone(), self.names.events_stream());
        let events = async move { stream.get_or_try_init(|| js.get_stream(name)).await.cloned().ok() };
        task::spawn(TaskKind::Feed, "event feed", follow(events, self.names.events_subject(id), Arc::downgrade(&feed)));
        feed
    }

    /// The events of `id` after `after` (all of them for `None`), then the live ones, ending
    /// after the terminal event (or when the feed breaks: the client reconnects).
    pub fn subscribe(&self, id: &str, after: Option<u64>) -> impl Stream<Item = Sequenced> + Send + 'static {
        let feed = self.feed(id);
        let sub = Subscription { feed, last: after, pending: Default::default(), live: None, caught_up: false, done: false };
        futures::stream::unfold(sub, next_event)
    }
}

struct Subscription {
    feed: Arc<Feed>,
    last: Option<u64>,
    pending: std::collections::VecDeque<Sequenced>,
    live: Option<broadcast::Receiver<Sequenced>>,
    /// The history was read and the feed had stopped: nothing more will come.
    caught_up: bool,
    done: bool,
}

async fn next_event(mut sub: Subscription) -> Option<(Sequenced, Subscription)> {
    loop {
        if sub.done {
            return None;
        }
        if let Some(e) = sub.pending.pop_front() {
            sub.last = Some(e.0);
            sub.done = e.1.is_terminal();
            return Some((e, sub));
        }
        if sub.caught_up {
            return None;
        }
        if sub.live.is_none() {
            // Subscribe and read the history under one lock: an event the feed adds after
            // the snapshot is in the receiver; one in both is skipped by its number.
            let state = sub.feed.state.lock().expect("feed lock");
            sub.pending.extend(events_after(&state.history, sub.last));
            match &state.live {
                Some(tx) => sub.live = Some(tx.subscribe()),
                None => sub.caught_up = true,
            }
            continue;
        }
        match sub.live.as_mut().expect("subscribed").recv().await {
            Ok(e) if sub.last.is_some_and(|l| e.0 <= l) => continue,
            Ok(e) => sub.pending.push_back(e),
            // Fell behind the live buffer: catch up from the history.
            Err(broadcast::error::RecvError::Lagged(_)) => sub.live = None,
            // The feed stopped: whatever it had is in the history.
            Err(broadcast::error::RecvError::Closed) => sub.live = None,
        }
    }
}

/// Reads the events of one subject from the first, into the feed, until the terminal event or
/// until nobody follows the feed any more; then deletes its consumer (a client that went away
/// leaves none behind). If NATS fails it under the feed, the feed ends: its subscribers' streams
/// end, and their clients reconnect with their `Last-Event-ID` to a new feed.
async fn follow(stream: impl std::future::Future<Output = Option<jetstream::stream::Stream>>, subject: String, feed: Weak<Feed>) {
    let name = format!("gw-{}", uuid::Uuid::new_v4().simple());
    let opened = async {
        let stream = stream.await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                name: Some(name.clone()),
                filter_subject: subject.clone(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::None,
                memory_storage: true,
                // Should this gateway die, the server drops the consumer soon after.
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .ok()?;
        let messages = consumer.messages().await.ok()?;
        Some((stream, messages))
    };
    let Some((stream, mut messages)) = opened.await else {
        tracing::warn!(subject, "cannot follow events");
        if let Some(feed) = feed.upgrade() {
            feed.state.lock().expect("feed lock").live = None;
        }
        return;
    };
    loop {
        let next = tokio::time::timeout(IDLE_CHECK, messages.next()).await;
        let Some(feed) = feed.upgrade() else { break };
        let message = match next {
            Err(_) => continue,
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(m))) => m,
        };
        let Ok(info) = message.info() else { continue };
        let seq = info.stream_sequence;
        let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else { continue };
        let terminal = event.is_terminal();
        {
            let mut state = feed.state.lock().expect("feed lock");
            state.history.push((seq, event.clone()));
            if let Some(live) = &state.live {
                let _ = live.send((seq, event));
            }
        }
        if terminal {
            break;
        }
    }
    // Stopped: subscribers finish from the history.
    if let Some(feed) = feed.upgrade() {
        feed.state.lock().expect("feed lock").live = None;
    }
    drop(messages);
    let _ = stream.delete_consumer(&name).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::job::JobState;

    fn ev(n: u64) -> Sequenced {
        (n, Event::status("j", 1, JobState::Running))
    }

    #[test]
    fn last_event_id_is_a_number_or_absent() {
        assert_eq!(parse_last_event_id(None), Ok(None));
        assert_eq!(parse_last_event_id(Some(" 42 ")), Ok(Some(42)));
        assert!(parse_last_event_id(Some("abc")).is_err());
        assert!(parse_last_event_id(Some("-1")).is_err());
    }

    proptest::proptest! {
        /// A client that got any prefix of the history and reconnects with the last id it got
        /// receives exactly the rest: together, the whole history once.
        #[test]
        fn a_resume_after_any_prefix_completes_the_history(gaps in proptest::collection::vec(1u64..5, 0..40), cut in 0usize..41) {
            let mut seq = 0;
            let history: Vec<Sequenced> = gaps.iter().map(|g| { seq += g; ev(seq) }).collect();
            let cut = cut.min(history.len());
            let got = &history[..cut];
            let last = got.last().map(|e| e.0);
            let mut all: Vec<u64> = got.iter().map(|e| e.0).collect();
            all.extend(events_after(&history, last).iter().map(|e| e.0));
            proptest::prop_assert_eq!(all, history.iter().map(|e| e.0).collect::<Vec<_>>());
        }
    }

    #[test]
    fn only_a_resume_of_a_settled_stream_with_nothing_left_is_204() {
        assert!(resumed_after_the_end(Some(9), true, None));
        assert!(!resumed_after_the_end(None, true, None), "a first request streams (possibly nothing)");
        assert!(!resumed_after_the_end(Some(9), false, None), "a running job's stream broke: reconnecting is right");
        assert!(!resumed_after_the_end(Some(9), true, Some(12)), "events follow the last one the client got");
    }

    #[test]
    fn a_reconnect_gets_exactly_the_events_after_its_last_id() {
        let history: Vec<Sequenced> = [3, 5, 9, 12].into_iter().map(ev).collect();
        let seqs = |after| events_after(&history, after).into_iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(seqs(None), vec![3, 5, 9, 12]);
        assert_eq!(seqs(Some(5)), vec![9, 12]);
        assert_eq!(seqs(Some(4)), vec![5, 9, 12]);
        assert_eq!(seqs(Some(12)), Vec::<u64>::new());
    }
}
