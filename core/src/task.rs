//! Every task a Kiln process spawns, under a named [`TaskKind`] that says what stops it and
//! what its panic does (Restate's `TaskKind`): a reader sees from the spawn alone whether the
//! task dies with its owner or runs to its own end, and nobody has to remember to abort it.
//!
//! [`spawn`] starts a task and returns its [`TaskGuard`]: awaiting the guard awaits the task
//! (as a `JoinHandle` does); dropping it aborts the task when its kind is
//! [`Cancel::WithOwner`], and lets it run on otherwise. A panic in any task is logged with its
//! kind and name, and then is the task's end as before (whoever awaits the guard sees it as a
//! `JoinError`); no kind's panic stops the process.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use tokio::task::{JoinError, JoinHandle};

/// What a task is for, and so what stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// A loop that serves an actor or a handle for as long as it lives (a model's puller, a
    /// subscription's listener, a registry cache's watch): stopped with its owner.
    OwnerLoop,
    /// A running job's keep-alive (its `in_progress` and record re-reads): stopped with its
    /// job, however the job ends. A keep-alive left behind would keep a dead delivery alive.
    JobKeepAlive,
    /// Part of one job's work that the job awaits (its progress forwarder, a stage command's
    /// output readers): stopped with its job.
    JobPart,
    /// One pump of an actor-cluster tunnel: runs until its session closes, which it watches
    /// itself.
    TunnelPump,
    /// Answers one request, then ends (a remote reply's decoding, a cancel answered off an
    /// actor's mailbox, a dial, a slot's TorchScript run): never stopped from outside, since
    /// someone waits for its answer; bounded by its request's own timeout.
    Reply,
    /// Reads a child process's output until the process closes it.
    ChildOutput,
    /// A client's work on one of its jobs (following its events, fetching its results) that the
    /// client awaits: stopped with the client.
    ClientWork,
    /// Tidies up after something that was dropped (an upload's chunks purged): nobody waits
    /// for it, and it runs to its end.
    Cleanup,
    /// Feeds a consumer (an HTTP response's body, a job's event feed) until the consumer goes
    /// away, which it watches itself: runs to its own end.
    Feed,
    /// Serves one HTTP connection until it closes; the server's graceful shutdown watches it.
    Connection,
    /// Refreshes figures the process exports on a period (the queue gauges): stopped with its
    /// owner; an error skips one refresh.
    Refresh,
}

/// What dropping a task's guard does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The task is aborted: it belongs to whoever holds the guard.
    WithOwner,
    /// Nothing: the task runs to its own end.
    Never,
}

impl TaskKind {
    pub fn cancel(self) -> Cancel {
        match self {
            TaskKind::OwnerLoop | TaskKind::JobKeepAlive | TaskKind::JobPart | TaskKind::ClientWork | TaskKind::Refresh => {
                Cancel::WithOwner
            }
            TaskKind::TunnelPump | TaskKind::Reply | TaskKind::ChildOutput | TaskKind::Cleanup | TaskKind::Feed | TaskKind::Connection => {
                Cancel::Never
            }
        }
    }
}

/// A spawned task. Awaiting it awaits the task; dropping it aborts the task where its kind
/// says so ([`TaskKind::cancel`]).
pub struct TaskGuard<T> {
    kind: TaskKind,
    handle: JoinHandle<T>,
}

impl<T> TaskGuard<T> {
    pub fn kind(&self) -> TaskKind {
        self.kind
    }
    /// Stops the task now, whatever its kind.
    pub fn abort(&self) {
        self.handle.abort();
    }
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl<T> Future for TaskGuard<T> {
    type Output = Result<T, JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle).poll(cx)
    }
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        if self.kind.cancel() == Cancel::WithOwner {
            self.handle.abort();
        }
    }
}

/// Spawns `future` on the current runtime as a task of `kind`, named `name` in its logs.
pub fn spawn<F>(kind: TaskKind, name: &'static str, future: F) -> TaskGuard<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    TaskGuard { kind, handle: tokio::spawn(logging_panics(kind, name, future)) }
}

/// As [`spawn`], on `runtime` (from code that is not inside a task, such as a `Drop`).
pub fn spawn_on<F>(runtime: &tokio::runtime::Handle, kind: TaskKind, name: &'static str, future: F) -> TaskGuard<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    TaskGuard { kind, handle: runtime.spawn(logging_panics(kind, name, future)) }
}

/// `future`, with a panic logged before it ends the task as it would have anyway.
async fn logging_panics<F: Future>(kind: TaskKind, name: &'static str, future: F) -> F::Output {
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(output) => output,
        Err(panic) => {
            tracing::error!(task = name, kind = ?kind, "task panicked");
            std::panic::resume_unwind(panic)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A task that sets `done` if it ever gets past a 50 ms sleep.
    fn sleeper(done: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> impl Future<Output = ()> + Send + 'static {
        let done = done.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_guard_dropped_stops_its_task_only_where_the_kind_says_so() {
        for kind in [
            TaskKind::OwnerLoop,
            TaskKind::JobKeepAlive,
            TaskKind::JobPart,
            TaskKind::TunnelPump,
            TaskKind::Reply,
            TaskKind::ChildOutput,
            TaskKind::ClientWork,
            TaskKind::Cleanup,
            TaskKind::Feed,
            TaskKind::Connection,
            TaskKind::Refresh,
        ] {
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            drop(spawn(kind, "sleeper", sleeper(&done)));
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ran_on = done.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(ran_on, kind.cancel() == Cancel::Never, "{kind:?}");
        }
    }

    #[tokio::test]
    async fn awaiting_a_guard_gives_the_tasks_output_or_its_panic() {
        assert_eq!(spawn(TaskKind::Reply, "answer", async { 42 }).await.unwrap(), 42);
        let panicked = spawn(TaskKind::JobPart, "panics", async { panic!("on purpose") }).await;
        assert!(panicked.unwrap_err().is_panic());
        let guard = spawn(TaskKind::Cleanup, "sleeps", tokio::time::sleep(Duration::from_secs(60)));
        guard.abort();
        assert!(guard.await.unwrap_err().is_cancelled());
    }
}
