//! Periodic work that ends when the controller stops.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// A ticker that ends with `stop`. A tick that comes late delays the next one rather than
/// bunching up, so a slow round is not followed by a burst.
pub struct Every {
    interval: Interval,
    stop: CancellationToken,
}

impl Every {
    /// Ticks every `period`, the first at once.
    pub fn new(period: Duration, stop: CancellationToken) -> Every {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Every { interval, stop }
    }

    /// Ticks every `period`, the first one period from now.
    pub fn after(period: Duration, stop: CancellationToken) -> Every {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Every { interval, stop }
    }

    /// Waits for the next tick: `true`, or `false` once `stop` is cancelled (at once, also
    /// when a tick is due).
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_until_stopped() {
        let stop = CancellationToken::new();
        let mut every = Every::new(Duration::from_secs(5), stop.clone());
        let start = tokio::time::Instant::now();
        assert!(every.tick().await);
        assert_eq!(start.elapsed(), Duration::ZERO, "the first tick is at once");
        assert!(every.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        stop.cancel();
        assert!(!every.tick().await);

        let mut later = Every::after(Duration::from_secs(5), CancellationToken::new());
        let start = tokio::time::Instant::now();
        assert!(later.tick().await);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "the first tick after a period"
        );
    }
}
