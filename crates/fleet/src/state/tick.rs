//! The periodic tick: energy, expired leases, vardiff and honesty, top-ups.

use super::*;

impl FleetState {
    /// Periodic work: expire leases, retarget vardiff, forget old ended leases, and make
    /// sure every connected device has work.
    pub fn tick(&mut self, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        self.account_energy(now_ms, &mut fx);
        for lease in self.scheduler.expire(now_ms) {
            tracing::debug!(device = %lease.device, lease = lease.id, scanned = lease.scanned_until - lease.start,
                len = lease.len(), "lease expired; remainder reclaimed");
            fx.persist.push(PersistOp::DeleteLease(lease.id));
            self.remember_ended(lease, now_ms, &mut fx);
        }
        self.forget_dropped_headers(&mut fx);
        self.forget_old_ended(now_ms, &mut fx);
        for device in self.devices.values_mut() {
            if let Some(v) = device.vardiff.as_mut() {
                let flagged_before = device.honesty.mismatch().is_some();
                if let Some(mismatch) = device.honesty.judge(v.difficulty(), now_ms)
                    && !flagged_before
                {
                    tracing::warn!(device = %device.record.name, "{}", mismatch.describe());
                }
                if let Some(new) = v.retarget(now_ms) {
                    tracing::debug!(device = %device.record.name, difficulty = new, "vardiff retarget");
                }
            }
        }
        let names: Vec<String> = self
            .devices
            .iter()
            .filter(|(n, d)| {
                d.session.is_some() && self.scheduler.lease_count(n) < LEASES_PER_DEVICE
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.top_up(&name, now_ms, &mut fx);
        }
        self.update_conditions(now_ms);
        fx
    }

    /// Forgets leases that ended too long before `now_ms` for their shares to be judged,
    /// in memory and in the store. [`FleetState::tick`] does this too; a restart calls it
    /// before serving, since the controller may have been down past some of their windows.
    pub fn forget_ended_leases(&mut self, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        self.forget_old_ended(now_ms, &mut fx);
        fx
    }
}
