//! The error of every NATS operation: what kind, with NATS's own message.

/// Errors of the NATS layer. Callers branch on the kind; the text carries NATS's own message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-set lost: somebody else wrote the record since we read it. Writers do
    /// not retry this themselves: `cas::update_with` (kiln-core) reads and decides again.
    #[error("the record changed since it was read (revision conflict)")]
    Conflict,
    #[error("{0} not found")]
    NotFound(String),
    #[error("already exists")]
    AlreadyExists,
    #[error("cannot decode stored value: {0}")]
    Decode(String),
    #[error("nats: {0}")]
    Nats(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    pub fn nats(e: impl std::fmt::Display) -> Self {
        StoreError::Nats(e.to_string())
    }
}
