//! MicroMiner conditions (`Ready`, `Degraded`, `Paused`, `Profitable`, `PoolConnected`),
//! set where their causes change: at the end of each tick (device counts, energy), and
//! when the desired MicroMiners, a device's cordon or a pool connection change. Views only
//! read them, so a transition time says when the fleet changed, not when someone looked.

use super::energy::set_profitable;
use super::*;

impl FleetState {
    /// Brings every MicroMiner's conditions up to date with the fleet as it is at `now_ms`.
    pub(super) fn update_conditions(&mut self, now_ms: i64) {
        let mut counts: HashMap<String, DeviceCounts> = HashMap::new();
        for d in self.devices.values() {
            let Some(miner) = &d.miner else { continue };
            let counts = counts.entry(miner.clone()).or_default();
            counts.matched += 1;
            match self.device_state(d) {
                "offline" => counts.offline += 1,
                "mining" => counts.mining += 1,
                s if is_held_back(s) => counts.throttled += 1,
                _ => {}
            }
        }
        let economies = self.economies();
        for (key, runtime) in self.miners.iter_mut() {
            let network_difficulty = runtime.source.network_difficulty();
            match (runtime.spec.spec.economics.clone(), economies.get(key)) {
                (Some(economics), Some(economy)) => {
                    let difficulty = economics.network_difficulty.unwrap_or(network_difficulty);
                    set_profitable(runtime, &economics, economy, difficulty, now_ms);
                }
                _ => runtime.conditions.retain(|c| c.type_ != "Profitable"),
            }
            let generation = runtime.spec.metadata.generation;
            let paused = if runtime.spec.spec.paused {
                Some(crate::conditions::SPEC_PAUSED)
            } else if runtime.unprofitable_pause {
                Some((
                    "Unprofitable",
                    "spec.economics.pauseWhenUnprofitable: energy costs more than the work is expected to earn",
                ))
            } else {
                None
            };
            crate::conditions::update(
                &mut runtime.conditions,
                paused,
                &counts.get(key).cloned().unwrap_or_default(),
                generation,
                now_ms,
            );
            match runtime.source.stratum() {
                Some(work) => {
                    let connection = work.status();
                    let connected = connection.state == "Connected";
                    let message = match (&connection.url, &connection.last_error) {
                        (Some(url), _) if connected => format!("mining for {url}"),
                        (_, Some(error)) => error.clone(),
                        _ => "connecting to the pool".to_string(),
                    };
                    crate::conditions::set(
                        &mut runtime.conditions,
                        "PoolConnected",
                        connected,
                        if connected {
                            "Connected"
                        } else {
                            "PoolUnreachable"
                        },
                        &message,
                        generation,
                        now_ms,
                    );
                }
                None => runtime.conditions.retain(|c| c.type_ != "PoolConnected"),
            }
        }
    }
}
