//! Does a device hash as fast as it says?
//!
//! A device reports the hash rate it achieved; its accepted shares prove a rate. Shares are
//! a Poisson process, so over a window the number of shares its claim predicts is λ and
//! the number it found is n. A device is flagged when `|n − λ| > 4√λ` with λ large enough
//! to judge (at least 30): noise alone does that about once in 15,000 windows, an agent
//! that claims ten times its real rate does it in minutes. Both directions are flagged: an
//! overclaim grabs larger ranges than it scans, an underclaim hides where shares come from.

/// Shares a claim must predict before it is judged.
const MIN_EXPECTED_SHARES: f64 = 30.0;
/// How many standard deviations of Poisson noise count as a lie.
const SIGMAS: f64 = 4.0;
/// A window restarts after this long, so old behaviour stops counting.
const WINDOW_MS: i64 = 600_000;
/// Hashes per difficulty-1 share.
const HASHES_PER_DIFFICULTY: f64 = 4_294_967_296.0;

/// Claimed and proven work of one device over the current window.
#[derive(Debug, Clone, Default)]
pub struct HonestyWindow {
    started_ms: Option<i64>,
    last_report_ms: Option<i64>,
    last_rate: f64,
    claimed_hashes: f64,
    proven_hashes: f64,
    verdict: Option<Mismatch>,
}

/// A disagreement between what a device claims and what it proves.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Hash rate it claimed on average (H/s).
    pub claimed: f64,
    /// Hash rate its accepted shares prove (H/s).
    pub proven: f64,
    /// Shares its claim predicts.
    pub expected_shares: f64,
    /// Shares it found.
    pub found_shares: f64,
}

impl Mismatch {
    /// For the condition's message.
    pub fn describe(&self) -> String {
        format!(
            "reports {:.0} H/s but its accepted shares prove {:.0} H/s ({:.1} shares found where {:.1} were expected)",
            self.claimed, self.proven, self.found_shares, self.expected_shares
        )
    }
}

impl HonestyWindow {
    /// A `CapacityReport`: the rate the device says it hashed at since its last report.
    pub fn report(&mut self, hashrate: f64, now_ms: i64) {
        self.started_ms.get_or_insert(now_ms);
        if let Some(last) = self.last_report_ms {
            // The previous rate held until now.
            self.claimed_hashes += self.last_rate * (now_ms - last).max(0) as f64 / 1000.0;
        }
        self.last_report_ms = Some(now_ms);
        self.last_rate = hashrate;
    }

    /// An accepted share of `difficulty`.
    pub fn share(&mut self, difficulty: f64) {
        self.proven_hashes += difficulty * HASHES_PER_DIFFICULTY;
    }

    /// The session ended: stop the clock until the next report.
    pub fn pause(&mut self) {
        self.last_report_ms = None;
    }

    /// The standing verdict, without judging again.
    pub fn mismatch(&self) -> Option<&Mismatch> {
        self.verdict.as_ref()
    }

    /// Judges the window at `difficulty` (the device's current share difficulty) and
    /// returns the standing verdict: `Some` while the device is flagged.
    pub fn judge(&mut self, difficulty: f64, now_ms: i64) -> Option<&Mismatch> {
        let Some(started) = self.started_ms else {
            return self.verdict.as_ref();
        };
        let per_share = difficulty * HASHES_PER_DIFFICULTY;
        if per_share > 0.0 {
            let expected = self.claimed_hashes / per_share;
            let found = self.proven_hashes / per_share;
            if expected >= MIN_EXPECTED_SHARES {
                let seconds = ((now_ms - started).max(1)) as f64 / 1000.0;
                self.verdict =
                    ((found - expected).abs() > SIGMAS * expected.sqrt()).then(|| Mismatch {
                        claimed: self.claimed_hashes / seconds,
                        proven: self.proven_hashes / seconds,
                        expected_shares: expected,
                        found_shares: found,
                    });
            }
        }
        if now_ms - started >= WINDOW_MS {
            // Keep the verdict; start counting afresh.
            self.started_ms = Some(now_ms);
            self.claimed_hashes = 0.0;
            self.proven_hashes = 0.0;
        }
        self.verdict.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that reports `claimed` H/s every 2 s while its shares prove `real` H/s,
    /// with share arrivals spread evenly (the expected count, not a random draw).
    fn run(claimed: f64, real: f64, seconds: i64) -> Option<Mismatch> {
        let difficulty = 1e6 * 60.0 / 12.0 / HASHES_PER_DIFFICULTY;
        let mut window = HonestyWindow::default();
        let mut owed = 0.0;
        let mut verdict = None;
        for t in (0..=seconds * 1000).step_by(2000) {
            window.report(claimed, t);
            owed += real * 2.0 / (difficulty * HASHES_PER_DIFFICULTY);
            while owed >= 1.0 {
                window.share(difficulty);
                owed -= 1.0;
            }
            verdict = window.judge(difficulty, t).cloned();
        }
        verdict
    }

    #[test]
    fn an_honest_device_is_not_flagged() {
        assert_eq!(run(1e6, 1e6, 540), None);
        // 10 % off is within what noise and duty cycling produce over minutes.
        assert_eq!(run(1.1e6, 1e6, 300), None);
    }

    #[test]
    fn an_overclaiming_device_is_flagged_with_figures() {
        let verdict = run(10e6, 1e6, 300).expect("flagged");
        assert!(
            verdict.expected_shares > 10.0 * verdict.found_shares * 0.9,
            "{verdict:?}"
        );
        assert!((verdict.claimed / 10e6 - 1.0).abs() < 0.05, "{verdict:?}");
        assert!(
            verdict.describe().contains("reports 10"),
            "{}",
            verdict.describe()
        );
    }

    #[test]
    fn too_little_evidence_is_no_verdict() {
        // A minute at 12 shares/min is 12 expected shares: not enough to judge.
        assert_eq!(run(10e6, 1e6, 8), None);
    }
}
