//! What every actor of a node shares, cloned into each actor's arguments: the read-only
//! config and name, and handles onto state that several actors and tasks change underneath.
//!
//! Shared and changing (each `Arc`ed, so every clone sees the same):
//! - `warm`: which models each slot holds, written by the slots' inference actors, read by the
//!   dispatcher;
//! - `workspaces`: free job folders per slot, taken and given back by the job pipelines;
//! - `registry`: the cluster registry's cache, kept by its own watch task;
//! - `drain_requested`: fired by the control actor, awaited by the binary;
//! - `stall`: moved on by the stall watch's thread, read by whoever must re-check after a
//!   standstill;
//! - `resources`: the NATS connection and its handles (its per-model results buckets are
//!   opened and cached on first use); `store` is the same, as the job path's [`JobStore`].
//!
//! Everything else an actor knows is its own state.

use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;

use kiln_core::config::ClusterConfig;
use kiln_core::nats::{RegistryCache, Resources};
use kiln_core::store::JobStore;

#[derive(Clone)]
pub struct NodeContext {
    pub config: Arc<ClusterConfig>,
    pub resources: Resources,
    /// `resources` as the job store every delivery reads and writes its job through (made
    /// once per node, not per job).
    pub store: Arc<dyn JobStore>,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// Root of the per-slot working directories (job inputs and outputs).
    pub work_dir: PathBuf,
    /// Job folders free for reuse, per slot (see [`NodeContext::take_workspace`]).
    pub workspaces: Arc<DashMap<String, Vec<PathBuf>>>,
    /// Models resident on each slot of this node, kept by the inference actors and read by
    /// the dispatcher to prefer a slot where the job's model is already warm.
    pub warm: Arc<DashMap<String, Vec<String>>>,
    /// Each slot's free memory and what its models need there, kept by the inference actors
    /// and read by the dispatcher to prefer, after a warm slot, one where the model fits
    /// without evicting another.
    pub room: Arc<DashMap<String, kiln_core::placement::SlotRoom>>,
    /// The local, watch-fed view of the cluster registry.
    pub registry: RegistryCache,
    /// Fired when the cluster asks this node to drain (`kiln drain <node>`, through its
    /// [`NodeControl`](crate::node_control) actor); the binary then leaves gracefully.
    pub drain_requested: Arc<tokio::sync::Notify>,
    /// Changes when this process stood still (SIGSTOP, a paused VM): the loss detector, the
    /// registry writer and running jobs re-check what they knew before acting on it.
    pub stall: kiln_core::stall::StallWatch,
}

/// Names new job folders; unique within the process.
static WORKSPACES_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl NodeContext {
    /// A folder for one job's files on `slot` (`in/`, `out/` made, `out/` empty), taken from
    /// the slot's free folders or made anew: `<work>/<slot-key>/w<n>`. Blocking: call it from
    /// the blocking pool.
    ///
    /// Folders are reused rather than made and removed per job: on ext4 that churn (inode
    /// allocation skipping recently deleted inodes, a discard per removal) was the largest
    /// part of a no-op job's CPU in the node (`perf`, `kiln bench`).
    pub fn take_workspace(&self, slot: &str) -> std::io::Result<PathBuf> {
        let reused = self.workspaces.get_mut(slot).and_then(|mut free| free.pop());
        let dir = reused.unwrap_or_else(|| {
            let n = WORKSPACES_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.work_dir.join(kiln_core::config::slot_key(slot)).join(format!("w{n}"))
        });
        std::fs::create_dir_all(dir.join("out"))?;
        Ok(dir)
    }

    /// `message` (an engine's error, for the job's record) with every path under this node's
    /// work folder cut to its file name: a worker that says `cannot read
    /// /tmp/kiln-n1-x/cpu0/w3/in/ref_image` tells the client `cannot read ref_image`, and no
    /// client learns the node's folders.
    pub fn without_node_paths(&self, message: &str) -> String {
        let mut out = strip_paths_under(message, &self.work_dir.display().to_string());
        if let Ok(real) = self.work_dir.canonicalize() {
            out = strip_paths_under(&out, &real.display().to_string());
        }
        out
    }

    /// Empties a job's folder (keeping `out/` itself) and makes it free for the slot's next
    /// job. A folder that cannot be emptied is removed instead and not reused. Blocking.
    pub fn return_workspace(&self, slot: &str, dir: PathBuf) {
        match empty_workspace(&dir) {
            Ok(()) => self.workspaces.entry(slot.to_string()).or_default().push(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot empty a job folder; removing it");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

/// Removes everything in a job folder but the `out/` folder, and everything in `out/`.
fn empty_workspace(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name() == "out" && entry.file_type()?.is_dir() {
            for inner in std::fs::read_dir(&path)? {
                let inner = inner?;
                if inner.file_type()?.is_dir() {
                    std::fs::remove_dir_all(inner.path())?;
                } else {
                    std::fs::remove_file(inner.path())?;
                }
            }
        } else if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// `message` with each path that starts with `root` replaced by its last segment (a path ends
/// at whitespace, a quote, a bracket, `,` or `;`). Pure.
pub fn strip_paths_under(message: &str, root: &str) -> String {
    let root = root.trim_end_matches('/');
    if root.len() < 2 {
        return message.to_string();
    }
    let ends = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '(' | ')' | '[' | ']' | '{' | '}' | ',' | ';' | '<' | '>');
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(root) {
        out.push_str(&rest[..at]);
        let path_len = rest[at..].find(ends).unwrap_or(rest.len() - at);
        let path = rest[at..at + path_len].trim_end_matches(['.', ':']);
        let name = path.trim_end_matches('/').rsplit('/').next().filter(|n| !n.is_empty() && path.len() > root.len());
        out.push_str(name.unwrap_or("<work folder>"));
        rest = &rest[at + path.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::strip_paths_under;

    #[test]
    fn node_paths_become_file_names() {
        let root = "/tmp/kiln-n1-ab12";
        assert_eq!(
            strip_paths_under("input ref_image is not a PNG or JPEG image (/tmp/kiln-n1-ab12/cpu0/w3/in/ref_image.wav)", root),
            "input ref_image is not a PNG or JPEG image (ref_image.wav)"
        );
        assert_eq!(
            strip_paths_under("cannot read /tmp/kiln-n1-ab12/cpu0/w3/in/a: gone; and /tmp/kiln-n1-ab12/x.", root),
            "cannot read a: gone; and x."
        );
        assert_eq!(strip_paths_under("failed in /tmp/kiln-n1-ab12", root), "failed in <work folder>");
        assert_eq!(strip_paths_under("no path here /tmp/other/file", root), "no path here /tmp/other/file");
        assert_eq!(strip_paths_under("x", ""), "x");
    }
}
