//! MicroMiners: applying the desired set, their work sources, pool events, and which
//! device works for which miner.

use super::*;

impl FleetState {
    /// Makes the set of MicroMiners current: adds, updates and removes, then re-matches
    /// every device.
    pub fn apply_miners(&mut self, desired: &MinerSet, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let removed: Vec<String> = self
            .miners
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in removed {
            tracing::info!(miner = %key, "MicroMiner removed; cancelling its work");
            self.retire_miner_headers(&key, "MicroMiner removed", &mut fx);
            self.miners.remove(&key);
            fx.persist.push(PersistOp::PoolSession(key.clone(), None));
        }
        for (key, miner) in desired {
            let wants_pool = miner.spec.work_source.stratum.is_some();
            match self.miners.get_mut(key) {
                Some(runtime)
                    if runtime.spec.spec == miner.spec
                        && runtime.spec.metadata == miner.metadata => {}
                Some(runtime) if runtime.source.stratum().is_some() != wants_pool => {
                    runtime.spec = miner.clone();
                    tracing::info!(miner = %key, "MicroMiner changed its kind of work source");
                    // Everything outstanding was built by the old source.
                    self.retire_miner_headers(key, "work source changed", &mut fx);
                    fx.persist.push(PersistOp::PoolSession(key.clone(), None));
                    let source = self.new_source(key, miner, now_ms, &mut fx);
                    if let Some(runtime) = self.miners.get_mut(key) {
                        runtime.source = source;
                        runtime.current_header = None;
                    }
                }
                Some(runtime) => {
                    let old = std::mem::replace(&mut runtime.spec, miner.clone());
                    let difficulty = miner
                        .spec
                        .work_source
                        .builtin
                        .as_ref()
                        .map(|b| b.network_difficulty);
                    let new_job = match (runtime.source.builtin_mut(), difficulty) {
                        (Some(builtin), Some(d)) => builtin.difficulty_changes(d),
                        _ => false,
                    };
                    if new_job {
                        let job = self.ids.take_job();
                        if let Some(runtime) = self.miners.get_mut(key)
                            && let (Some(builtin), Some(d)) =
                                (runtime.source.builtin_mut(), difficulty)
                        {
                            builtin.set_difficulty(d, job);
                            runtime.current_header = None;
                            fx.persist
                                .push(PersistOp::Tip(key.clone(), builtin.tip().clone()));
                        }
                        fx.persist.push(PersistOp::Ids(self.ids.clone()));
                        self.retire_stale_headers(key, "network difficulty changed", &mut fx);
                    }
                    if wants_pool && old.spec.work_source != miner.spec.work_source {
                        // The upstream restarts with the new settings: the old pool
                        // session's work can no longer be submitted anywhere.
                        let epoch = self.ids.take_job();
                        fx.persist.push(PersistOp::Ids(self.ids.clone()));
                        if let Some(runtime) = self.miners.get_mut(key) {
                            runtime.source = Source::Stratum(StratumWork::new(key, epoch));
                            runtime.current_header = None;
                        }
                        fx.persist.push(PersistOp::PoolSession(key.clone(), None));
                        self.retire_miner_headers(key, "pool settings changed", &mut fx);
                    }
                    if miner.spec.paused && !old.spec.paused {
                        self.end_miner_leases(key, "MicroMiner paused", &mut fx);
                    }
                    if miner.spec.limits != old.spec.limits {
                        self.send_limits(key, &mut fx);
                    }
                    tracing::info!(miner = %key, new_job, "MicroMiner updated");
                }
                None => {
                    let source = self.new_source(key, miner, now_ms, &mut fx);
                    let mut effective = RateWindow::default();
                    effective.observe_from(now_ms);
                    self.miners.insert(
                        key.clone(),
                        MinerRuntime {
                            spec: miner.clone(),
                            source,
                            // Leases restored after a restart are on headers of an
                            // earlier process: they are this MicroMiner's too.
                            headers: self
                                .headers
                                .values()
                                .filter(|h| h.miner == *key)
                                .map(|h| h.id)
                                .collect(),
                            current_header: None,
                            effective,
                            conditions: Vec::new(),
                            profitable: None,
                            unprofitable_pause: false,
                        },
                    );
                }
            }
        }
        let names: Vec<String> = self.devices.keys().cloned().collect();
        for name in names {
            self.rematch_device(&name, now_ms, &mut fx);
        }
        self.update_conditions(now_ms);
        fx
    }

    /// The work source a MicroMiner starts with: a builtin chain continues from its
    /// persisted tip; a pool starts with no work until its upstream connects.
    pub(super) fn new_source(
        &mut self,
        key: &str,
        miner: &MicroMiner,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Source {
        let source = match &miner.spec.work_source.builtin {
            Some(builtin) => {
                let difficulty = builtin.network_difficulty;
                let tip = self.tips.get(key).cloned();
                let job = if tip.is_none() {
                    self.ids.take_job()
                } else {
                    0
                };
                let mut source =
                    BuiltinSource::new(key, difficulty, tip, job, now_unix_seconds(now_ms));
                if source.difficulty_changes(difficulty) {
                    source.set_difficulty(difficulty, self.ids.take_job());
                }
                fx.persist
                    .push(PersistOp::Tip(key.to_string(), source.tip().clone()));
                tracing::info!(miner = %key, network_difficulty = difficulty, "MicroMiner added (builtin work)");
                Source::Builtin(source)
            }
            None => {
                let pools: Vec<String> = miner
                    .spec
                    .work_source
                    .stratum
                    .iter()
                    .flat_map(|s| s.pools())
                    .map(|p| p.url)
                    .collect();
                // The previous process's session, if it was with one of these pools (a
                // redirect by client.reconnect is not resumed: the address is the pool's).
                let restored = self
                    .pool_sessions
                    .remove(key)
                    .filter(|r| pools.get(r.pool_index) == Some(&r.pool))
                    .and_then(|r| StratumWork::restore(key, &r));
                match restored {
                    Some(work) => {
                        tracing::info!(miner = %key, pool = ?pools.first(), "MicroMiner added (pool work); resuming the previous pool session");
                        Source::Stratum(work)
                    }
                    None => {
                        tracing::info!(miner = %key, pool = ?pools.first(), "MicroMiner added (pool work)");
                        fx.persist
                            .push(PersistOp::PoolSession(key.to_string(), None));
                        Source::Stratum(StratumWork::new(key, self.ids.take_job()))
                    }
                }
            }
        };
        fx.persist.push(PersistOp::Ids(self.ids.clone()));
        source
    }

    /// Applies what a MicroMiner's pool connection reported: new jobs, difficulty,
    /// sessions. Stale work is cancelled at once and devices get work from the new job.
    pub fn upstream_event(&mut self, miner: &str, event: UpstreamEvent, now_ms: i64) -> Effects {
        let fx = self.apply_upstream_event(miner, event, now_ms);
        // Also after a disconnection that changes no work: PoolConnected turns false.
        self.update_conditions(now_ms);
        fx
    }

    fn apply_upstream_event(&mut self, miner: &str, event: UpstreamEvent, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let Some(runtime) = self.miners.get_mut(miner) else {
            return fx;
        };
        let Some(work) = runtime.source.stratum_mut() else {
            return fx;
        };
        let ids = &mut self.ids;
        let mut took_job = false;
        let disconnected = matches!(event, UpstreamEvent::Disconnected { .. });
        let change = work.apply(event, || {
            took_job = true;
            ids.take_job()
        });
        if !disconnected {
            fx.persist.push(PersistOp::PoolSession(
                miner.to_string(),
                work.record().map(Box::new),
            ));
        }
        if took_job {
            fx.persist.push(PersistOp::Ids(self.ids.clone()));
        }
        match change {
            Change::Nothing => return fx,
            Change::NewEpoch(reason) => {
                if let Some(runtime) = self.miners.get_mut(miner) {
                    runtime.current_header = None;
                }
                self.retire_stale_headers(miner, reason, &mut fx);
            }
            Change::NewWork => {
                if let Some(runtime) = self.miners.get_mut(miner) {
                    runtime.current_header = None;
                }
            }
            Change::Difficulty => {
                if let Some(runtime) = self.miners.get_mut(miner) {
                    runtime.current_header = None;
                }
                for name in self.devices_of(miner) {
                    self.rematch_device(&name, now_ms, &mut fx);
                }
                return fx;
            }
        }
        // Devices without a session are skipped by top_up itself.
        for name in self.devices_of(miner) {
            self.top_up(&name, now_ms, &mut fx);
        }
        fx
    }

    /// The devices a MicroMiner's selector holds now.
    pub(super) fn devices_of(&self, miner: &str) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, d)| d.miner.as_deref() == Some(miner))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub(super) fn matching_miner(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        // Several MicroMiners may select a device; the first by namespace/name wins so
        // the choice is stable across restarts.
        self.miners
            .iter()
            .find(|(_, m)| selector::matches(&m.spec.spec.selector, labels))
            .map(|(k, _)| k.clone())
    }

    pub(super) fn rematch_device(&mut self, name: &str, now_ms: i64, fx: &mut Effects) {
        let Some(device) = self.devices.get(name) else {
            return;
        };
        let wanted = self.matching_miner(&device.record.labels);
        if wanted != device.miner {
            if let Some(old) = &device.miner {
                tracing::info!(device = name, from = %old, to = ?wanted, "device changes MicroMiner");
            }
            // After a restart the device's MicroMiner is not known until now, and the
            // leases restored for that same MicroMiner are still good: only leases for
            // another one go.
            let foreign: Vec<AssignmentId> = self
                .scheduler
                .leases_of(name)
                .into_iter()
                .filter(|id| self.lease_meta.get(id).map(|m| m.miner.as_str()) != wanted.as_deref())
                .collect();
            self.end_leases_of(name, foreign, "device moved to another MicroMiner", fx);
            if let Some(device) = self.devices.get_mut(name) {
                device.miner = wanted.clone();
                device.vardiff = None;
            }
        }
        if let (Some(key), Some(device)) = (wanted.as_ref(), self.devices.get_mut(name))
            && let Some(miner) = self.miners.get(key)
        {
            let spm = miner.spec.spec.shares_per_minute;
            let max = miner.source.share_cap();
            let nominal = device.nominal_hashrate() * miner.spec.spec.limits.duty_cycle;
            match device.vardiff.as_mut() {
                Some(v) => v.set_goal(spm, max, now_ms),
                None => device.vardiff = Some(Vardiff::new(nominal, spm, max, now_ms)),
            }
        }
        self.top_up(name, now_ms, fx);
    }

    pub(super) fn send_limits(&self, miner: &str, fx: &mut Effects) {
        let Some(runtime) = self.miners.get(miner) else {
            return;
        };
        let limits = runtime.spec.spec.limits.to_wire();
        for (name, device) in &self.devices {
            if device.session.is_some() && device.miner.as_deref() == Some(miner) {
                fx.send(
                    name,
                    Kind::SetLimits(pb::SetLimits {
                        limits: Some(limits.clone()),
                    }),
                );
            }
        }
    }

    /// Cordons or uncordons a device: a cordoned one keeps its session and is handed
    /// nothing; what it holds is taken back at once.
    pub fn set_unschedulable(&mut self, name: &str, unschedulable: bool, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        if unschedulable {
            if self.unschedulable.insert(name.to_string()) {
                tracing::info!(
                    device = name,
                    "device unschedulable; its work is taken back"
                );
                self.end_device_leases(name, "device marked unschedulable", &mut fx);
            }
        } else if self.unschedulable.remove(name) {
            tracing::info!(device = name, "device schedulable again");
            self.top_up(name, now_ms, &mut fx);
        }
        self.update_conditions(now_ms);
        fx
    }
}
