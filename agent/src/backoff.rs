//! Jittered exponential backoff for reconnects.
//!
//! "Full jitter" (a uniformly random delay between zero and the exponential cap) spreads a
//! fleet's reconnects over the whole window, so a controller restart under thousands of
//! agents is met by a trickle rather than a wave.

use std::time::Duration;

use rand::RngExt;

/// Reconnect delays: `random(0, min(max, base * 2^attempt))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// The first window after [`Backoff::reset_within`]; `base` otherwise.
    first: Duration,
}

impl Backoff {
    /// A backoff starting around `base` and never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
            first: base,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let jittered = rand::rng().random_range(0.0..=1.0) * cap.as_secs_f64();
        // Never zero: an immediate retry of a refused connection is pointless.
        Duration::from_secs_f64(jittered).max(self.base / 4)
    }

    /// The upper bound the next delay is drawn from.
    pub fn cap(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.first.saturating_mul(factor).min(self.max)
    }

    /// Back to the first delay, after a session that worked.
    pub fn reset(&mut self) {
        self.reset_within(self.base);
    }

    /// Back to the start, with the first delay drawn from `window` (at least the base,
    /// at most the longest delay). After losing a session that worked, an agent spreads
    /// its first attempt over the window the controller set for its reports, which grows
    /// with the fleet: when a controller with 10,000 sessions restarts, they come back
    /// over ten seconds instead of all in the first half second.
    pub fn reset_within(&mut self, window: Duration) {
        self.attempt = 0;
        self.first = window.clamp(self.base, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut caps = Vec::new();
        for _ in 0..12 {
            caps.push(backoff.cap());
            let delay = backoff.next_delay();
            assert!(delay <= *caps.last().expect("pushed"));
            assert!(delay >= Duration::from_millis(25));
        }
        assert_eq!(caps[0], Duration::from_millis(100));
        assert_eq!(caps[3], Duration::from_millis(800));
        assert_eq!(caps[11], Duration::from_secs(30));
        backoff.reset();
        assert_eq!(backoff.cap(), Duration::from_millis(100));
    }

    #[test]
    fn a_reset_within_a_window_spreads_the_first_attempt_over_it() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        backoff.reset_within(Duration::from_secs(10));
        assert_eq!(backoff.cap(), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..200)
            .map(|_| {
                let mut b = backoff.clone();
                b.next_delay()
            })
            .collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        // Uniform over 10 s: 200 draws all below 5 s would be a broken spread.
        assert!(delays.iter().any(|d| *d > Duration::from_secs(5)));
        backoff.next_delay();
        assert_eq!(backoff.cap(), Duration::from_secs(20), "then doubling");
        backoff.next_delay();
        assert_eq!(backoff.cap(), Duration::from_secs(30), "up to the longest");
        // Windows outside the bounds are clamped to them.
        backoff.reset_within(Duration::from_secs(3600));
        assert_eq!(backoff.cap(), Duration::from_secs(30));
        backoff.reset_within(Duration::ZERO);
        assert_eq!(backoff.cap(), Duration::from_millis(100));
        backoff.reset_within(Duration::from_secs(5));
        backoff.reset();
        assert_eq!(backoff.cap(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_not_synchronised() {
        // 1000 agents at the same attempt must not pick the same moment: check the spread
        // over ten buckets of the window.
        let mut buckets = [0u32; 10];
        for _ in 0..1000 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            for _ in 0..5 {
                backoff.next_delay();
            }
            let cap = backoff.cap().as_secs_f64();
            let delay = backoff.next_delay().as_secs_f64();
            let bucket = ((delay / cap) * 10.0).min(9.0) as usize;
            buckets[bucket] += 1;
        }
        for (i, count) in buckets.iter().enumerate() {
            // Uniform would be 100 each; 50..150 is far outside chance for a broken jitter.
            assert!((50..150).contains(count), "bucket {i}: {buckets:?}");
        }
    }
}
