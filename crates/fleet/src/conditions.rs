//! MicroMiner conditions (`Ready`, `Degraded`, `Paused`) with Kubernetes semantics:
//! keyed by type, and `lastTransitionTime` moves only when the status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use micromine_resources::microminer::DeviceCounts;

/// A Kubernetes `Time` from Unix milliseconds.
pub fn time_from_unix_ms(ms: i64) -> Option<Time> {
    jiff::Timestamp::from_millisecond(ms).ok().map(Time)
}

/// Why a MicroMiner hands out no work: (reason, message).
pub type Pause<'a> = (&'a str, &'a str);

/// The pause `spec.paused` asks for.
pub const SPEC_PAUSED: Pause<'static> = ("Paused", "spec.paused is true");

/// Recomputes the conditions into `current` (keeping transition times of unchanged
/// statuses) and returns a copy.
pub fn update(
    current: &mut Vec<Condition>,
    paused: Option<Pause<'_>>,
    devices: &DeviceCounts,
    generation: Option<i64>,
    now_ms: i64,
) -> Vec<Condition> {
    let (ready, ready_reason, ready_message) = if let Some((reason, message)) = paused {
        (false, reason, message.to_string())
    } else if devices.mining > 0 {
        (
            true,
            "Mining",
            format!(
                "{} of {} matched devices mining",
                devices.mining, devices.matched
            ),
        )
    } else if devices.matched == 0 {
        (
            false,
            "NoDevices",
            "no EdgeDevice matches the selector".to_string(),
        )
    } else {
        (
            false,
            "NoDeviceMining",
            format!("{} matched devices, none mining", devices.matched),
        )
    };
    let (degraded, degraded_reason, degraded_message) = if devices.offline > 0 {
        (
            true,
            "DevicesOffline",
            format!(
                "{} of {} matched devices offline",
                devices.offline, devices.matched
            ),
        )
    } else {
        (
            false,
            "AllDevicesConnected",
            "every matched device is connected".to_string(),
        )
    };
    let (paused_reason, paused_message) = paused.unwrap_or(("Running", "work is being handed out"));
    set(
        current,
        "Ready",
        ready,
        ready_reason,
        &ready_message,
        generation,
        now_ms,
    );
    set(
        current,
        "Degraded",
        degraded,
        degraded_reason,
        &degraded_message,
        generation,
        now_ms,
    );
    set(
        current,
        "Paused",
        paused.is_some(),
        paused_reason,
        paused_message,
        generation,
        now_ms,
    );
    current.clone()
}

/// Sets one condition, keyed by type; `lastTransitionTime` moves only when the status flips.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now_ms: i64,
) {
    let status = if status { "True" } else { "False" };
    let now = time_from_unix_ms(now_ms).unwrap_or(Time(jiff::Timestamp::UNIX_EPOCH));
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now;
            }
            existing.status = status.into();
            existing.reason = reason.into();
            existing.message = message.into();
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let mut conditions = Vec::new();
        let mining = DeviceCounts {
            matched: 2,
            mining: 2,
            throttled: 0,
            offline: 0,
        };
        update(&mut conditions, None, &mining, Some(1), 1_000);
        let ready = |c: &Vec<Condition>| {
            c.iter()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .expect("ready")
        };
        assert_eq!(ready(&conditions).status, "True");
        let t0 = ready(&conditions).last_transition_time;
        update(&mut conditions, None, &mining, Some(1), 5_000);
        assert_eq!(ready(&conditions).last_transition_time, t0);
        let none = DeviceCounts {
            matched: 2,
            mining: 0,
            throttled: 0,
            offline: 2,
        };
        update(&mut conditions, None, &none, Some(2), 9_000);
        assert_eq!(ready(&conditions).status, "False");
        assert_ne!(ready(&conditions).last_transition_time, t0);
        assert_eq!(conditions.len(), 3);
        let degraded = conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .expect("degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "DevicesOffline")
        );
    }
}
