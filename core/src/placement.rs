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
}

impl SlotPlaces {
    fn held(&self) -> usize {
        self.reserved + self.running
    }

    fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    fn room_for(&self, model: &str, batch_limit: usize, prefetch: usize) -> usize {
        if !self.up || self.dead || !self.serves(model) {
            return 0;
        }
        match &self.holder {
            None => batch_limit + prefetch,
            Some(m) if m == model => (batch_limit + prefetch).saturating_sub(self.held()),
            Some(_) => 0,
        }
    }

    fn take_place(&mut self, model: &str) {
        self.reserved += 1;
        self.holder = Some(model.to_string());
    }

    fn forget_holder_if_empty(&mut self) {
        if self.held() == 0 {
            self.holder = None;
        }
    }
}

impl SlotTable {
    /// A table of `(slot, models it serves)`, every slot down (no inference actor yet), nothing
    /// held, no prefetch.
    pub fn new(slots: impl IntoIterator<Item = (String, Vec<String>)>) -> SlotTable {
        let slots = slots.into_iter().map(|(name, models)| (name, SlotPlaces { models, ..SlotPlaces::default() })).collect();
        SlotTable { slots, prefetch: 0 }
    }

    /// Lets every slot take `prefetch` places beyond the holding model's batch limit.
    pub fn with_prefetch(mut self, prefetch: usize) -> SlotTable {
        self.prefetch = prefetch;
        self
    }

    pub fn prefetch(&self) -> usize {
        self.prefetch
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
    /// not serve the model or holds another one.
    pub fn room_for(&self, slot: &str, model: &str, batch_limit: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.room_for(model, batch_limit, self.prefetch))
    }

    /// Reserves up to `max` places for `model`, one entry per place (a slot appears as many
    /// times as it gave places). Slots by the model's `affinity(slot)` (warm, then fits, then
    /// evicts), then among equals the busy ones (a batch of the model forming), then by name.
    pub fn reserve(&mut self, model: &str, max: usize, batch_limit: usize, affinity: impl Fn(&str) -> Affinity) -> Vec<String> {
        let mut candidates: Vec<(&String, usize, Affinity, bool)> = self
            .slots
            .iter()
            .map(|(name, s)| (name, s.room_for(model, batch_limit, self.prefetch), affinity(name), s.held() > 0))
            .filter(|(_, room, _, _)| *room > 0)
            .collect();
        // A stable sort: equal keys keep the table's (name) order.
        candidates.sort_by_key(|(_, _, affinity, busy)| (*affinity, !*busy));
        let mut got = vec![];
        for (name, room, _, _) in candidates {
            if got.len() >= max {
                break;
            }
            let take = room.min(max - got.len());
            got.extend(std::iter::repeat_n(name.clone(), take));
        }
        for name in &got {
            if let Some(s) = self.slots.get_mut(name) {
                s.take_place(model);
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
        s.forget_holder_if_empty();
        had
    }

    /// A puller reserves whichever slots are free; if the job's model is cold on the one it got
    /// (`slot`) but warm on another slot that has room now, the reservation moves there (no
    /// load, no eviction). Returns the slot the job should run on.
    pub fn better_slot(&mut self, slot: &str, model: &str, batch_limit: usize, affinity: impl Fn(&str) -> Affinity) -> String {
        let is_warm = |slot: &str| affinity(slot) == Affinity::Warm;
        if is_warm(slot) {
            return slot.to_string();
        }
        let better = self
            .slots
            .iter()
            .find(|(name, s)| name.as_str() != slot && is_warm(name) && s.room_for(model, batch_limit, self.prefetch) > 0)
            .map(|(name, _)| name.clone());
        let Some(better) = better else { return slot.to_string() };
        self.release(slot);
        if let Some(s) = self.slots.get_mut(&better) {
            s.take_place(model);
        }
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
        s.forget_holder_if_empty();
        s.running == 0
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

    /// A random node: for each slot the models (indices into [`MODELS`]) it serves, each
    /// model's batch limit, and the table's prefetch.
    #[derive(Debug, Clone)]
    struct Layout {
        slots: Vec<Vec<usize>>,
        batch_limits: [usize; 4],
        prefetch: usize,
    }

    fn layout() -> impl Strategy<Value = Layout> {
        (proptest::collection::vec(1u8..16, 1..6), [1usize..4, 1usize..4, 1usize..4, 1usize..4], 0usize..=2).prop_map(
            |(masks, batch_limits, prefetch)| Layout {
                slots: masks.into_iter().map(|mask| (0..MODELS.len()).filter(|i| mask & (1 << i) != 0).collect()).collect(),
                batch_limits,
                prefetch,
            },
        )
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
                }
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
            .with_prefetch(layout.prefetch);
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
                            // Greedy in order: a slot with room left over ranks no better than
                            // any slot that gave a place; and a short answer means no room left.
                            if taken < room {
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
                            prop_assert!(before.room_for(&chosen, m, limit) > 0 && may_take(&before, &chosen, m));
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
