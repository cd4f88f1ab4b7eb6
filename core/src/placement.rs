//! Slot placement: which of a node's GPU slots may take how many more jobs of a model, as pure
//! bookkeeping (no actors, no NATS, no clock). The dispatcher owns one [`SlotTable`] and asks
//! it everything; the rules are tested here, for every input, with property tests.
//!
//! A slot's places move through two counts:
//!
//! ```text
//! reserve / better_slot ──► reserved ── start ──► running ── finish ──► (free)
//!                              └──── release ────► (free)
//! ```
//!
//! A puller *reserves* places before it fetches from the queue, so a node never holds a job it
//! has no slot for; each fetched job *starts* on a reserved place; the places it did not need
//! are *released*; a job *finishes* when its model is done (its post-processing stages run off
//! the slot).
//!
//! # Invariants
//!
//! Whatever the sequence of calls (the property tests drive random ones):
//! - **One model at a time.** A slot holds (reserved or running) jobs of at most one model, the
//!   [`holder`](SlotTable::holder); a batch is of one model. It holds a model exactly while it
//!   holds a job: with nothing held the holder is `None`.
//! - **Bounded.** A slot never holds more than `batch_limit + prefetch` jobs of its holder, where
//!   `batch_limit` is the model's (1, or `max_batch` for a batching TorchScript model) and
//!   `prefetch` the table's extra places per slot (0 today). This holds as long as callers pass
//!   each model the same `batch_limit` every time.
//! - **Only where it can run.** A place is only ever reserved on a slot that is up (has a live
//!   inference actor), not dead, and serves the model. A slot that goes down keeps the places
//!   already reserved or running on it: their owners hand them back (`release`, `finish`).
//! - **No underflow.** Releasing or finishing more than was reserved or started changes nothing
//!   (the counts saturate at zero); it is never a panic.
//! - **Warm first, then room.** [`SlotTable::reserve`] fills slots by the model's
//!   [`Affinity`] there: where it is already resident first (no load, no eviction), then where
//!   it fits in the slot's free memory (a load, no eviction), then the rest; among equals the
//!   busy ones first (a batch forming), then by name. It takes every place it may, up to `max`.
//!
//! # Groups (models of several GPUs)
//!
//! A model configured with `gpus = N` (N > 1) runs on N slots of one node at once. Its job
//! runs on one *primary* slot (the place the table hands out, where the model's worker lives)
//! and holds N-1 *companion* slots for it, which run nothing themselves. More invariants:
//! - **Whole groups.** A slot holding places of an N-GPU model has exactly N-1 companions, for
//!   as long as it holds any; the first place taken on a free primary takes them, and the
//!   last place handed back (`release`, `finish`) frees them with it. A group only forms when
//!   N-1 other slots are free (up, not dead, serving the model, holding nothing and held for
//!   no one): there are never fewer.
//! - **Companions hold nothing else.** A companion holds no place (of any model) while it is
//!   held, and belongs to exactly one group: its primary lists it and it names its primary.
//! - **Warm first** applies to the primary (where the model is resident); companions are taken
//!   cold ones first (leaving warm slots to be primaries), then by name.

use std::collections::{BTreeMap, BTreeSet};

/// How a model stands on a slot, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Affinity {
    /// Resident: no load.
    Warm,
    /// Not resident, but fits in the slot's free memory: a load, no eviction.
    Fits,
    /// Loading it would evict another model (or nothing is known of its size there).
    Evicts,
}

/// A slot's memory as placement sees it (kept by the slot's inference actor): its free bytes
/// and what each model it serves would need there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotRoom {
    pub free: u64,
    /// Per model: its declared bytes, else what it was last measured to hold on this slot;
    /// a model not listed needs nothing known.
    pub need: BTreeMap<String, u64>,
}

impl SlotRoom {
    /// The model's affinity for this slot when it is not warm there.
    pub fn affinity(&self, model: &str) -> Affinity {
        if self.need.get(model).copied().unwrap_or(0) <= self.free {
            Affinity::Fits
        } else {
            Affinity::Evicts
        }
    }
}

/// Every slot of one node and what holds it. Slots are kept by name, so ties in placement go to
/// the first name (`cuda:0` before `cuda:1`).
#[derive(Debug, Clone, Default)]
pub struct SlotTable {
    slots: BTreeMap<String, SlotPlaces>,
    /// Places a slot takes beyond the holding model's batch limit: jobs fetched ahead, to start
    /// as soon as the batch before them ends. 0 keeps today's rule (a slot holds at most one
    /// batch).
    prefetch: usize,
    /// Slots each model needs at once (its `gpus`); a model not listed needs 1.
    gpus: BTreeMap<String, usize>,
}

/// One slot's bookkeeping.
#[derive(Debug, Clone, Default)]
struct SlotPlaces {
    /// The models the config lets this slot run.
    models: Vec<String>,
    /// Whether the slot has a live inference actor; only an up slot takes new reservations.
    up: bool,
    /// Quarantined for good (past its restart budget) until it comes up again.
    dead: bool,
    /// The model whose jobs hold the slot now (reserved or running); `None` exactly when
    /// nothing is held.
    holder: Option<String>,
    /// Places held by pullers while they fetch.
    reserved: usize,
    /// Jobs running on the slot: 1 at most, or up to the model's batch limit when it batches
    /// (plus `prefetch`).
    running: usize,
    /// On a primary holding a multi-GPU model: the other slots of its group, held for it.
    companions: Vec<String>,
    /// On a companion: the primary it is held for.
    held_for: Option<String>,
}

impl SlotPlaces {
    fn held(&self) -> usize {
        self.reserved + self.running
    }

    fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// Room on this slot alone, not counting the companions a group would need.
    fn room_for(&self, model: &str, batch_limit: usize, prefetch: usize) -> usize {
        if !self.up || self.dead || !self.serves(model) || self.held_for.is_some() {
            return 0;
        }
        match &self.holder {
            None => batch_limit + prefetch,
            Some(m) if m == model => (batch_limit + prefetch).saturating_sub(self.held()),
            Some(_) => 0,
        }
    }

    /// Free to be held as a companion for a group of `model`.
    fn free_companion_for(&self, model: &str) -> bool {
        self.up && !self.dead && self.serves(model) && self.held() == 0 && self.held_for.is_none()
    }
}

impl SlotTable {
    /// A table of `(slot, models it serves)`, every slot down (no inference actor yet), nothing
    /// held, no prefetch, every model on one slot.
    pub fn new(slots: impl IntoIterator<Item = (String, Vec<String>)>) -> SlotTable {
        let slots = slots.into_iter().map(|(name, models)| (name, SlotPlaces { models, ..SlotPlaces::default() })).collect();
        SlotTable { slots, prefetch: 0, gpus: BTreeMap::new() }
    }

    /// Lets every slot take `prefetch` places beyond the holding model's batch limit.
    pub fn with_prefetch(mut self, prefetch: usize) -> SlotTable {
        self.prefetch = prefetch;
        self
    }

    /// Says how many slots each model needs at once (`gpus`); unlisted models need 1.
    pub fn with_gpus(mut self, gpus: impl IntoIterator<Item = (String, usize)>) -> SlotTable {
        self.gpus.extend(gpus.into_iter().filter(|(_, n)| *n > 1));
        self
    }

    pub fn prefetch(&self) -> usize {
        self.prefetch
    }

    /// Slots `model` needs at once.
    pub fn gpus_of(&self, model: &str) -> usize {
        self.gpus.get(model).copied().unwrap_or(1)
    }

    pub fn contains(&self, slot: &str) -> bool {
        self.slots.contains_key(slot)
    }

    /// Every model some slot serves, each once.
    pub fn served_models(&self) -> BTreeSet<String> {
        self.slots.values().flat_map(|s| s.models.iter().cloned()).collect()
    }

    /// The slot's inference actor is ready (`true`; this also lifts a quarantine) or gone
    /// (`false`). Places already held stay held. Returns whether the slot is known.
    pub fn set_up(&mut self, slot: &str, up: bool) -> bool {
        let Some(s) = self.slots.get_mut(slot) else { return false };
        s.up = up;
        if up {
            s.dead = false;
        }
        true
    }

    /// Quarantines the slot (down, dead) until it comes up again.
    pub fn mark_dead(&mut self, slot: &str) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.up = false;
            s.dead = true;
        }
    }

    pub fn is_up(&self, slot: &str) -> bool {
        self.slots.get(slot).is_some_and(|s| s.up)
    }

    pub fn is_dead(&self, slot: &str) -> bool {
        self.slots.get(slot).is_some_and(|s| s.dead)
    }

    /// How many more jobs of `model` the slot can take now: none when it is down, dead, does
    /// not serve the model, holds another one, is held as a companion, or (a multi-GPU model
    /// not yet on it) when too few other slots are free to be its companions.
    pub fn room_for(&self, slot: &str, model: &str, batch_limit: usize) -> usize {
        let Some(s) = self.slots.get(slot) else { return 0 };
        let room = s.room_for(model, batch_limit, self.prefetch);
        let need = self.gpus_of(model) - 1;
        if room == 0 || need == 0 || s.holder.is_some() {
            // A slot already holding the model holds its group too.
            return room;
        }
        let free = self.slots.iter().filter(|(name, c)| name.as_str() != slot && c.free_companion_for(model)).count();
        if free >= need {
            room
        } else {
            0
        }
    }

    /// Takes one place for `model` on `slot` (which has room): the first place on a free slot
    /// of a multi-GPU model also takes its companions, cold ones first, then by name.
    fn take_place(&mut self, slot: &str, model: &str, is_warm: &impl Fn(&str) -> bool) {
        let need = self.gpus_of(model) - 1;
        let forming = need > 0 && self.slots.get(slot).is_some_and(|s| s.holder.is_none());
        if forming {
            let mut free: Vec<&String> =
                self.slots.iter().filter(|(name, c)| name.as_str() != slot && c.free_companion_for(model)).map(|(n, _)| n).collect();
            // Stable: equal keys keep the name order.
            free.sort_by_key(|name| is_warm(name));
            let companions: Vec<String> = free.into_iter().take(need).cloned().collect();
            debug_assert_eq!(companions.len(), need, "take_place is only called where room_for found room");
            for c in &companions {
                if let Some(s) = self.slots.get_mut(c) {
                    s.held_for = Some(slot.to_string());
                }
            }
            if let Some(s) = self.slots.get_mut(slot) {
                s.companions = companions;
            }
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.reserved += 1;
            s.holder = Some(model.to_string());
        }
    }

    /// With nothing held on `slot` any more: it holds no model, and its group's companions
    /// are free again.
    fn forget_holder_if_empty(&mut self, slot: &str) {
        let Some(s) = self.slots.get_mut(slot) else { return };
        if s.held() > 0 {
            return;
        }
        s.holder = None;
        for c in std::mem::take(&mut s.companions) {
            if let Some(c) = self.slots.get_mut(&c) {
                c.held_for = None;
            }
        }
    }

    /// Reserves up to `max` places for `model`, one entry per place (a slot appears as many
    /// times as it gave places; for a multi-GPU model each entry names the group's primary).
    /// Slots by the model's `affinity(slot)` (warm, then fits, then evicts), then among equals
    /// the busy ones (a batch of the model forming), then by name.
    pub fn reserve(&mut self, model: &str, max: usize, batch_limit: usize, affinity: impl Fn(&str) -> Affinity) -> Vec<String> {
        let is_warm = |slot: &str| affinity(slot) == Affinity::Warm;
        let mut got = vec![];
        // One slot at a time, the best first: a group taken may leave other slots without the
        // companions they would need, so their room is counted again after each.
        while got.len() < max {
            let best = self
                .slots
                .iter()
                .map(|(name, s)| (name, self.room_for(name, model, batch_limit), (affinity(name), s.held() == 0)))
                .filter(|(_, room, _)| *room > 0)
                // `min_by_key` keeps the first of equals: the name order.
                .min_by_key(|(_, _, key)| *key)
                .map(|(name, room, _)| (name.clone(), room));
            let Some((name, room)) = best else { break };
            for _ in 0..room.min(max - got.len()) {
                self.take_place(&name, model, &is_warm);
                got.push(name.clone());
            }
        }
        got
    }

    /// Hands back one reserved place (the puller fetched fewer jobs than it reserved). Returns
    /// whether the slot had one.
    pub fn release(&mut self, slot: &str) -> bool {
        let Some(s) = self.slots.get_mut(slot) else { return false };
        let had = s.reserved > 0;
        s.reserved = s.reserved.saturating_sub(1);
        self.forget_holder_if_empty(slot);
        had
    }

    /// A puller reserves whichever slots are free; if the job's model is cold on the one it got
    /// (`slot`) but warm on another slot that would have room once this place is handed back,
    /// the reservation moves there (no load, no eviction), with its group. Returns the slot the
    /// job should run on.
    pub fn better_slot(&mut self, slot: &str, model: &str, batch_limit: usize, affinity: impl Fn(&str) -> Affinity) -> String {
        let is_warm = |slot: &str| affinity(slot) == Affinity::Warm;
        if is_warm(slot) || self.reserved(slot) == 0 || !self.slots.keys().any(|name| name != slot && is_warm(name)) {
            return slot.to_string();
        }
        // Counted as if this place were handed back: a group's companions may be what the
        // warm slot needs.
        let mut moved = self.clone();
        moved.release(slot);
        let better =
            moved.slots.keys().find(|name| name.as_str() != slot && is_warm(name) && moved.room_for(name, model, batch_limit) > 0).cloned();
        let Some(better) = better else { return slot.to_string() };
        moved.take_place(&better, model, &is_warm);
        *self = moved;
        better
    }

    /// A job starts on one of the slot's reserved places. Returns whether the slot just became
    /// busy (this is its first running job). Without a reservation on the slot (a caller's bug)
    /// nothing changes and it returns `false`: counting the job anyway could exceed the limit or
    /// mix models.
    pub fn start(&mut self, slot: &str) -> bool {
        let Some(s) = self.slots.get_mut(slot) else { return false };
        if s.reserved == 0 {
            return false;
        }
        s.reserved -= 1;
        s.running += 1;
        s.running == 1
    }

    /// A job running on the slot is done with it. Returns whether the slot now runs nothing
    /// (also when it ran nothing before: the counts saturate at zero).
    pub fn finish(&mut self, slot: &str) -> bool {
        let Some(s) = self.slots.get_mut(slot) else { return false };
        s.running = s.running.saturating_sub(1);
        let idle = s.running == 0;
        self.forget_holder_if_empty(slot);
        idle
    }

    /// Places held on the slot, reserved or running.
    pub fn held(&self, slot: &str) -> usize {
        self.slots.get(slot).map_or(0, SlotPlaces::held)
    }

    pub fn reserved(&self, slot: &str) -> usize {
        self.slots.get(slot).map_or(0, |s| s.reserved)
    }

    pub fn running(&self, slot: &str) -> usize {
        self.slots.get(slot).map_or(0, |s| s.running)
    }

    /// The model whose jobs hold the slot, if any.
    pub fn holder(&self, slot: &str) -> Option<&str> {
        self.slots.get(slot).and_then(|s| s.holder.as_deref())
    }

    /// The primary a companion slot is held for, if it is one.
    pub fn held_for(&self, slot: &str) -> Option<&str> {
        self.slots.get(slot).and_then(|s| s.held_for.as_deref())
    }

    /// The group `slot` belongs to, its primary first then the companions; just the slot when
    /// it is in no group (or unknown).
    pub fn group(&self, slot: &str) -> Vec<String> {
        let primary = self.held_for(slot).unwrap_or(slot);
        match self.slots.get(primary) {
            Some(p) if !p.companions.is_empty() => std::iter::once(primary.to_string()).chain(p.companions.iter().cloned()).collect(),
            _ => vec![slot.to_string()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MODELS: [&str; 4] = ["m0", "m1", "m2", "m3"];

    fn table(slots: &[(&str, &[&str])]) -> SlotTable {
        let mut t = SlotTable::new(slots.iter().map(|(n, ms)| (n.to_string(), ms.iter().map(|m| m.to_string()).collect())));
        for (n, _) in slots {
            t.set_up(n, true);
        }
        t
    }

    fn warm_on<'a>(slots: &'a [&'a str]) -> impl Fn(&str) -> Affinity + 'a {
        move |s| if slots.contains(&s) { Affinity::Warm } else { Affinity::Evicts }
    }

    #[test]
    fn reserve_prefers_warm_then_a_slot_where_the_model_fits_without_eviction() {
        let mut t = table(&[("a", &["m"]), ("b", &["m"]), ("c", &["m"])]);
        let room = |free: u64| SlotRoom { free, need: [("m".to_string(), 100)].into() };
        let rooms = [("a", room(50)), ("b", room(150)), ("c", room(0))];
        let affinity =
            |slot: &str| if slot == "c" { Affinity::Warm } else { rooms.iter().find(|(n, _)| *n == slot).unwrap().1.affinity("m") };
        assert_eq!(t.reserve("m", 3, 1, affinity), vec!["c", "b", "a"], "warm c, then b where m fits, then a");
        assert_eq!(SlotRoom::default().affinity("m"), Affinity::Fits, "nothing known of m: it needs nothing");
    }

    #[test]
    fn reserve_prefers_warm_then_busy_then_name() {
        let mut t = table(&[("a", &["m"]), ("b", &["m"]), ("c", &["m"]), ("d", &["m"])]);
        // Make `c` busy with the model (one place taken of a batch of 3).
        assert_eq!(t.reserve("m", 1, 3, warm_on(&["c"])), vec!["c"]);
        // Warm: b and c; c is busy, so it comes first; then b; then the cold ones by name.
        let got = t.reserve("m", 20, 3, warm_on(&["b", "c"]));
        assert_eq!(got, vec!["c", "c", "b", "b", "b", "a", "a", "a", "d", "d", "d"]);
        assert!(t.reserve("m", 5, 3, |_| Affinity::Warm).is_empty());
    }

    #[test]
    fn a_slot_holds_one_model_at_a_time_and_frees_it_when_empty() {
        let mut t = table(&[("a", &["m", "n"])]);
        assert_eq!(t.reserve("m", 4, 1, |_| Affinity::Evicts), vec!["a"]);
        assert!(t.reserve("n", 4, 1, |_| Affinity::Evicts).is_empty());
        assert!(t.start("a"));
        assert_eq!(t.holder("a"), Some("m"));
        assert!(t.finish("a"));
        assert_eq!(t.holder("a"), None);
        assert_eq!(t.reserve("n", 4, 1, |_| Affinity::Evicts), vec!["a"]);
    }

    #[test]
    fn prefetch_adds_places_beyond_the_batch_limit() {
        let mut t = table(&[("a", &["m"])]).with_prefetch(2);
        assert_eq!(t.reserve("m", 10, 3, |_| Affinity::Evicts).len(), 5);
        assert_eq!(t.room_for("a", "m", 3), 0);
    }

    #[test]
    fn better_slot_moves_a_reservation_to_a_warm_slot_with_room() {
        let mut t = table(&[("a", &["m"]), ("b", &["m"])]);
        assert_eq!(t.reserve("m", 1, 1, |_| Affinity::Evicts), vec!["a"]);
        assert_eq!(t.better_slot("a", "m", 1, warm_on(&["b"])), "b");
        assert_eq!((t.held("a"), t.holder("a"), t.held("b"), t.holder("b")), (0, None, 1, Some("m")));
        // Already warm where it is: it stays.
        assert_eq!(t.better_slot("b", "m", 1, warm_on(&["a", "b"])), "b");
    }

    #[test]
    fn down_and_dead_slots_take_nothing_until_they_come_up() {
        let mut t = table(&[("a", &["m"]), ("b", &["m"])]);
        t.set_up("a", false);
        t.mark_dead("b");
        assert!(t.reserve("m", 4, 1, |_| Affinity::Warm).is_empty());
        t.set_up("b", true);
        assert!(!t.is_dead("b"));
        assert_eq!(t.reserve("m", 4, 1, |_| Affinity::Warm), vec!["b"]);
    }

    #[test]
    fn start_needs_a_reservation_and_counts_never_underflow() {
        let mut t = table(&[("a", &["m"])]);
        assert!(!t.start("a"));
        assert!(!t.release("a"));
        assert!(t.finish("a"));
        assert_eq!((t.reserved("a"), t.running("a"), t.holder("a")), (0, 0, None));
        assert!(!t.start("nowhere") && !t.release("nowhere") && !t.finish("nowhere"));
    }

    #[test]
    fn a_group_holds_its_slots_together_and_frees_them_together() {
        let mut t =
            table(&[("cuda:0", &["big", "m"]), ("cuda:1", &["big", "m"]), ("cuda:2", &["big", "m"])]).with_gpus([("big".to_string(), 2)]);
        // One group fits (a third slot is left over, too few for a second).
        assert_eq!(t.reserve("big", 5, 1, |_| Affinity::Evicts), vec!["cuda:0"]);
        assert_eq!(t.group("cuda:0"), vec!["cuda:0", "cuda:1"]);
        assert_eq!(t.group("cuda:1"), vec!["cuda:0", "cuda:1"]);
        assert_eq!((t.held_for("cuda:1"), t.holder("cuda:1")), (Some("cuda:0"), None));
        // The companion takes nothing else; the free slot takes a one-slot model.
        assert_eq!(t.reserve("m", 5, 1, |_| Affinity::Evicts), vec!["cuda:2"]);
        assert!(t.start("cuda:0"));
        assert!(!t.start("cuda:1"), "a companion has no place to start");
        assert!(t.finish("cuda:0"));
        assert_eq!((t.group("cuda:1"), t.held_for("cuda:1")), (vec!["cuda:1".to_string()], None));
        assert_eq!(t.reserve("m", 5, 1, |_| Affinity::Evicts), vec!["cuda:0", "cuda:1"]);
    }

    #[test]
    fn a_group_forms_only_with_enough_free_slots() {
        let mut t = table(&[("cpu:0", &["big", "m"]), ("cpu:1", &["big", "m"])]).with_gpus([("big".to_string(), 2)]);
        assert_eq!(t.reserve("m", 1, 1, |_| Affinity::Evicts), vec!["cpu:0"]);
        assert!(t.reserve("big", 1, 1, |_| Affinity::Evicts).is_empty(), "cpu:0 is busy: no companion for cpu:1");
        assert_eq!(t.room_for("cpu:1", "big", 1), 0);
        t.set_up("cpu:0", false);
        assert!(t.release("cpu:0"));
        assert!(t.reserve("big", 1, 1, |_| Affinity::Evicts).is_empty(), "a down slot is no companion");
        t.set_up("cpu:0", true);
        assert_eq!(t.reserve("big", 1, 1, |_| Affinity::Evicts), vec!["cpu:0"]);
        // A one-slot node never forms one.
        let mut one = table(&[("cpu:0", &["big"])]).with_gpus([("big".to_string(), 2)]);
        assert!(one.reserve("big", 1, 1, |_| Affinity::Warm).is_empty());
    }

    #[test]
    fn a_group_goes_to_the_warm_primary_with_cold_companions() {
        let slots: &[(&str, &[&str])] = &[("a", &["big"]), ("b", &["big"]), ("c", &["big"]), ("d", &["big"])];
        let mut t = table(slots).with_gpus([("big".to_string(), 2)]);
        // Warm on b and c: b is the primary, its companion the first cold slot (a), leaving c
        // to be the second group's primary.
        assert_eq!(t.reserve("big", 2, 1, warm_on(&["b", "c"])), vec!["b", "c"]);
        assert_eq!((t.group("b"), t.group("c")), (vec!["b".to_string(), "a".into()], vec!["c".to_string(), "d".into()]));
        // A cold reservation moves to a warm slot with its group.
        let mut t = table(slots).with_gpus([("big".to_string(), 3)]);
        assert_eq!(t.reserve("big", 1, 1, |_| Affinity::Evicts), vec!["a"]);
        assert_eq!(t.better_slot("a", "big", 1, warm_on(&["d"])), "d");
        assert_eq!(t.group("d"), vec!["d", "a", "b"]);
        assert_eq!((t.held("a"), t.held_for("a"), t.held_for("c")), (0, Some("d"), None));
    }

    /// A random node: for each slot the models (indices into [`MODELS`]) it serves, each
    /// model's batch limit, and the table's prefetch.
    #[derive(Debug, Clone)]
    struct Layout {
        slots: Vec<Vec<usize>>,
        batch_limits: [usize; 4],
        prefetch: usize,
        /// Slots each model needs at once (its `gpus`).
        gpus: [usize; 4],
    }

    fn layout() -> impl Strategy<Value = Layout> {
        (
            proptest::collection::vec(1u8..16, 1..6),
            [1usize..4, 1usize..4, 1usize..4, 1usize..4],
            0usize..=2,
            // Half the models on one slot, the others on 2 or 3 (a group).
            [1usize..4, 1usize..4, 1usize..2, 1usize..2],
        )
            .prop_map(|(masks, batch_limits, prefetch, gpus)| Layout {
                slots: masks.into_iter().map(|mask| (0..MODELS.len()).filter(|i| mask & (1 << i) != 0).collect()).collect(),
                batch_limits,
                prefetch,
                gpus,
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve { model: usize, max: usize },
        Release { slot: usize },
        BetterSlot { slot: usize, model: usize },
        Start { slot: usize },
        Finish { slot: usize },
        Up { slot: usize },
        Down { slot: usize },
        Dead { slot: usize },
        ToggleWarm { slot: usize, model: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Slot indices up to 6 (one past the largest layout): unknown slots must be harmless.
        let slot = 0usize..7;
        let model = 0usize..MODELS.len();
        prop_oneof![
            3 => (model.clone(), 0usize..8).prop_map(|(model, max)| Op::Reserve { model, max }),
            2 => slot.clone().prop_map(|slot| Op::Release { slot }),
            2 => (slot.clone(), model.clone()).prop_map(|(slot, model)| Op::BetterSlot { slot, model }),
            3 => slot.clone().prop_map(|slot| Op::Start { slot }),
            3 => slot.clone().prop_map(|slot| Op::Finish { slot }),
            1 => slot.clone().prop_map(|slot| Op::Up { slot }),
            1 => slot.clone().prop_map(|slot| Op::Down { slot }),
            1 => slot.clone().prop_map(|slot| Op::Dead { slot }),
            1 => (slot, model).prop_map(|(slot, model)| Op::ToggleWarm { slot, model }),
        ]
    }

    fn slot_name(i: usize) -> String {
        format!("cuda:{i}")
    }

    fn model_index(model: &str) -> usize {
        MODELS.iter().position(|m| *m == model).expect("a test model")
    }

    /// The invariants of the module doc that hold for the table's state at any time.
    fn check_state(t: &SlotTable, layout: &Layout) -> Result<(), TestCaseError> {
        for (name, s) in &t.slots {
            match &s.holder {
                None => prop_assert_eq!(s.held(), 0, "{} holds places but no model", name),
                Some(m) => {
                    prop_assert!(s.held() > 0, "{} holds {} with nothing held", name, m);
                    prop_assert!(s.serves(m), "{} holds {}, which it does not serve", name, m);
                    let bound = layout.batch_limits[model_index(m)] + layout.prefetch;
                    prop_assert!(s.held() <= bound, "{} holds {} places of {} (bound {})", name, s.held(), m, bound);
                    // Whole groups: a holder of an N-GPU model has exactly N-1 companions.
                    let need = layout.gpus[model_index(m)] - 1;
                    prop_assert_eq!(s.companions.len(), need, "{} holds {} with companions {:?}", name, m, &s.companions);
                }
            }
            if s.holder.is_none() {
                prop_assert!(s.companions.is_empty(), "{} holds nothing but keeps companions {:?}", name, &s.companions);
            }
            for c in &s.companions {
                // Each companion names this primary (so it is in one group only), serves the
                // model and holds nothing else.
                let cs = &t.slots[c];
                prop_assert!(c != name, "{} is its own companion", name);
                prop_assert_eq!(cs.held_for.as_deref(), Some(name.as_str()), "{} lists {}, which is held for {:?}", name, c, &cs.held_for);
                prop_assert!(cs.serves(s.holder.as_deref().unwrap_or_default()), "{} is held for a model it does not serve", c);
            }
            if let Some(p) = &s.held_for {
                prop_assert!(s.held() == 0 && s.holder.is_none() && s.companions.is_empty(), "companion {} holds places: {:?}", name, s);
                prop_assert!(
                    t.slots.get(p).is_some_and(|ps| ps.companions.contains(name)),
                    "{} is held for {}, which does not list it",
                    name,
                    p
                );
            }
        }
        Ok(())
    }

    /// Where a place for `model` may be newly reserved.
    fn may_take(t: &SlotTable, slot: &str, model: &str) -> bool {
        t.slots.get(slot).is_some_and(|s| s.up && !s.dead && s.serves(model))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Whatever the layout and the sequence of calls, every invariant of the module doc
        /// holds after each call, and each call's answer keeps its promise.
        #[test]
        fn placement_invariants_hold_for_every_sequence(layout in layout(), ops in proptest::collection::vec(op(), 0..80), warm_mask in 0u32..(1 << 24), fits_mask in 0u32..(1 << 24)) {
            let names: Vec<String> = (0..layout.slots.len()).map(slot_name).collect();
            let mut t = SlotTable::new(
                layout.slots.iter().enumerate().map(|(i, ms)| (slot_name(i), ms.iter().map(|&m| MODELS[m].to_string()).collect())),
            )
            .with_prefetch(layout.prefetch)
            .with_gpus(MODELS.iter().zip(layout.gpus).map(|(m, n)| (m.to_string(), n)));
            // Bit `slot * 4 + model`: the model is resident on the slot.
            let mut warm = warm_mask;
            for name in &names {
                t.set_up(name, true);
            }
            check_state(&t, &layout)?;
            for op in ops {
                // Bit `slot * 4 + model` of `fits_mask`: the model fits there without eviction.
                let affinity = |warm: u32, model: usize| {
                    move |slot: &str| {
                        let i: usize = slot.strip_prefix("cuda:").and_then(|i| i.parse().ok()).unwrap_or(usize::MAX);
                        let bit = |mask: u32| i < 6 && mask & (1 << (i * 4 + model)) != 0;
                        match (bit(warm), bit(fits_mask)) {
                            (true, _) => Affinity::Warm,
                            (false, true) => Affinity::Fits,
                            (false, false) => Affinity::Evicts,
                        }
                    }
                };
                let is_warm = |warm: u32, model: usize| move |slot: &str| affinity(warm, model)(slot) == Affinity::Warm;
                match op {
                    Op::Reserve { model, max } => {
                        let (m, limit) = (MODELS[model], layout.batch_limits[model]);
                        let before = t.clone();
                        let got = t.reserve(m, max, limit, affinity(warm, model));
                        prop_assert!(got.len() <= max);
                        let key = |slot: &str| (affinity(warm, model)(slot), before.held(slot) == 0);
                        for name in &names {
                            let taken = got.iter().filter(|g| *g == name).count();
                            let room = before.room_for(name, m, limit);
                            prop_assert!(taken <= room, "{} gave {} places with room for {}", name, taken, room);
                            prop_assert!(taken == 0 || may_take(&before, name, m), "{} reserved but down, dead or not serving {}", name, m);
                            prop_assert_eq!(t.reserved(name), before.reserved(name) + taken);
                            // A group formed here took companions that could be taken.
                            if taken > 0 && before.holder(name).is_none() {
                                for c in &t.slots[name].companions {
                                    prop_assert!(before.slots[c].free_companion_for(m), "{} took {} as a companion, which was not free", name, c);
                                }
                            }
                            // Greedy in order: a slot with room left over ranks no better than
                            // any slot that gave a place; and a short answer means no room left.
                            // (A group taken may leave another slot without companions: what
                            // counts is the room left now.)
                            if t.room_for(name, m, limit) > 0 {
                                prop_assert!(got.len() == max, "{} had room left but reserve returned only {} of {}", name, got.len(), max);
                                for g in &got {
                                    prop_assert!(key(g) <= key(name), "{} was passed over for the worse {}", name, g);
                                }
                            }
                        }
                    }
                    Op::Release { slot } => {
                        let name = slot_name(slot);
                        let before = t.reserved(&name);
                        let released = t.release(&name);
                        prop_assert_eq!(released, before > 0);
                        prop_assert_eq!(t.reserved(&name), before.saturating_sub(1));
                    }
                    Op::BetterSlot { slot, model } => {
                        let (name, m, limit) = (slot_name(slot), MODELS[model], layout.batch_limits[model]);
                        let before = t.clone();
                        let chosen = t.better_slot(&name, m, limit, affinity(warm, model));
                        if chosen != name {
                            prop_assert!(!is_warm(warm, model)(&name) && is_warm(warm, model)(&chosen));
                            let mut handed_back = before.clone();
                            handed_back.release(&name);
                            prop_assert!(handed_back.room_for(&chosen, m, limit) > 0 && may_take(&before, &chosen, m));
                            prop_assert_eq!(t.reserved(&chosen), before.reserved(&chosen) + 1);
                            prop_assert_eq!(t.reserved(&name), before.reserved(&name).saturating_sub(1));
                        } else {
                            for n in &names {
                                prop_assert_eq!(t.reserved(n), before.reserved(n));
                            }
                        }
                    }
                    Op::Start { slot } => {
                        let name = slot_name(slot);
                        let (reserved, running) = (t.reserved(&name), t.running(&name));
                        let busy = t.start(&name);
                        if reserved > 0 {
                            prop_assert_eq!((t.reserved(&name), t.running(&name)), (reserved - 1, running + 1));
                            prop_assert_eq!(busy, running == 0);
                        } else {
                            prop_assert!(!busy);
                            prop_assert_eq!((t.reserved(&name), t.running(&name)), (0, running));
                        }
                    }
                    Op::Finish { slot } => {
                        let name = slot_name(slot);
                        let (reserved, running) = (t.reserved(&name), t.running(&name));
                        let idle = t.finish(&name);
                        prop_assert_eq!((t.reserved(&name), t.running(&name)), (reserved, running.saturating_sub(1)));
                        prop_assert_eq!(idle, t.contains(&name) && t.running(&name) == 0);
                    }
                    Op::Up { slot } => {
                        t.set_up(&slot_name(slot), true);
                    }
                    Op::Down { slot } => {
                        t.set_up(&slot_name(slot), false);
                    }
                    Op::Dead { slot } => {
                        t.mark_dead(&slot_name(slot));
                        prop_assert!(!t.is_up(&slot_name(slot)));
                    }
                    Op::ToggleWarm { slot, model } => {
                        warm ^= 1 << ((slot % 6) * 4 + model);
                    }
                }
                check_state(&t, &layout)?;
            }
        }
    }
}
