//! A job's place on a slot, from its dispatch until its model is done: [`SlotLease`].
//!
//! The lease knows nothing of the dispatcher: it hands its place back to whatever
//! [`LeaseReturn`] it was given (the dispatcher gives its own mailbox), so the job actor and
//! its pipeline, which hold the lease, never import the actor that spawned them.

/// Where a lease goes back to when it is dropped. The dispatcher implements it with a message
/// to itself; it must not block (it runs inside `Drop`).
pub trait LeaseReturn: Send + Sync + 'static {
    /// The job `job_id`'s place on `slot` is free again.
    fn lease_returned(&self, slot: String, job_id: String);
}

/// A job's place on a slot, from its dispatch until its model is done. Handed back by drop,
/// exactly once however the job goes (its model done, an early end, a panic that drops the
/// job actor's state), so the dispatcher frees a slot from one event only; the delivery's own
/// end is heard separately, through supervision.
pub struct SlotLease {
    slot: String,
    /// Every slot the job holds, `slot` first: more than one for a model of several GPUs
    /// (its companions come back with `slot`, in the dispatcher's table).
    group: Vec<String>,
    job_id: String,
    to: Option<Box<dyn LeaseReturn>>,
}

impl SlotLease {
    /// A lease on `slot` for `job_id`, handed back to `to` when dropped.
    pub fn new(slot: String, job_id: String, to: impl LeaseReturn) -> SlotLease {
        SlotLease { group: vec![slot.clone()], slot, job_id, to: Some(Box::new(to)) }
    }

    /// The same lease, holding the slots of `group` (its own first) for a multi-GPU model.
    pub fn with_group(mut self, group: Vec<String>) -> SlotLease {
        if group.first() == Some(&self.slot) {
            self.group = group;
        }
        self
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Every slot the job holds, its own first.
    pub fn group(&self) -> &[String] {
        &self.group
    }

    /// A lease that tells nobody when it is handed back: for a job actor run alone in a test.
    pub fn detached(slot: &str) -> SlotLease {
        SlotLease { slot: slot.to_string(), group: vec![slot.to_string()], job_id: String::new(), to: None }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            let (slot, job_id) = (std::mem::take(&mut self.slot), std::mem::take(&mut self.job_id));
            to.lease_returned(slot, job_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Returns(Arc<Mutex<Vec<(String, String)>>>);

    impl LeaseReturn for Returns {
        fn lease_returned(&self, slot: String, job_id: String) {
            self.0.lock().unwrap().push((slot, job_id));
        }
    }

    #[test]
    fn a_lease_goes_back_once_when_dropped_and_a_detached_one_goes_nowhere() {
        let returns = Returns::default();
        let lease = SlotLease::new("cpu:0".into(), "j1".into(), returns.clone());
        assert_eq!(lease.slot(), "cpu:0");
        assert!(returns.0.lock().unwrap().is_empty());
        drop(lease);
        assert_eq!(*returns.0.lock().unwrap(), vec![("cpu:0".to_string(), "j1".to_string())]);
        drop(SlotLease::detached("cpu:1"));
        assert_eq!(returns.0.lock().unwrap().len(), 1);
    }
}
