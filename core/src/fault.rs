//! Named fault points at the dangerous places, compiled in only with the `fault-injection`
//! feature (which `cargo test` turns on through the root crate's dev-dependencies; release
//! builds have none: every call compiles to nothing).
//!
//! `KILN_FAULTS` names the points to trigger, comma separated: `point` fires at every hit,
//! `point@N` only at the N-th hit in this process. `KILN_FAULT_DIR` arms points while the
//! process runs (what `kiln chaos` does): a file named after a point in that folder makes its
//! next hit fire once (the hit removes the file). Points:
//!
//! | point                        | where                                               | effect        |
//! |------------------------------|-----------------------------------------------------|---------------|
//! | `panic_before_run`           | inference actor, before the engine runs a job       | panic         |
//! | `panic_in_engine_thread`     | the torch thread of a slot, before a job runs       | panic (caught)|
//! | `panic_in_compression_worker`| a compression worker, before it runs a command      | panic         |
//! | `abort_after_terminal_write` | job actor, after the terminal write, before the ack | process abort |
//! | `abort_in_launch`            | a submit, after its queue message, before its record (`Resources::launch_job`) | process abort |
//! | `abort_before_batch_launch`  | settling into a batch, after the write that launched held items or a fallback, before making their jobs | process abort |
//! | `lose_record_write_answer`   | a job record's compare-and-set write (`Resources::update_job`), once stored | its caller hears a timeout, as when the answer is lost |

/// Whether `point` fires now.
#[cfg(feature = "fault-injection")]
fn fires(point: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static HITS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
    if let Some(dir) = std::env::var_os("KILN_FAULT_DIR") {
        // Removing the file claims it: exactly one hit fires per file created.
        if std::fs::remove_file(std::path::Path::new(&dir).join(point)).is_ok() {
            return true;
        }
    }
    let Ok(spec) = std::env::var("KILN_FAULTS") else { return false };
    let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
    let count = hits.get_or_insert_with(HashMap::new).entry(point.to_string()).or_insert(0);
    *count += 1;
    spec.split(',').map(str::trim).any(|s| match s.split_once('@') {
        Some((name, n)) => name == point && n.parse::<u32>().ok() == Some(*count),
        None => s == point,
    })
}

/// Whether this build has the fault points (the `fault-injection` feature).
pub const fn compiled_in() -> bool {
    cfg!(feature = "fault-injection")
}

/// Whether `point` is armed and fires at this hit (always false without the feature): for
/// the points whose effect is not a panic or an abort.
#[inline(always)]
pub fn fires_at(point: &str) -> bool {
    #[cfg(feature = "fault-injection")]
    if fires(point) {
        eprintln!("fault injected: {point}");
        return true;
    }
    let _ = point;
    false
}

/// Panics at `point` when it is armed.
#[inline(always)]
pub fn panic_at(point: &str) {
    #[cfg(feature = "fault-injection")]
    if fires(point) {
        panic!("fault injected: {point}");
    }
    let _ = point;
}

/// Aborts the whole process at `point` when it is armed (a crash, as SIGKILL would be).
#[inline(always)]
pub fn abort_at(point: &str) {
    #[cfg(feature = "fault-injection")]
    if fires(point) {
        eprintln!("fault injected: {point}; aborting");
        std::process::abort();
    }
    let _ = point;
}
