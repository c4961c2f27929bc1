//! Nonce ranges: who scans which nonces of which header, until when.
//!
//! Invariant (ARCHITECTURE §5.1): no nonce of a header is held by two leases at once. A
//! lease ends by being finished by its device, by expiring, by its device going away, or
//! by its header being retired; whatever part of its range was not scanned goes back to
//! the header's free list and is handed out again before any fresh nonce, so abandoned
//! work is finished first.
//!
//! The scheduler is plain data with no clock and no I/O: callers pass the time in (Unix
//! milliseconds) and persist what they need, which keeps it exhaustively testable.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Identifies one 76-byte header prefix. Never reused, also across restarts.
pub type HeaderId = u64;
/// Identifies one lease (an assignment). Never reused, also across restarts.
pub type AssignmentId = u64;
/// Nonces per header.
pub const NONCE_SPACE: u64 = 1 << 32;

/// A nonce range of one header held by one device until `expires_at_ms`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// The assignment id.
    pub id: AssignmentId,
    /// The device holding it.
    pub device: String,
    /// The header it is a range of.
    pub header: HeaderId,
    /// First nonce.
    pub start: u64,
    /// One past the last nonce.
    pub end: u64,
    /// Nonces below this were reported scanned.
    pub scanned_until: u64,
    /// Unix milliseconds after which the lease is reclaimed.
    pub expires_at_ms: i64,
}

impl Lease {
    /// Nonces in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the range is empty (never true for a lease the scheduler hands out).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether `nonce` lies in the range.
    pub fn contains(&self, nonce: u32) -> bool {
        (self.start..self.end).contains(&u64::from(nonce))
    }
}

/// Why a lease cannot be restored after a restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Its header is unknown.
    #[error("lease {0} refers to unknown header {1}")]
    UnknownHeader(AssignmentId, HeaderId),
    /// Its range is empty or leaves the nonce space.
    #[error("lease {0} has an invalid range {1}..{2}")]
    BadRange(AssignmentId, u64, u64),
    /// Its range overlaps another live lease.
    #[error("lease {0} overlaps lease {1}")]
    Overlap(AssignmentId, AssignmentId),
}

#[derive(Debug, Default)]
struct HeaderRanges {
    /// `[cursor, NONCE_SPACE)` has never been handed out.
    cursor: u64,
    /// Reclaimed ranges, disjoint and coalesced: start -> end.
    free: BTreeMap<u64, u64>,
    /// Live leases by range start.
    live: BTreeMap<u64, AssignmentId>,
    /// Closed headers hand out nothing new (restored after a restart, or retiring).
    closed: bool,
}

impl HeaderRanges {
    fn remaining(&self) -> u64 {
        if self.closed {
            return 0;
        }
        (NONCE_SPACE - self.cursor) + self.free.iter().map(|(s, e)| e - s).sum::<u64>()
    }

    fn take(&mut self, size: u64) -> Option<(u64, u64)> {
        if self.closed {
            return None;
        }
        if let Some((&start, &end)) = self.free.iter().next() {
            self.free.remove(&start);
            let cut = end.min(start + size);
            if cut < end {
                self.free.insert(cut, end);
            }
            return Some((start, cut));
        }
        if self.cursor < NONCE_SPACE {
            let start = self.cursor;
            let end = (start + size).min(NONCE_SPACE);
            self.cursor = end;
            return Some((start, end));
        }
        None
    }

    fn give_back(&mut self, mut start: u64, mut end: u64) {
        if start >= end || self.closed {
            return;
        }
        // Coalesce with neighbours so fragments do not pile up.
        if let Some((&prev_start, &prev_end)) = self.free.range(..start).next_back()
            && prev_end == start
        {
            self.free.remove(&prev_start);
            start = prev_start;
        }
        if let Some(next_end) = self.free.remove(&end) {
            end = next_end;
        }
        if end == self.cursor {
            // Back on top of the fresh space: just lower the cursor.
            self.cursor = start;
        } else {
            self.free.insert(start, end);
        }
    }

    fn is_spent(&self) -> bool {
        self.live.is_empty()
            && (self.closed || (self.cursor == NONCE_SPACE && self.free.is_empty()))
    }
}

/// All live leases and the nonce bookkeeping of every header in use.
#[derive(Debug)]
pub struct Scheduler {
    headers: HashMap<HeaderId, HeaderRanges>,
    leases: HashMap<AssignmentId, Lease>,
    by_device: HashMap<String, BTreeSet<AssignmentId>>,
    next_id: AssignmentId,
    /// Headers dropped because nothing can come of them any more.
    dropped: Vec<HeaderId>,
}

impl Scheduler {
    /// An empty scheduler whose first assignment id is `next_id`.
    pub fn new(next_id: AssignmentId) -> Scheduler {
        Scheduler {
            headers: HashMap::new(),
            leases: HashMap::new(),
            by_device: HashMap::new(),
            next_id: next_id.max(1),
            dropped: Vec::new(),
        }
    }

    /// The id the next lease will get.
    pub fn next_id(&self) -> AssignmentId {
        self.next_id
    }

    /// Makes a fresh header available: all 2^32 nonces.
    pub fn add_header(&mut self, header: HeaderId) {
        self.headers.entry(header).or_default();
    }

    /// Makes a header known only so leases on it can be restored; it hands out nothing new.
    pub fn add_closed_header(&mut self, header: HeaderId) {
        self.headers.entry(header).or_default().closed = true;
    }

    /// Whether the header is still tracked.
    pub fn has_header(&self, header: HeaderId) -> bool {
        self.headers.contains_key(&header)
    }

    /// Nonces of `header` that can still be handed out.
    pub fn remaining(&self, header: HeaderId) -> u64 {
        self.headers.get(&header).map_or(0, HeaderRanges::remaining)
    }

    /// Leases `device` up to `size` nonces of `header`: reclaimed ranges first, then fresh
    /// ones. None when the header has nothing left (or is unknown).
    pub fn assign(
        &mut self,
        device: &str,
        header: HeaderId,
        size: u64,
        expires_at_ms: i64,
    ) -> Option<Lease> {
        let ranges = self.headers.get_mut(&header)?;
        let (start, end) = ranges.take(size.clamp(1, NONCE_SPACE))?;
        let id = self.next_id;
        self.next_id += 1;
        ranges.live.insert(start, id);
        let lease = Lease {
            id,
            device: device.to_string(),
            header,
            start,
            end,
            scanned_until: start,
            expires_at_ms,
        };
        self.leases.insert(id, lease.clone());
        self.by_device
            .entry(device.to_string())
            .or_default()
            .insert(id);
        Some(lease)
    }

    /// Puts back a lease persisted before a restart. Its header must have been added.
    pub fn restore(&mut self, lease: Lease) -> Result<(), RestoreError> {
        if lease.start >= lease.end || lease.end > NONCE_SPACE {
            return Err(RestoreError::BadRange(lease.id, lease.start, lease.end));
        }
        let ranges = self
            .headers
            .get_mut(&lease.header)
            .ok_or(RestoreError::UnknownHeader(lease.id, lease.header))?;
        if let Some((_, &other)) = ranges.live.range(..lease.end).next_back()
            && let Some(other_lease) = self.leases.get(&other)
            && other_lease.end > lease.start
        {
            return Err(RestoreError::Overlap(lease.id, other));
        }
        ranges.live.insert(lease.start, lease.id);
        // A restored range was handed out by the previous run: never hand it out fresh.
        if !ranges.closed && ranges.cursor < lease.end {
            ranges.cursor = lease.end;
        }
        self.next_id = self.next_id.max(lease.id + 1);
        self.by_device
            .entry(lease.device.clone())
            .or_default()
            .insert(lease.id);
        self.leases.insert(lease.id, lease);
        Ok(())
    }

    /// The live lease with this id.
    pub fn lease(&self, id: AssignmentId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Ids of the live leases a device holds.
    pub fn leases_of(&self, device: &str) -> Vec<AssignmentId> {
        self.by_device
            .get(device)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many live leases `device` holds.
    pub fn lease_count(&self, device: &str) -> usize {
        self.by_device.get(device).map_or(0, BTreeSet::len)
    }

    /// All live leases.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Records the device's report that `[start, scanned_until)` is done. Reports only
    /// ever move forward and are clamped to the range.
    pub fn progress(&mut self, id: AssignmentId, scanned_until: u64) {
        if let Some(lease) = self.leases.get_mut(&id) {
            let clamped = scanned_until.clamp(lease.start, lease.end);
            lease.scanned_until = lease.scanned_until.max(clamped);
        }
    }

    /// Moves a lease's expiry (a resumed session keeps its work).
    pub fn renew(&mut self, id: AssignmentId, expires_at_ms: i64) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.expires_at_ms = expires_at_ms;
        }
    }

    /// Ends a lease; its unscanned remainder goes back to the header.
    pub fn end_lease(&mut self, id: AssignmentId) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if let Some(ids) = self.by_device.get_mut(&lease.device) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_device.remove(&lease.device);
            }
        }
        if let Some(ranges) = self.headers.get_mut(&lease.header) {
            ranges.live.remove(&lease.start);
            ranges.give_back(lease.scanned_until, lease.end);
            if ranges.is_spent() {
                self.headers.remove(&lease.header);
                self.dropped.push(lease.header);
            }
        }
        Some(lease)
    }

    /// Ends every lease whose expiry is at or before `now_ms`.
    pub fn expire(&mut self, now_ms: i64) -> Vec<Lease> {
        let expired: Vec<AssignmentId> = self
            .leases
            .values()
            .filter(|l| l.expires_at_ms <= now_ms)
            .map(|l| l.id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.end_lease(id))
            .collect()
    }

    /// Ends every lease of a device that left.
    pub fn release_device(&mut self, device: &str) -> Vec<Lease> {
        self.leases_of(device)
            .into_iter()
            .filter_map(|id| self.end_lease(id))
            .collect()
    }

    /// Drops a header whose work is no longer current, with all leases on it. Nothing is
    /// reclaimed: the nonces of a stale header are worthless.
    pub fn retire_header(&mut self, header: HeaderId) -> Vec<Lease> {
        let Some(ranges) = self.headers.get_mut(&header) else {
            return Vec::new();
        };
        ranges.closed = true;
        ranges.free.clear();
        let ids: Vec<AssignmentId> = ranges.live.values().copied().collect();
        let ended = ids
            .into_iter()
            .filter_map(|id| self.end_lease(id))
            .collect();
        if self.headers.remove(&header).is_some() {
            self.dropped.push(header);
        }
        ended
    }

    /// Headers dropped since the last call: the caller forgets their prefixes.
    pub fn take_dropped_headers(&mut self) -> Vec<HeaderId> {
        std::mem::take(&mut self.dropped)
    }

    /// Panics if any invariant is broken. For tests.
    #[cfg(test)]
    fn check_invariants(&self) {
        for (header, ranges) in &self.headers {
            let mut spans: Vec<(u64, u64, &str)> = Vec::new();
            for (&start, id) in &ranges.live {
                let lease = &self.leases[id];
                assert_eq!(lease.start, start);
                assert_eq!(lease.header, *header);
                assert!(lease.start <= lease.scanned_until && lease.scanned_until <= lease.end);
                if !ranges.closed {
                    assert!(lease.end <= ranges.cursor, "live range above the cursor");
                }
                spans.push((lease.start, lease.end, "live"));
            }
            for (&start, &end) in &ranges.free {
                assert!(
                    start < end && end <= ranges.cursor,
                    "free range above the cursor"
                );
                spans.push((start, end, "free"));
            }
            spans.sort();
            for pair in spans.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "header {header}: {pair:?} overlap");
            }
        }
        for lease in self.leases.values() {
            assert!(self.headers[&lease.header].live.get(&lease.start) == Some(&lease.id));
            assert!(self.by_device[&lease.device].contains(&lease.id));
        }
        let indexed: usize = self.by_device.values().map(BTreeSet::len).sum();
        assert_eq!(indexed, self.leases.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hands_out_disjoint_ranges_then_reuses_reclaimed_ones() {
        let mut s = Scheduler::new(1);
        s.add_header(7);
        let a = s.assign("a", 7, 1000, 100).expect("space");
        let b = s.assign("b", 7, 1000, 100).expect("space");
        assert_eq!((a.start, a.end, b.start, b.end), (0, 1000, 1000, 2000));
        s.progress(a.id, 400);
        let ended = s.end_lease(a.id).expect("live");
        assert_eq!(ended.scanned_until, 400);
        // The unscanned 400..1000 comes back before fresh nonces.
        let c = s.assign("c", 7, 10_000, 100).expect("space");
        assert_eq!((c.start, c.end), (400, 1000));
        let d = s.assign("c", 7, 500, 100).expect("space");
        assert_eq!((d.start, d.end), (2000, 2500));
        s.check_invariants();
    }

    #[test]
    fn expiry_and_departure_reclaim() {
        let mut s = Scheduler::new(1);
        s.add_header(1);
        let a = s.assign("a", 1, 100, 50).expect("space");
        let b = s.assign("b", 1, 100, 500).expect("space");
        let expired = s.expire(60);
        assert_eq!(expired.iter().map(|l| l.id).collect::<Vec<_>>(), vec![a.id]);
        assert!(s.lease(a.id).is_none());
        assert_eq!(s.release_device("b").len(), 1);
        assert!(s.lease(b.id).is_none());
        // Everything came back: the cursor is at zero again.
        assert_eq!(s.remaining(1), NONCE_SPACE);
        s.check_invariants();
    }

    #[test]
    fn exhausted_header_is_dropped_when_its_last_lease_ends() {
        let mut s = Scheduler::new(1);
        s.add_header(3);
        let whole = s.assign("a", 3, NONCE_SPACE, 10).expect("space");
        assert!(s.assign("b", 3, 1, 10).is_none());
        s.progress(whole.id, NONCE_SPACE);
        s.end_lease(whole.id);
        assert!(!s.has_header(3));
        assert_eq!(s.take_dropped_headers(), vec![3]);
    }

    #[test]
    fn retiring_a_header_ends_its_leases_without_reclaiming() {
        let mut s = Scheduler::new(1);
        s.add_header(1);
        s.add_header(2);
        s.assign("a", 1, 10, 10);
        s.assign("a", 2, 10, 10);
        let ended = s.retire_header(1);
        assert_eq!(ended.len(), 1);
        assert_eq!(s.leases_of("a").len(), 1);
        assert!(!s.has_header(1));
        assert_eq!(s.take_dropped_headers(), vec![1]);
        s.check_invariants();
    }

    #[test]
    fn restored_leases_are_never_handed_out_again() {
        let mut s = Scheduler::new(1);
        s.add_header(9);
        let lease = Lease {
            id: 41,
            device: "a".into(),
            header: 9,
            start: 5000,
            end: 6000,
            scanned_until: 5000,
            expires_at_ms: 100,
        };
        s.restore(lease.clone()).expect("restores");
        assert_eq!(s.next_id(), 42);
        let fresh = s.assign("b", 9, 10_000, 100).expect("space");
        assert!(fresh.start >= 6000);
        let mut overlapping = lease.clone();
        overlapping.id = 50;
        overlapping.start = 5500;
        overlapping.end = 5600;
        assert_eq!(s.restore(overlapping), Err(RestoreError::Overlap(50, 41)));
        let mut unknown = lease;
        unknown.id = 51;
        unknown.header = 99;
        assert_eq!(s.restore(unknown), Err(RestoreError::UnknownHeader(51, 99)));
        s.check_invariants();

        // A closed header keeps its restored leases but hands out nothing.
        s.add_closed_header(10);
        s.restore(Lease {
            id: 60,
            device: "c".into(),
            header: 10,
            start: 0,
            end: 10,
            scanned_until: 0,
            expires_at_ms: 1,
        })
        .expect("restores");
        assert!(s.assign("c", 10, 5, 1).is_none());
        s.end_lease(60);
        assert!(!s.has_header(10));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign {
            device: u8,
            header: u8,
            size: u32,
            ttl: u8,
        },
        Progress {
            pick: u16,
            fraction: u8,
        },
        End {
            pick: u16,
        },
        Tick {
            by: u8,
        },
        Leave {
            device: u8,
        },
        Retire {
            header: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12, 0u8..3, 1u32..2_000_000_000, 1u8..20).prop_map(|(device, header, size, ttl)| Op::Assign { device, header, size, ttl }),
            2 => (any::<u16>(), 0u8..=100).prop_map(|(pick, fraction)| Op::Progress { pick, fraction }),
            2 => any::<u16>().prop_map(|pick| Op::End { pick }),
            1 => (1u8..10).prop_map(|by| Op::Tick { by }),
            1 => (0u8..12).prop_map(|device| Op::Leave { device }),
            1 => (0u8..3).prop_map(|header| Op::Retire { header }),
        ]
    }

    proptest! {
        /// Devices joining, finishing, timing out and leaving in any order never make two
        /// live leases share a nonce, and reclaimed ranges never overlap live ones.
        #[test]
        fn no_overlap_under_churn(ops in proptest::collection::vec(op(), 1..300)) {
            let mut s = Scheduler::new(1);
            let mut now = 0i64;
            let mut next_header = 3u64;
            for h in 0..3 { s.add_header(h); }
            let mut live_headers: Vec<u64> = vec![0, 1, 2];
            for op in ops {
                match op {
                    Op::Assign { device, header, size, ttl } => {
                        let h = live_headers[header as usize % live_headers.len()];
                        if s.assign(&format!("d{device}"), h, u64::from(size), now + i64::from(ttl)).is_none() {
                            // Exhausted: a work source would supply a new header.
                            s.add_header(next_header);
                            live_headers.push(next_header);
                            next_header += 1;
                        }
                    }
                    Op::Progress { pick, fraction } => {
                        let ids: Vec<_> = s.leases().map(|l| (l.id, l.start, l.end)).collect();
                        if !ids.is_empty() {
                            let (id, start, end) = ids[pick as usize % ids.len()];
                            s.progress(id, start + (end - start) * u64::from(fraction) / 100);
                        }
                    }
                    Op::End { pick } => {
                        let mut ids: Vec<_> = s.leases().map(|l| l.id).collect();
                        ids.sort_unstable();
                        if !ids.is_empty() { s.end_lease(ids[pick as usize % ids.len()]); }
                    }
                    Op::Tick { by } => { now += i64::from(by); s.expire(now); }
                    Op::Leave { device } => { s.release_device(&format!("d{device}")); }
                    Op::Retire { header } => {
                        if live_headers.len() > 1 {
                            let h = live_headers.remove(header as usize % live_headers.len());
                            s.retire_header(h);
                        }
                    }
                }
                for h in s.take_dropped_headers() {
                    live_headers.retain(|x| *x != h);
                    if live_headers.is_empty() {
                        s.add_header(next_header);
                        live_headers.push(next_header);
                        next_header += 1;
                    }
                }
                s.check_invariants();
            }
        }
    }
}
