//! Variable share difficulty per device, aiming at `sharesPerMinute`.
//!
//! A device's hash rate is only known through its accepted shares (what it claims is not
//! trusted). Shares arrive as a Poisson process, so a naive "observed rate / wanted rate"
//! correction chases noise. The rule here:
//!
//! - the estimate is difficulty-weighted (`Σ difficulty · 2^32 / elapsed`), so shares
//!   found under an older target still count correctly after a retarget;
//! - a retarget happens only when the weighted share count is outside three standard
//!   deviations of what the current difficulty predicts (`|n − λ| > 3√λ + 1`), or, after a
//!   long window, more than 25 % off;
//! - one step changes difficulty by at most a factor of 4, as ckpool bounds its
//!   retargets, and the Stratum V2 reference applies its corrections in bounded steps too;
//! - difficulty never goes below the easiest 256-bit target or above the network's.

use micromine_proto::work::Target;

/// Shortest window that can trigger a retarget.
const MIN_WINDOW_MS: i64 = 10_000;
/// After this long, retarget on a smaller (25 %) deviation.
const LONG_WINDOW_MS: i64 = 300_000;
/// Largest factor of one retarget step.
const MAX_STEP: f64 = 4.0;
/// Hashes per difficulty-1 share.
const HASHES_PER_DIFFICULTY: f64 = 4_294_967_296.0;

/// The share difficulty that makes a device of `hashrate` H/s find `shares_per_minute`.
pub fn difficulty_for(hashrate: f64, shares_per_minute: f64) -> f64 {
    hashrate * 60.0 / shares_per_minute / HASHES_PER_DIFFICULTY
}

/// Easiest possible share difficulty (the all-ones target).
pub fn min_difficulty() -> f64 {
    Target::MAX.difficulty()
}

/// The vardiff state of one device.
#[derive(Debug, Clone)]
pub struct Vardiff {
    shares_per_minute: f64,
    difficulty: f64,
    max_difficulty: f64,
    window_start_ms: i64,
    /// Σ difficulty of shares accepted in the window.
    window_difficulty: f64,
}

impl Vardiff {
    /// Starts from the device's nominal hash rate (the only information there is before
    /// its first share), capped at `max_difficulty` (the network's).
    pub fn new(
        nominal_hashrate: f64,
        shares_per_minute: f64,
        max_difficulty: f64,
        now_ms: i64,
    ) -> Vardiff {
        let mut vardiff = Vardiff {
            shares_per_minute,
            difficulty: 0.0,
            max_difficulty,
            window_start_ms: now_ms,
            window_difficulty: 0.0,
        };
        vardiff.difficulty =
            vardiff.clamp(difficulty_for(nominal_hashrate.max(1.0), shares_per_minute));
        vardiff
    }

    /// The current share difficulty.
    pub fn difficulty(&self) -> f64 {
        self.difficulty
    }

    /// The current share target.
    pub fn target(&self) -> Target {
        Target::from_difficulty(self.difficulty).unwrap_or(Target::MAX)
    }

    /// Changes the goal (a MicroMiner edit); the window restarts.
    pub fn set_goal(&mut self, shares_per_minute: f64, max_difficulty: f64, now_ms: i64) {
        if shares_per_minute != self.shares_per_minute || max_difficulty != self.max_difficulty {
            self.difficulty *= self.shares_per_minute / shares_per_minute;
            self.shares_per_minute = shares_per_minute;
            self.max_difficulty = max_difficulty;
            self.difficulty = self.clamp(self.difficulty);
            self.restart(now_ms);
        }
    }

    /// Counts an accepted share of the given difficulty.
    pub fn record_share(&mut self, difficulty: f64) {
        self.window_difficulty += difficulty;
    }

    /// Hash rate proven by the window's shares so far (H/s).
    pub fn estimated_hashrate(&self, now_ms: i64) -> f64 {
        let elapsed = (now_ms - self.window_start_ms).max(1) as f64 / 1000.0;
        self.window_difficulty * HASHES_PER_DIFFICULTY / elapsed
    }

    /// Decides whether the difficulty should change; returns the new one if it did.
    pub fn retarget(&mut self, now_ms: i64) -> Option<f64> {
        let elapsed_ms = now_ms - self.window_start_ms;
        if elapsed_ms < MIN_WINDOW_MS {
            return None;
        }
        let expected = self.shares_per_minute * elapsed_ms as f64 / 60_000.0;
        let observed = self.window_difficulty / self.difficulty;
        let noise = 3.0 * expected.sqrt() + 1.0;
        let far_off = (observed - expected).abs() > noise;
        let long_and_off = elapsed_ms >= LONG_WINDOW_MS && {
            let ratio = observed / expected;
            !(0.8..=1.25).contains(&ratio)
        };
        if !(far_off || long_and_off) {
            if elapsed_ms >= 2 * LONG_WINDOW_MS {
                // On target: start a fresh window so old history does not dominate.
                self.restart(now_ms);
            }
            return None;
        }
        // No shares at all only says "much slower than thought": step down by the bound.
        let factor = (observed.max(0.5) / expected).clamp(1.0 / MAX_STEP, MAX_STEP);
        let new = self.clamp(self.difficulty * factor);
        self.restart(now_ms);
        if new == self.difficulty {
            return None;
        }
        self.difficulty = new;
        Some(new)
    }

    fn restart(&mut self, now_ms: i64) {
        self.window_start_ms = now_ms;
        self.window_difficulty = 0.0;
    }

    fn clamp(&self, difficulty: f64) -> f64 {
        let max = self.max_difficulty.max(min_difficulty());
        if difficulty.is_finite() {
            difficulty.clamp(min_difficulty(), max)
        } else {
            max
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Simulates a device of `true_rate` H/s whose shares arrive as a Poisson process.
    fn simulate(vardiff: &mut Vardiff, true_rate: f64, seconds: i64, rng: &mut StdRng) -> Vec<f64> {
        let mut retargets = Vec::new();
        let mut now = 0i64;
        while now < seconds * 1000 {
            now += 1000;
            // Probability of a share in one second at the current difficulty.
            let lambda = true_rate / (vardiff.difficulty() * HASHES_PER_DIFFICULTY);
            let mut shares = 0;
            // Poisson sample by inversion (lambda is small per second).
            let mut p = (-lambda).exp();
            let mut cumulative = p;
            let u: f64 = (rng.next_u64() as f64) / (u64::MAX as f64);
            while u > cumulative && shares < 1000 {
                shares += 1;
                p *= lambda / shares as f64;
                cumulative += p;
            }
            for _ in 0..shares {
                vardiff.record_share(vardiff.difficulty());
            }
            if let Some(d) = vardiff.retarget(now) {
                retargets.push(d);
            }
        }
        retargets
    }

    #[test]
    fn initial_difficulty_follows_nominal_hashrate() {
        // 50 kH/s at 12 shares/min: 250 kH per share, difficulty ~5.8e-5.
        let v = Vardiff::new(50_000.0, 12.0, 1e9, 0);
        assert!((v.difficulty() - 250_000.0 / HASHES_PER_DIFFICULTY).abs() < 1e-12);
        // Capped at the network's difficulty.
        assert_eq!(Vardiff::new(1e12, 12.0, 0.5, 0).difficulty(), 0.5);
    }

    #[test]
    fn converges_on_a_device_that_lied_about_its_rate() {
        let mut rng = StdRng::seed_from_u64(7);
        // Claims 10 MH/s, really does 1 MH/s.
        let mut v = Vardiff::new(10e6, 12.0, 1e9, 0);
        simulate(&mut v, 1e6, 600, &mut rng);
        let wanted = difficulty_for(1e6, 12.0);
        assert!(
            (v.difficulty() / wanted - 1.0).abs() < 0.35,
            "{} vs {}",
            v.difficulty(),
            wanted
        );
    }

    #[test]
    fn holds_steady_on_an_honest_device() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut v = Vardiff::new(2e6, 12.0, 1e9, 0);
        let retargets = simulate(&mut v, 2e6, 1800, &mut rng);
        // Noise alone should almost never move a correct difficulty.
        assert!(retargets.len() <= 2, "{retargets:?}");
    }

    #[test]
    fn steps_are_bounded_and_silence_steps_down() {
        let mut v = Vardiff::new(1e6, 12.0, 1e9, 0);
        let d0 = v.difficulty();
        assert_eq!(v.retarget(5_000), None, "too early");
        let d1 = v
            .retarget(60_000)
            .expect("no shares in a minute is far off");
        assert!((d1 / d0 - 0.25).abs() < 1e-12);
        // A flood of shares steps up by at most 4x.
        for _ in 0..10_000 {
            v.record_share(d1);
        }
        let d2 = v.retarget(80_000).expect("far off");
        assert!((d2 / d1 - 4.0).abs() < 1e-12);
        assert!(v.estimated_hashrate(80_000) >= 0.0);
    }

    #[test]
    fn goal_changes_rescale() {
        let mut v = Vardiff::new(1e6, 12.0, 1e9, 0);
        let d = v.difficulty();
        v.set_goal(24.0, 1e9, 1_000);
        assert!((v.difficulty() - d / 2.0).abs() < 1e-15);
        assert!(v.target() > Target::from_difficulty(d).expect("valid"));
    }
}
