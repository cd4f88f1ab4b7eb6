//! Live previews: a small image a running job shows of itself (an intermediate diffusion step, a
//! render in progress). docs/PROTOCOL.md "Live previews".
//!
//! A worker sends one with a `preview` line ([`crate::worker::FromWorker::Preview`]); the node
//! lets through at most one per the model's `preview_interval_ms` ([`preview_due`], the same
//! rule the Python SDK keeps on its side) and publishes it on `kiln.previews.<job_id>`, the raw
//! bytes as the body and what they are in the headers named here. The stream `KILN_PREVIEWS`
//! keeps only the newest one of each job, for [`PREVIEW_MAX_AGE_S`]: previews are not
//! artifacts, not events, and not replayed beyond that one.

use serde::{Deserialize, Serialize};

/// Largest preview, decoded: a bigger one is dropped by the node (with a log line). Small
/// enough that a follower's live stream stays light, large enough for a 512x512 JPEG.
pub const MAX_PREVIEW_BYTES: usize = 256 * 1024;
/// The interval a model gets when its config names none: at most one preview per 500 ms.
pub const DEFAULT_PREVIEW_INTERVAL_MS: u64 = 500;
/// How long the newest preview of a job is kept (the `KILN_PREVIEWS` stream's `max_age`):
/// long enough for a follower that opens a running job's page late, short enough that no one
/// mistakes a preview for a result.
pub const PREVIEW_MAX_AGE_S: u64 = 600;

/// Header: the job the preview is of.
pub const HEADER_JOB_ID: &str = "Kiln-Job-Id";
/// Header: the attempt that made it.
pub const HEADER_ATTEMPT: &str = "Kiln-Attempt";
/// Header: its number among the previews of that attempt the node let through, from 1.
pub const HEADER_SEQ: &str = "Kiln-Preview-Seq";
/// Header: when the node let it through its throttle, Unix ms (so two are an interval apart).
pub const HEADER_TS_MS: &str = "Kiln-Ts-Ms";
/// Header: the bytes' media type (`image/png`, `image/jpeg`, `image/webp`).
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";

/// True when a preview may go now: none went before (`last_ms` `None`), or `interval_ms` have
/// passed since the last one that went. An interval of 0 turns previews off. Times are any
/// monotonic milliseconds (the node's, the SDK's own clock).
pub fn preview_due(last_ms: Option<u64>, now_ms: u64, interval_ms: u64) -> bool {
    if interval_ms == 0 {
        return false;
    }
    last_ms.is_none_or(|last| now_ms.saturating_sub(last) >= interval_ms)
}

/// A preview as HTTP clients get it in a job's SSE stream (`event: preview`): what the headers
/// say, and the bytes in base64 (an `<img src="data:..">` away in a browser).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PreviewView {
    pub job_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub content_type: String,
    pub ts_ms: u64,
    /// The image, base64 (standard alphabet, padded).
    pub data_base64: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_goes_then_one_per_interval() {
        assert!(preview_due(None, 0, 500));
        assert!(!preview_due(Some(1000), 1499, 500));
        assert!(preview_due(Some(1000), 1500, 500));
        assert!(!preview_due(None, 0, 0), "interval 0: previews are off");
        assert!(!preview_due(Some(2000), 1000, 500), "a clock that went back lets nothing through");
    }

    proptest! {
        /// Whatever the times a worker sends at, the previews let through are at least an
        /// interval apart, and none is held back longer than needed: a preview is dropped only
        /// when the last one let through is less than an interval old.
        #[test]
        fn what_goes_is_an_interval_apart_and_nothing_more_is_dropped(
            gaps in proptest::collection::vec(0u64..400, 1..200),
            interval in 1u64..1000,
        ) {
            let (mut now, mut last) = (0u64, None::<u64>);
            for gap in gaps {
                now += gap;
                let due = preview_due(last, now, interval);
                prop_assert_eq!(due, last.is_none_or(|l| now - l >= interval));
                if due {
                    if let Some(l) = last {
                        prop_assert!(now - l >= interval);
                    }
                    last = Some(now);
                }
            }
        }
    }
}
