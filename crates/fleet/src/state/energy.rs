//! What a MicroMiner's devices draw and could earn: the energy account and the
//! `Profitable` condition.

use super::*;

impl FleetState {
    /// A MicroMiner's devices in terms of power and hash rate.
    /// Every MicroMiner with `spec.economics` in terms of power and hash rate, in one pass
    /// over the devices (the tick does this every second, so not once per MicroMiner).
    pub(super) fn economies(&self) -> BTreeMap<String, Economy> {
        let mut economies: BTreeMap<String, Economy> = self
            .miners
            .iter()
            .filter(|(_, m)| m.spec.spec.economics.is_some())
            .map(|(key, _)| (key.clone(), Economy::default()))
            .collect();
        for (name, d) in &self.devices {
            let Some(key) = d.miner.as_deref() else {
                continue;
            };
            if d.session.is_none() {
                continue;
            }
            let (Some(economy), Some(runtime)) = (economies.get_mut(key), self.miners.get(key))
            else {
                continue;
            };
            let Some(economics) = &runtime.spec.spec.economics else {
                continue;
            };
            let watts = economics::device_watts(
                economics,
                d.readings.power_watts,
                d.record.labels.get("class").map(String::as_str),
            );
            if !self.unschedulable.contains(name) {
                economy.capacity_hashrate +=
                    d.nominal_hashrate() * runtime.spec.spec.limits.duty_cycle;
                economy.capacity_watts += watts;
            }
            if !self.scheduler.leases_of(name).is_empty() {
                economy.working_watts += watts;
            }
        }
        economies
    }

    /// Adds the energy the working devices drew since the last tick, judges whether each
    /// MicroMiner pays, and now and then makes the energy totals durable.
    pub(super) fn account_energy(&mut self, now_ms: i64, fx: &mut Effects) {
        let step_ms = self
            .energy_tick_ms
            .map_or(0, |last| (now_ms - last).clamp(0, ENERGY_MAX_STEP_MS));
        self.energy_tick_ms = Some(now_ms);
        for (key, economy) in self.economies() {
            let Some(runtime) = self.miners.get(&key) else {
                continue;
            };
            let Some(economics) = runtime.spec.spec.economics.clone() else {
                continue;
            };
            let difficulty = economics
                .network_difficulty
                .unwrap_or_else(|| runtime.source.network_difficulty());
            *self.energy_joules.entry(key.clone()).or_default() +=
                economy.working_watts * step_ms as f64 / 1000.0;
            let revenue =
                economics::revenue_per_hour(&economics, economy.capacity_hashrate, difficulty);
            let cost = economics::cost_per_hour(&economics, economy.capacity_watts);
            let Some(runtime) = self.miners.get_mut(&key) else {
                continue;
            };
            let verdict = economics::profitable(runtime.profitable, revenue, cost);
            if runtime.profitable.is_some_and(|before| before != verdict) {
                tracing::info!(miner = %key, profitable = verdict, revenue_per_hour = revenue,
                    cost_per_hour = cost, "profitability changed");
            }
            runtime.profitable = Some(verdict);
            let pause = economics.pause_when_unprofitable && !verdict;
            if pause != runtime.unprofitable_pause {
                runtime.unprofitable_pause = pause;
                if pause {
                    // The tick tops devices up again once it pays (see `top_up`).
                    self.end_miner_leases(&key, "mining does not pay", fx);
                }
            }
        }
        if now_ms - self.energy_saved_ms >= ENERGY_SAVE_MS && !self.energy_joules.is_empty() {
            self.energy_saved_ms = now_ms;
            fx.persist
                .push(PersistOp::Energy(self.energy_joules.clone()));
        }
    }
}

/// Sets the `Profitable` condition from what the MicroMiner's schedulable devices could
/// earn at its duty cycle against what they would draw, as last judged by the tick (before
/// the first tick has judged, judged here).
pub(super) fn set_profitable(
    runtime: &mut MinerRuntime,
    economics: &Economics,
    economy: &Economy,
    network_difficulty: f64,
    now_ms: i64,
) {
    let revenue =
        economics::revenue_per_hour(economics, economy.capacity_hashrate, network_difficulty);
    let cost = economics::cost_per_hour(economics, economy.capacity_watts);
    let verdict = *runtime
        .profitable
        .get_or_insert_with(|| economics::profitable(None, revenue, cost));
    let (reason, message) = if economy.capacity_watts == 0.0 && economy.capacity_hashrate == 0.0 {
        (
            "NoDevices",
            "no connected, schedulable device to judge by".to_string(),
        )
    } else {
        (
            if verdict {
                "RevenueCoversEnergy"
            } else {
                "EnergyCostsMore"
            },
            format!(
                "at {:.3} MH/s and {:.1} W: expected revenue {:.6}/h, energy cost {:.6}/h",
                economy.capacity_hashrate / 1e6,
                economy.capacity_watts,
                revenue,
                cost
            ),
        )
    };
    crate::conditions::set(
        &mut runtime.conditions,
        "Profitable",
        verdict,
        reason,
        &message,
        runtime.spec.metadata.generation,
        now_ms,
    );
}
