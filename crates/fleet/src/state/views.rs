//! What operators see: miners' and devices' views, and the read-only counts.

use super::*;

impl FleetState {
    /// What a device is doing as operators see it: `offline`, `unschedulable`, what the
    /// agent reports while held back (`throttled:...`, `paused:...`, ...), `mining` or
    /// `idle`.
    pub(super) fn device_state<'a>(&self, d: &'a DeviceRuntime) -> &'a str {
        if d.session.is_none() {
            "offline"
        } else if self.unschedulable.contains(&d.record.name) {
            "unschedulable"
        } else if is_held_back(&d.reported_state) {
            &d.reported_state
        } else if self.scheduler.lease_count(&d.record.name) > 0 {
            "mining"
        } else {
            "idle"
        }
    }

    /// Everything operators see, with ledger totals looked up through `totals`. A pure
    /// read: conditions change in `tick` and where their events happen
    /// (`update_conditions`), so a transition's time never depends on who looked when.
    pub fn view(
        &self,
        now_ms: i64,
        totals: &dyn Fn(Scope<'_>) -> Totals,
    ) -> (Vec<MinerView>, Vec<DeviceView>) {
        let devices: Vec<DeviceView> = self
            .devices
            .values()
            .map(|d| {
                let connected = d.session.is_some();
                let leases = self.scheduler.leases_of(&d.record.name).len();
                let unschedulable = self.unschedulable.contains(&d.record.name);
                let state = self.device_state(d).to_string();
                DeviceView {
                    name: d.record.name.clone(),
                    labels: d.record.labels.clone(),
                    connected,
                    state,
                    miner: d.miner.clone(),
                    unschedulable,
                    cores: d.record.capacity.cores,
                    memory_bytes: d.record.capacity.memory_bytes,
                    mining_threads: d.record.capacity.mining_threads,
                    arch: d.record.capacity.arch.clone(),
                    hash_engine: d.record.capacity.hash_engine.clone(),
                    hash_engine_basis: d.record.capacity.hash_engine_basis.clone(),
                    hash_engine_rates: d.record.capacity.hash_engine_rates.clone(),
                    agent_version: d.record.agent_version.clone(),
                    nominal_hashrate: d.record.capacity.nominal_hashrate,
                    reported_hashrate: if connected { d.reported_hashrate } else { 0.0 },
                    effective_hashrate: d.effective.hashrate(now_ms),
                    share_difficulty: d.vardiff.as_ref().map_or(0.0, Vardiff::difficulty),
                    assignments: leases,
                    shares: totals(Scope::Device(&d.record.name)),
                    protocol_errors: d.protocol_errors,
                    certificate_not_after_unix_ms: d.record.certificate_not_after_unix_ms,
                    flags: device_flags(d),
                    last_seen_unix_ms: d.record.last_seen_unix_ms,
                    readings: d.readings,
                    // From the ledger, filled in by the caller.
                    pool: Default::default(),
                }
            })
            .collect();
        let economies = self.economies();
        let mut miners = Vec::new();
        for (key, runtime) in &self.miners {
            let mut counts = DeviceCounts::default();
            let mut nominal = 0.0;
            for d in devices
                .iter()
                .filter(|d| d.miner.as_deref() == Some(key.as_str()))
            {
                counts.matched += 1;
                match d.state.as_str() {
                    "offline" => counts.offline += 1,
                    "mining" => {
                        counts.mining += 1;
                        nominal += d.nominal_hashrate * runtime.spec.spec.limits.duty_cycle;
                    }
                    s if is_held_back(s) => counts.throttled += 1,
                    _ => {}
                }
            }
            let t = totals(Scope::Miner(key));
            let effective = runtime.effective.hashrate(now_ms);
            let network_difficulty = runtime.source.network_difficulty();
            let economics_status = match (&runtime.spec.spec.economics, economies.get(key)) {
                (Some(economics), Some(economy)) => {
                    let difficulty = economics.network_difficulty.unwrap_or(network_difficulty);
                    let joules = self.energy_joules.get(key).copied().unwrap_or(0.0);
                    let energy_k_wh = joules / 3.6e6;
                    Some(EconomicsStatus {
                        power_watts: economy.working_watts,
                        energy_k_wh,
                        energy_cost: economics::energy_cost(economics, energy_k_wh),
                        revenue: economics::earned(economics, t.accepted_difficulty, difficulty),
                        cost_per_hour: economics::cost_per_hour(economics, economy.working_watts),
                        revenue_per_hour: economics::revenue_per_hour(
                            economics, effective, difficulty,
                        ),
                    })
                }
                _ => None,
            };
            let pool = runtime.source.stratum().map(|work| {
                let connection = work.status();
                PoolStatus {
                    state: connection.state.to_string(),
                    url: connection.url,
                    failover: connection.pool_index > 0,
                    difficulty: connection.difficulty,
                    job: connection.job,
                    last_error: connection.last_error,
                    // From the ledger, filled in by the caller.
                    accepted: 0,
                    rejected: 0,
                    rejected_by_reason: BTreeMap::new(),
                }
            });
            let status = MicroMinerStatus {
                observed_generation: runtime.spec.metadata.generation,
                conditions: runtime.conditions.clone(),
                hashrate: Hashrate { nominal, effective },
                shares: crate::status::share_counts(&t),
                blocks_found: t.blocks,
                last_share_time: t
                    .last_share_unix_ms
                    .and_then(crate::conditions::time_from_unix_ms),
                devices: counts,
                economics: economics_status,
                pool,
            };
            miners.push(MinerView {
                key: key.clone(),
                status,
                network_difficulty,
                totals: t,
            });
        }
        (miners, devices)
    }

    /// The oldest header a share could still be accepted for: every share record below it
    /// is settled history that no submission can touch again.
    pub fn oldest_live_header(&self) -> HeaderId {
        self.headers
            .keys()
            .copied()
            .chain(self.ended_headers.keys().copied())
            .min()
            .unwrap_or(self.ids.next_header)
    }

    /// The pool session a MicroMiner's upstream should ask to resume.
    pub fn resume_hint(&self, miner: &str) -> Option<ResumeHint> {
        self.miners.get(miner)?.source.stratum()?.resume_hint()
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.devices
            .values()
            .filter(|d| d.session.is_some())
            .count()
    }

    /// Live leases.
    pub fn lease_count(&self) -> usize {
        self.scheduler.leases().count()
    }

    /// Every live lease, by id.
    pub fn leases(&self) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self.scheduler.leases().cloned().collect();
        leases.sort_by_key(|l| l.id);
        leases
    }
}

pub(super) fn device_flags(d: &DeviceRuntime) -> Vec<DeviceFlag> {
    let mut flags = Vec::new();
    if let Some(mismatch) = d.honesty.mismatch() {
        flags.push(DeviceFlag {
            kind: "HashrateMismatch".into(),
            message: mismatch.describe(),
        });
    }
    if d.foreign_shares > 0 {
        flags.push(DeviceFlag {
            kind: "ForeignShares".into(),
            message: format!(
                "submitted {} share(s) for work assigned to other devices",
                d.foreign_shares
            ),
        });
    }
    flags
}
