//! The device's own limits, enforced by the agent: whatever the controller says and
//! whether or not it is reachable, hashing never runs outside its windows, on a battery
//! below its floor, against the device's own work, or hotter than its limit.
//!
//! Each limit has hysteresis so a reading hovering at a threshold does not flap: hashing
//! throttles above `maxTemperatureC` and stops 10 °C above it, and resumes only 3 °C
//! below; a battery stop lasts until 5 points above the floor; a host-load stop until 10
//! points below the ceiling. The decision is a pure function of the limits, the readings
//! and the time, so it is tested without hardware.

use jiff::Timestamp;
use micromine_proto::pb;
use micromine_proto::window::{self, Window};

use crate::sensors::Readings;

/// How far above `maxTemperatureC` hashing stops altogether.
pub const THERMAL_STOP_ABOVE: f32 = 10.0;
/// How far below `maxTemperatureC` a hot device must cool to run freely again.
pub const THERMAL_RESUME_BELOW: f32 = 3.0;
/// Fraction of the duty cycle a throttled hot device keeps.
pub const THERMAL_THROTTLE: f64 = 0.5;
/// Points above `minBatteryPercent` a battery must recover to.
pub const BATTERY_RESUME_ABOVE: f32 = 5.0;
/// Points below `maxHostCpuPercent` the host's own load must fall to.
pub const HOST_RESUME_BELOW: f32 = 10.0;

/// What the device may do now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Fraction of the hashing threads' time to hash; 0 stops hashing.
    pub duty_cycle: f64,
    /// Why it is held back (`throttled:thermal`, `throttled:host-load`, `paused:battery`,
    /// `outside-window`), or `None` when it is not.
    pub held_back: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Thermal {
    #[default]
    Normal,
    Throttled,
    Stopped,
}

/// The limits in force and the state their hysteresis needs.
#[derive(Debug, Clone, Default)]
pub struct Governor {
    limits: pb::Limits,
    windows: Vec<Window>,
    /// Some windows were given but none could be read: allow nothing rather than
    /// everything.
    windows_unreadable: bool,
    thermal: Thermal,
    battery_stopped: bool,
    host_stopped: bool,
}

impl Governor {
    /// A governor enforcing `limits`.
    pub fn new(limits: pb::Limits) -> Governor {
        let mut governor = Governor::default();
        governor.set_limits(limits);
        governor
    }

    /// The limits in force.
    pub fn limits(&self) -> &pb::Limits {
        &self.limits
    }

    /// Replaces the limits; the hysteresis state carries over.
    pub fn set_limits(&mut self, limits: pb::Limits) {
        self.windows = limits
            .windows
            .iter()
            .filter_map(|w| match Window::parse(&w.days, &w.from, &w.to, &w.time_zone) {
                Ok(window) => Some(window),
                Err(e) => {
                    tracing::warn!(field = e.field, problem = %e.problem, "ignoring a mining window");
                    None
                }
            })
            .collect();
        self.windows_unreadable = !limits.windows.is_empty() && self.windows.is_empty();
        self.limits = limits;
    }

    /// Decides from the latest readings at `now`.
    pub fn decide(&mut self, readings: &Readings, now: Timestamp) -> Decision {
        let limits = &self.limits;
        let duty = if limits.duty_cycle.is_finite() && limits.duty_cycle > 0.0 {
            limits.duty_cycle.min(1.0)
        } else {
            1.0
        };

        // Battery: the floor, and running on battery when that is not allowed.
        self.battery_stopped = match (limits.min_battery_percent, readings.battery_percent) {
            (Some(floor), Some(level)) if self.battery_stopped => {
                level < floor + BATTERY_RESUME_ABOVE
            }
            (Some(floor), Some(level)) => level < floor,
            _ => false,
        };
        let unplugged = limits.pause_on_battery && readings.on_battery == Some(true);

        self.host_stopped = match (limits.max_host_cpu_percent, readings.host_cpu_percent) {
            (Some(ceiling), Some(load)) if self.host_stopped => load > ceiling - HOST_RESUME_BELOW,
            (Some(ceiling), Some(load)) => load > ceiling,
            // No fresh figure: keep the last decision rather than guess.
            (Some(_), None) => self.host_stopped,
            (None, _) => false,
        };

        self.thermal = match (limits.max_temperature_c, readings.temperature_c) {
            (Some(max), Some(t)) => {
                if t >= max + THERMAL_STOP_ABOVE {
                    Thermal::Stopped
                } else if t < max - THERMAL_RESUME_BELOW {
                    Thermal::Normal
                } else if t > max {
                    // Cooling from a stop passes through throttled only once below max.
                    self.thermal.max(Thermal::Throttled)
                } else {
                    // Between resume and max: stay as it was (hysteresis).
                    self.thermal
                }
            }
            _ => Thermal::Normal,
        };

        let stop = |reason| Decision {
            duty_cycle: 0.0,
            held_back: Some(reason),
        };
        if self.windows_unreadable || !window::allowed(&self.windows, now) {
            return stop("outside-window");
        }
        if self.battery_stopped || unplugged {
            return stop("paused:battery");
        }
        if self.host_stopped {
            return stop("throttled:host-load");
        }
        match self.thermal {
            Thermal::Stopped => stop("throttled:thermal"),
            Thermal::Throttled => Decision {
                duty_cycle: duty * THERMAL_THROTTLE,
                held_back: Some("throttled:thermal"),
            },
            Thermal::Normal => Decision {
                duty_cycle: duty,
                held_back: None,
            },
        }
    }
}

impl PartialOrd for Thermal {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Thermal {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let rank = |t: &Thermal| match t {
            Thermal::Normal => 0,
            Thermal::Throttled => 1,
            Thermal::Stopped => 2,
        };
        rank(self).cmp(&rank(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        // A Wednesday, 12:00 UTC.
        "2026-11-25T12:00:00Z".parse().expect("timestamp")
    }

    fn limits() -> pb::Limits {
        pb::Limits {
            duty_cycle: 0.8,
            ..Default::default()
        }
    }

    fn hot(t: f32) -> Readings {
        Readings {
            temperature_c: Some(t),
            ..Default::default()
        }
    }

    #[test]
    fn without_limits_or_readings_the_duty_cycle_is_what_was_asked() {
        let mut g = Governor::new(limits());
        let d = g.decide(&Readings::default(), now());
        assert_eq!((d.duty_cycle, d.held_back), (0.8, None));
        // Limits but no sensors: a gateway without a battery is not held back.
        let mut g = Governor::new(pb::Limits {
            max_temperature_c: Some(70.0),
            min_battery_percent: Some(30.0),
            ..limits()
        });
        assert_eq!(g.decide(&Readings::default(), now()).held_back, None);
    }

    #[test]
    fn heat_throttles_then_stops_and_cools_back_with_hysteresis() {
        let mut g = Governor::new(pb::Limits {
            max_temperature_c: Some(70.0),
            ..limits()
        });
        let mut step = |t: f32| {
            let d = g.decide(&hot(t), now());
            (d.duty_cycle, d.held_back)
        };
        assert_eq!(step(69.0), (0.8, None));
        assert_eq!(step(71.0), (0.4, Some("throttled:thermal")));
        assert_eq!(
            step(69.0),
            (0.4, Some("throttled:thermal")),
            "no flap at 69"
        );
        assert_eq!(
            step(80.0),
            (0.0, Some("throttled:thermal")),
            "stopped at +10"
        );
        assert_eq!(
            step(75.0),
            (0.0, Some("throttled:thermal")),
            "stays stopped while hot"
        );
        assert_eq!(
            step(69.0),
            (0.0, Some("throttled:thermal")),
            "and until 3 below"
        );
        assert_eq!(step(66.9), (0.8, None));
        assert_eq!(step(70.0), (0.8, None), "at the limit is not above it");
    }

    #[test]
    fn a_low_battery_stops_until_it_recovers_and_unplugged_can_pause() {
        let mut g = Governor::new(pb::Limits {
            min_battery_percent: Some(30.0),
            ..limits()
        });
        let mut at = |level: f32, on_battery: bool| {
            let readings = Readings {
                battery_percent: Some(level),
                on_battery: Some(on_battery),
                ..Default::default()
            };
            g.decide(&readings, now()).held_back
        };
        assert_eq!(at(31.0, true), None);
        assert_eq!(at(29.0, true), Some("paused:battery"));
        assert_eq!(
            at(33.0, false),
            Some("paused:battery"),
            "charging, not yet 35"
        );
        assert_eq!(at(35.0, false), None);

        let mut g = Governor::new(pb::Limits {
            pause_on_battery: true,
            ..limits()
        });
        let unplugged = Readings {
            on_battery: Some(true),
            battery_percent: Some(100.0),
            ..Default::default()
        };
        assert_eq!(
            g.decide(&unplugged, now()).held_back,
            Some("paused:battery")
        );
        let plugged = Readings {
            on_battery: Some(false),
            ..unplugged
        };
        assert_eq!(g.decide(&plugged, now()).held_back, None);
    }

    #[test]
    fn the_devices_own_work_comes_first() {
        let mut g = Governor::new(pb::Limits {
            max_host_cpu_percent: Some(60.0),
            ..limits()
        });
        let mut load = |percent: Option<f32>| {
            let readings = Readings {
                host_cpu_percent: percent,
                ..Default::default()
            };
            g.decide(&readings, now()).held_back
        };
        assert_eq!(load(Some(55.0)), None);
        assert_eq!(load(Some(61.0)), Some("throttled:host-load"));
        assert_eq!(load(None), Some("throttled:host-load"), "no figure: keep");
        assert_eq!(load(Some(55.0)), Some("throttled:host-load"), "not yet 50");
        assert_eq!(load(Some(49.0)), None);
    }

    #[test]
    fn outside_its_windows_a_device_idles_and_unreadable_windows_allow_nothing() {
        let window = |from: &str, to: &str| pb::MiningWindow {
            days: vec!["Mon-Sun".into()],
            from: from.into(),
            to: to.into(),
            time_zone: "UTC".into(),
        };
        let mut g = Governor::new(pb::Limits {
            windows: vec![window("22:00", "06:00")],
            ..limits()
        });
        assert_eq!(
            g.decide(&Readings::default(), now()).held_back,
            Some("outside-window")
        );
        let night: Timestamp = "2026-11-25T23:00:00Z".parse().expect("timestamp");
        assert_eq!(g.decide(&Readings::default(), night).held_back, None);

        g.set_limits(pb::Limits {
            windows: vec![window("25:00", "06:00")],
            ..limits()
        });
        assert_eq!(
            g.decide(&Readings::default(), night).duty_cycle,
            0.0,
            "a window that cannot be read is not an open door"
        );
    }

    #[test]
    fn the_strongest_reason_is_reported() {
        let mut g = Governor::new(pb::Limits {
            max_temperature_c: Some(70.0),
            min_battery_percent: Some(30.0),
            ..limits()
        });
        let both = Readings {
            temperature_c: Some(72.0),
            battery_percent: Some(10.0),
            ..Default::default()
        };
        let d = g.decide(&both, now());
        assert_eq!((d.duty_cycle, d.held_back), (0.0, Some("paused:battery")));
    }
}
