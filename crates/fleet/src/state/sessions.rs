//! Device sessions: connecting, reports and progress, cutting and disconnecting.

use super::*;

impl FleetState {
    /// A device opened a session. Returns the session id and the effects, the first
    /// message of which is the `Welcome`.
    pub fn connect(&mut self, name: &str, hello: &pb::Hello, now_ms: i64) -> (u64, Effects) {
        let mut fx = Effects::default();
        let session = self.next_session;
        self.next_session += 1;
        let capacity = hello.capacity.clone().unwrap_or_default();
        let device = self.device_entry(name, now_ms);
        let mut labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        // Labels the operator attached to the bootstrap token outrank the device's own.
        labels.extend(device.record.token_labels.clone());
        if device.session.is_some() {
            tracing::info!(device = name, "new session replaces the previous one");
        }
        let labels_changed = device.record.labels != labels;
        device.session = Some(session);
        device.record.labels = labels;
        device.record.capacity = capacity.clone().into();
        device.record.agent_version = hello.version.clone();
        device.record.last_seen_unix_ms = now_ms;
        device.reported_state = "idle".into();
        device.effective.observe_from(now_ms);
        if labels_changed {
            device.miner = None;
            device.vardiff = None;
        }
        fx.persist.push(PersistOp::Device(device.record.clone()));

        // Keep what the device still holds and we still honour; drop the rest.
        let mut kept = Vec::new();
        let owned: BTreeSet<AssignmentId> = self.scheduler.leases_of(name).into_iter().collect();
        for resumed in hello.resume.iter().flat_map(|r| &r.assignments) {
            if owned.contains(&resumed.assignment_id) {
                self.scheduler
                    .progress(resumed.assignment_id, resumed.scanned_until);
                kept.push(resumed.assignment_id);
            }
        }
        // Leases the device no longer knows about (it restarted) are reclaimed now.
        for id in owned {
            if !kept.contains(&id) {
                self.end_lease(id, now_ms, &mut fx);
            }
        }
        let limits = self
            .devices
            .get(name)
            .and_then(|d| d.miner.as_ref())
            .and_then(|m| self.miners.get(m))
            .map_or_else(
                || Limits::default().to_wire(),
                |m| m.spec.spec.limits.to_wire(),
            );
        fx.send(
            name,
            Kind::Welcome(pb::Welcome {
                device_name: name.to_string(),
                resumed_assignment_ids: kept,
                report_interval_ms: report_interval_ms(self.devices.len()),
                limits: Some(limits),
            }),
        );
        self.rematch_device(name, now_ms, &mut fx);
        (session, fx)
    }

    pub(super) fn device_entry(&mut self, name: &str, now_ms: i64) -> &mut DeviceRuntime {
        self.devices.entry(name.to_string()).or_insert_with(|| {
            DeviceRuntime::new(DeviceRecord {
                name: name.to_string(),
                first_seen_unix_ms: now_ms,
                ..DeviceRecord::default()
            })
        })
    }

    /// Counts a message from `name` that broke the protocol (its session is ended).
    pub fn protocol_error(&mut self, name: &str, now_ms: i64) {
        self.device_entry(name, now_ms).protocol_errors += 1;
    }

    /// The stored record of a device.
    pub fn device_record(&self, name: &str) -> Option<DeviceRecord> {
        self.devices.get(name).map(|d| d.record.clone())
    }

    /// A device got a certificate: at enrollment (with the token's labels) or renewal.
    pub fn certified(
        &mut self,
        name: &str,
        labels: Option<BTreeMap<String, String>>,
        not_after_unix_ms: i64,
        now_ms: i64,
    ) -> Effects {
        let device = self.device_entry(name, now_ms);
        if let Some(labels) = labels {
            device.record.token_labels = labels;
        }
        device.record.certificate_issued_unix_ms = now_ms;
        device.record.certificate_not_after_unix_ms = not_after_unix_ms;
        device.record.last_seen_unix_ms = now_ms;
        Effects {
            persist: vec![PersistOp::Device(device.record.clone())],
            messages: Vec::new(),
        }
    }

    /// Counts shares `name` submitted for work that belongs to other devices.
    pub fn foreign_shares(&mut self, name: &str, count: u64, now_ms: i64) {
        if count > 0 {
            let device = self.device_entry(name, now_ms);
            if device.foreign_shares == 0 {
                tracing::warn!(
                    device = name,
                    "device submitted shares for another device's work"
                );
            }
            device.foreign_shares += count;
        }
    }

    /// A revoked device: its session is over and its leases go back now.
    pub fn cut(&mut self, name: &str, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        for lease in self.scheduler.release_device(name) {
            self.lease_meta.remove(&lease.id);
            fx.persist.push(PersistOp::DeleteLease(lease.id));
        }
        if let Some(device) = self.devices.get_mut(name) {
            device.session = None;
            device.honesty.pause();
            device.reported_state = "offline".into();
            device.record.last_seen_unix_ms = now_ms;
            fx.persist.push(PersistOp::Device(device.record.clone()));
        }
        fx
    }

    /// A session ended. Its leases stay until they expire: the agent keeps scanning them
    /// while disconnected and may resume them.
    pub fn disconnect(&mut self, name: &str, session: u64, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        if let Some(device) = self.devices.get_mut(name)
            && device.session == Some(session)
        {
            device.session = None;
            device.honesty.pause();
            device.reported_state = "offline".into();
            device.record.last_seen_unix_ms = now_ms;
            fx.persist.push(PersistOp::Device(device.record.clone()));
        }
        fx
    }

    /// Whether `session` is the device's current session.
    pub fn is_current_session(&self, name: &str, session: u64) -> bool {
        self.devices.get(name).and_then(|d| d.session) == Some(session)
    }

    /// A `CapacityReport` from a device.
    pub fn report(&mut self, name: &str, report: &pb::CapacityReport, now_ms: i64) {
        if let Some(device) = self.devices.get_mut(name) {
            device.reported_hashrate = if report.hashrate.is_finite() {
                report.hashrate.max(0.0)
            } else {
                0.0
            };
            device.reported_state = report.state.chars().take(64).collect();
            device.readings = DeviceReadings::from_report(report);
            device.record.last_seen_unix_ms = now_ms;
            device.honesty.report(device.reported_hashrate, now_ms);
        }
    }

    /// A `Progress` from a device.
    pub fn progress(&mut self, name: &str, progress: &pb::Progress, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let owned = self
            .scheduler
            .lease(progress.assignment_id)
            .is_some_and(|l| l.device == name);
        if !owned {
            return fx;
        }
        self.scheduler
            .progress(progress.assignment_id, progress.scanned_until);
        if let Some(device) = self.devices.get_mut(name) {
            device.record.last_seen_unix_ms = now_ms;
        }
        if progress.finished {
            self.end_lease(progress.assignment_id, now_ms, &mut fx);
            self.top_up(name, now_ms, &mut fx);
        }
        fx
    }
}
