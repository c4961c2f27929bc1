//! Whether mining pays: the energy a MicroMiner's devices draw against the coins their
//! work is expected to earn, from `spec.economics`.
//!
//! Expected, not lucky: a share of difficulty `d` is `d / D` of a block at network
//! difficulty `D`, so revenue follows accepted work (or hash rate), not the blocks that
//! happened to be found. One block takes `D × 2^32` hashes on average.

use micromine_resources::microminer::Economics;

/// Hashes per unit of difficulty.
pub const HASHES_PER_DIFFICULTY: f64 = 4_294_967_296.0;

/// Revenue must beat cost by this factor to turn `Profitable` back on, so a MicroMiner
/// near break-even does not flap.
pub const RESUME_MARGIN: f64 = 1.05;

/// What one block pays, in the spec's currency.
pub fn block_value(economics: &Economics) -> f64 {
    economics.block_reward * economics.coin_price
}

/// Expected revenue per hour of hashing at `hashrate` (H/s) on a network of difficulty
/// `network_difficulty`.
pub fn revenue_per_hour(economics: &Economics, hashrate: f64, network_difficulty: f64) -> f64 {
    if !(network_difficulty > 0.0 && hashrate.is_finite()) {
        return 0.0;
    }
    hashrate.max(0.0) * 3600.0 / (network_difficulty * HASHES_PER_DIFFICULTY)
        * block_value(economics)
}

/// Expected revenue of work already accepted: `accepted_difficulty / D` blocks.
pub fn earned(economics: &Economics, accepted_difficulty: f64, network_difficulty: f64) -> f64 {
    if network_difficulty > 0.0 {
        accepted_difficulty.max(0.0) / network_difficulty * block_value(economics)
    } else {
        0.0
    }
}

/// Energy cost per hour of drawing `watts`.
pub fn cost_per_hour(economics: &Economics, watts: f64) -> f64 {
    watts.max(0.0) / 1000.0 * economics.energy_price_per_k_wh
}

/// Energy cost of `kwh`.
pub fn energy_cost(economics: &Economics, kwh: f64) -> f64 {
    kwh.max(0.0) * economics.energy_price_per_k_wh
}

/// What a device draws while mining: what it measures, else its class's figure, else the
/// default.
pub fn device_watts(economics: &Economics, reported: Option<f32>, class: Option<&str>) -> f64 {
    if let Some(watts) = reported {
        return f64::from(watts);
    }
    class
        .and_then(|c| economics.device_watts_by_class.get(c))
        .copied()
        .unwrap_or(economics.default_device_watts)
}

/// Whether mining pays, with hysteresis: it stops paying as soon as revenue falls below
/// cost, and pays again only once revenue beats cost by [`RESUME_MARGIN`].
pub fn profitable(previously: Option<bool>, revenue_per_hour: f64, cost_per_hour: f64) -> bool {
    match previously {
        Some(false) => revenue_per_hour > cost_per_hour * RESUME_MARGIN,
        _ => revenue_per_hour >= cost_per_hour,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn economics() -> Economics {
        Economics {
            energy_price_per_k_wh: 0.12,
            coin_price: 60_000.0,
            block_reward: 3.125,
            network_difficulty: None,
            default_device_watts: 5.0,
            device_watts_by_class: BTreeMap::from([("gateway".to_string(), 8.0)]),
            pause_when_unprofitable: false,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn revenue_follows_the_hand_computed_case() {
        // 1 TH/s on a network of difficulty 1e12: 3600 / 2^32 blocks an hour, each worth
        // 3.125 × 60,000 = 187,500 → 675,000,000 / 4,294,967,296 = 0.15716068446636200.
        let revenue = revenue_per_hour(&economics(), 1e12, 1e12);
        assert!(close(revenue, 0.157_160_684_466_362), "{revenue}");
        // Twice the hash rate, twice the revenue; twice the difficulty, half.
        assert!(close(
            revenue_per_hour(&economics(), 2e12, 1e12),
            2.0 * revenue
        ));
        assert!(close(
            revenue_per_hour(&economics(), 1e12, 2e12),
            revenue / 2.0
        ));
        assert_eq!(revenue_per_hour(&economics(), 1e12, 0.0), 0.0);
        assert_eq!(revenue_per_hour(&economics(), f64::NAN, 1.0), 0.0);
    }

    #[test]
    fn earned_revenue_is_accepted_work_in_blocks() {
        // Accepted difficulty equal to half the network difficulty is half a block.
        assert!(close(earned(&economics(), 5e11, 1e12), 93_750.0));
    }

    #[test]
    fn cost_is_power_times_price() {
        // 100 W for an hour is 0.1 kWh at 0.12.
        assert!(close(cost_per_hour(&economics(), 100.0), 0.012));
        assert!(close(energy_cost(&economics(), 2.5), 0.3));
    }

    #[test]
    fn a_device_draws_what_it_measures_else_its_class_else_the_default() {
        let e = economics();
        assert_eq!(device_watts(&e, Some(3.5), Some("gateway")), 3.5);
        assert_eq!(device_watts(&e, None, Some("gateway")), 8.0);
        assert_eq!(device_watts(&e, None, Some("phone")), 5.0);
        assert_eq!(device_watts(&e, None, None), 5.0);
    }

    #[test]
    fn profitability_has_a_margin_before_it_turns_back_on() {
        assert!(profitable(None, 1.0, 1.0));
        assert!(!profitable(None, 0.99, 1.0));
        assert!(!profitable(Some(false), 1.02, 1.0), "within the margin");
        assert!(profitable(Some(false), 1.06, 1.0));
        assert!(profitable(Some(true), 1.0, 1.0));
    }
}
