//! Leases: ending, expiring and reclaiming them, retiring headers, and topping devices up
//! with fresh ranges.

use super::*;

impl FleetState {
    /// Ends a lease (reclaiming its unscanned remainder) and remembers it for late shares.
    pub(super) fn end_lease(&mut self, id: AssignmentId, now_ms: i64, fx: &mut Effects) {
        if let Some(lease) = self.scheduler.end_lease(id) {
            fx.persist.push(PersistOp::DeleteLease(id));
            self.remember_ended(lease, now_ms, fx);
        }
    }

    /// Remembers a lease that just ended (its `DeleteLease` is already in `fx`), in memory
    /// and, in the same effects, in the store: a restart must judge its late shares as
    /// this process would have.
    pub(super) fn remember_ended(&mut self, lease: Lease, now_ms: i64, fx: &mut Effects) {
        let Some(meta) = self.lease_meta.remove(&lease.id) else {
            return;
        };
        if let Some(header) = self.headers.get(&lease.header).cloned() {
            fx.persist.push(PersistOp::EndedLease(EndedLeaseRecord {
                record: LeaseRecord {
                    lease: lease.clone(),
                    target_le: meta.target.to_le_bytes().to_vec(),
                    difficulty: meta.difficulty,
                    miner: meta.miner.clone(),
                },
                ended_unix_ms: now_ms,
            }));
            *self.ended_headers.entry(header.id).or_default() += 1;
            self.ended_order.push_back(lease.id);
            self.ended.insert(
                lease.id,
                EndedLease {
                    lease,
                    meta,
                    header,
                    ended_ms: now_ms,
                },
            );
        }
    }

    /// Forgets leases that ended [`ENDED_LEASE_MEMORY_MS`] or longer before `now_ms`, and
    /// the stored headers only they still named.
    pub(super) fn forget_old_ended(&mut self, now_ms: i64, fx: &mut Effects) {
        while let Some(id) = self.ended_order.front().copied() {
            match self.ended.get(&id) {
                Some(e) if e.ended_ms + ENDED_LEASE_MEMORY_MS > now_ms => break,
                _ => {
                    self.ended_order.pop_front();
                    let Some(ended) = self.ended.remove(&id) else {
                        continue;
                    };
                    fx.persist.push(PersistOp::ForgetEndedLease(id));
                    let header = ended.header.id;
                    if let Some(count) = self.ended_headers.get_mut(&header) {
                        *count -= 1;
                        if *count == 0 {
                            self.ended_headers.remove(&header);
                            // Deferred by `forget_dropped_headers` while this lease named it.
                            if !self.headers.contains_key(&header) {
                                fx.persist.push(PersistOp::DeleteHeader(header));
                            }
                        }
                    }
                }
            }
        }
    }

    pub(super) fn end_device_leases(&mut self, name: &str, reason: &str, fx: &mut Effects) {
        let ids = self.scheduler.leases_of(name);
        self.end_leases_of(name, ids, reason, fx);
    }

    /// Ends leases `ids` of device `name` and tells it, if it is connected.
    pub(super) fn end_leases_of(
        &mut self,
        name: &str,
        ids: Vec<AssignmentId>,
        reason: &str,
        fx: &mut Effects,
    ) {
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            self.scheduler.end_lease(*id);
            self.lease_meta.remove(id);
            fx.persist.push(PersistOp::DeleteLease(*id));
        }
        if self.devices.get(name).is_some_and(|d| d.session.is_some()) {
            fx.send(
                name,
                Kind::Cancel(pb::Cancel {
                    assignment_ids: ids,
                    reason: reason.to_string(),
                }),
            );
        }
    }

    pub(super) fn end_miner_leases(&mut self, miner: &str, reason: &str, fx: &mut Effects) {
        for name in self.devices_of(miner) {
            self.end_device_leases(&name, reason, fx);
        }
    }

    /// Retires every header of `miner` from a job other than its current one.
    pub(super) fn retire_stale_headers(&mut self, miner: &str, reason: &str, fx: &mut Effects) {
        let Some(runtime) = self.miners.get(miner) else {
            return;
        };
        let job = runtime.source.job();
        let stale: Vec<HeaderId> = runtime
            .headers
            .iter()
            .copied()
            .filter(|h| self.headers.get(h).is_none_or(|w| w.job != job))
            .collect();
        self.retire_headers(miner, &stale, reason, fx);
    }

    pub(super) fn retire_miner_headers(&mut self, miner: &str, reason: &str, fx: &mut Effects) {
        let all: Vec<HeaderId> = self
            .miners
            .get(miner)
            .map(|m| m.headers.iter().copied().collect())
            .unwrap_or_default();
        self.retire_headers(miner, &all, reason, fx);
    }

    pub(super) fn retire_headers(
        &mut self,
        miner: &str,
        headers: &[HeaderId],
        reason: &str,
        fx: &mut Effects,
    ) {
        let mut cancelled: BTreeMap<String, Vec<AssignmentId>> = BTreeMap::new();
        for &header in headers {
            for lease in self.scheduler.retire_header(header) {
                self.lease_meta.remove(&lease.id);
                fx.persist.push(PersistOp::DeleteLease(lease.id));
                cancelled.entry(lease.device).or_default().push(lease.id);
            }
            if let Some(runtime) = self.miners.get_mut(miner) {
                runtime.headers.remove(&header);
                if runtime.current_header == Some(header) {
                    runtime.current_header = None;
                }
            }
        }
        self.forget_dropped_headers(fx);
        for (device, ids) in cancelled {
            if self
                .devices
                .get(&device)
                .is_some_and(|d| d.session.is_some())
            {
                fx.send(
                    &device,
                    Kind::Cancel(pb::Cancel {
                        assignment_ids: ids,
                        reason: reason.to_string(),
                    }),
                );
            }
        }
    }

    pub(super) fn forget_dropped_headers(&mut self, fx: &mut Effects) {
        for header in self.scheduler.take_dropped_headers() {
            // Ended leases may still point at it for late shares; they hold the Arc.
            if let Some(work) = self.headers.remove(&header)
                && let Some(runtime) = self.miners.get_mut(&work.miner)
            {
                runtime.headers.remove(&header);
                if runtime.current_header == Some(header) {
                    runtime.current_header = None;
                }
            }
            // A header an ended lease names stays stored until that lease is forgotten
            // (`forget_old_ended`), so a restart can still judge its late shares.
            if !self.ended_headers.contains_key(&header) {
                fx.persist.push(PersistOp::DeleteHeader(header));
            }
        }
    }

    /// Gives a connected device leases until it holds [`LEASES_PER_DEVICE`].
    pub(super) fn top_up(&mut self, name: &str, now_ms: i64, fx: &mut Effects) {
        // Checked first: every tick calls this for every connected device, nearly all of
        // which hold their leases already.
        if self.scheduler.lease_count(name) >= LEASES_PER_DEVICE {
            return;
        }
        let Some(device) = self.devices.get(name) else {
            return;
        };
        // A device a local limit stops (battery, window, its own workload) gets nothing
        // until it reports it can hash again; the tick after that report tops it up.
        if device.session.is_none()
            || self.unschedulable.contains(name)
            || stops_hashing(&device.reported_state)
        {
            return;
        }
        let Some(key) = device.miner.clone() else {
            return;
        };
        let Some(miner) = self.miners.get(&key) else {
            return;
        };
        if miner.spec.spec.paused || miner.unprofitable_pause {
            return;
        }
        let spec = miner.spec.spec.clone();
        let nominal = device.nominal_hashrate();
        let rate = nominal * spec.limits.duty_cycle;
        let size =
            ((rate * f64::from(spec.assignment_seconds)) as u64).clamp(MIN_RANGE, NONCE_SPACE);
        let (difficulty, target) = match &device.vardiff {
            Some(v) => (v.difficulty(), v.target()),
            None => return,
        };
        let device_lease = device_lease_ms(&miner.spec, size, rate);
        // Each pass either leases a range or opens a fresh header (which always has room),
        // so a few passes suffice; the bound only guards against a logic error spinning.
        for _ in 0..4 * LEASES_PER_DEVICE {
            if self.scheduler.lease_count(name) >= LEASES_PER_DEVICE {
                break;
            }
            let header = match self.miners.get(&key).and_then(|m| m.current_header) {
                Some(h) => h,
                None => match self.new_header(&key, fx) {
                    Some(h) => h,
                    // The source has no work now (a pool between jobs or connections).
                    None => return,
                },
            };
            let expires = now_ms + device_lease + LINK_SLACK_MS;
            let Some(lease) = self.scheduler.assign(name, header, size, expires) else {
                if let Some(runtime) = self.miners.get_mut(&key) {
                    runtime.current_header = None;
                }
                continue;
            };
            // One trace per assignment (a root, not a child of the long-lived session):
            // with OTLP export on, it shows which device got which range of which
            // MicroMiner's work, and the agent's `mine` span continues it.
            let assign = tracing::info_span!(
                parent: None,
                "assign",
                device = name,
                miner = %key,
                assignment = lease.id,
                nonces = lease.end - lease.start,
                difficulty,
            );
            let _entered = assign.enter();
            let trace_context = crate::span_relay::trace_context(&assign);
            if let Some(trace) = crate::span_relay::trace_id(&trace_context)
                && let Some(device) = self.devices.get_mut(name)
            {
                if device.traces.len() >= crate::span_relay::TRACES_PER_DEVICE {
                    device.traces.pop_front();
                }
                device.traces.push_back(trace);
            }
            let Some(work) = self.headers.get(&header).cloned() else {
                // Cannot happen: headers are registered before they are assigned from.
                self.scheduler.end_lease(lease.id);
                return;
            };
            let meta = LeaseMeta {
                target,
                difficulty,
                miner: key.clone(),
            };
            if lease.id >= self.ids.next_assignment {
                // Reserve a block of ids durably: only the assignment that crosses into a
                // new block waits for the disk, and a restart continues above the block.
                self.ids.next_assignment = lease.id + ASSIGNMENT_ID_BLOCK;
                fx.persist.push(PersistOp::Ids(self.ids.clone()));
            }
            fx.persist.push(PersistOp::Lease(LeaseRecord {
                lease: lease.clone(),
                target_le: target.to_le_bytes().to_vec(),
                difficulty,
                miner: key.clone(),
            }));
            fx.send(
                name,
                Kind::Assignment(pb::Assignment {
                    id: lease.id,
                    header_prefix: work.prefix.to_vec(),
                    nonce_start: lease.start,
                    nonce_end: lease.end,
                    share_target: target.to_le_bytes().to_vec(),
                    share_difficulty: difficulty,
                    lease_ms: device_lease as u32,
                    expires_at_unix_ms: expires,
                    miner: key.clone(),
                    limits: Some(spec.limits.to_wire()),
                    trace_context,
                }),
            );
            self.lease_meta.insert(lease.id, meta);
        }
    }

    pub(super) fn new_header(&mut self, miner: &str, fx: &mut Effects) -> Option<HeaderId> {
        let runtime = self.miners.get_mut(miner)?;
        let id = self.ids.next_header;
        let work = runtime.source.next_header(id)?;
        self.ids.take_header();
        runtime.headers.insert(id);
        runtime.current_header = Some(id);
        fx.persist.push(PersistOp::Header(work.clone()));
        match &runtime.source {
            Source::Builtin(builtin) => fx
                .persist
                .push(PersistOp::Tip(miner.to_string(), builtin.tip().clone())),
            // Its allocation counters moved: a resumed session must not repeat them.
            Source::Stratum(work) => fx.persist.push(PersistOp::PoolSession(
                miner.to_string(),
                work.record().map(Box::new),
            )),
        }
        fx.persist.push(PersistOp::Ids(self.ids.clone()));
        self.scheduler.add_header(id);
        self.headers.insert(id, Arc::new(work));
        Some(id)
    }

    /// Trace ids of a device's latest traced assignments.
    pub fn traces(&self, name: &str) -> Vec<[u8; 16]> {
        self.devices
            .get(name)
            .map(|d| d.traces.iter().copied().collect())
            .unwrap_or_default()
    }
}
