//! Metrics, recorded with OpenTelemetry instruments and exposed in the Prometheus text
//! format on the HTTP listener's `/metrics`.
//!
//! Counters whose truth is the ledger (shares by result and reason, blocks) are observed
//! from it at scrape time rather than counted as they happen: they survive restarts,
//! never drift from what `kubectl get mm` shows, and cost the share path nothing. What
//! only the moment knows (latencies, enrollment outcomes, reconciles) is recorded where
//! it happens.
//!
//! Names follow Prometheus conventions: `micromine_` prefix, units in the name, `_total`
//! on counters. Per-device series (hash rate, share difficulty) are off unless asked for
//! (`--per-device-metrics`): a 100,000-device fleet would otherwise make 200,000 series.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use micromine_fleet::status::{DeviceReadings, FleetView};

/// Scrapes within this long of each other share one fleet view: each observable
/// instrument asks for it, and a view walks every device.
const VIEW_REUSE: Duration = Duration::from_millis(500);

/// Latency buckets, seconds: from a fast in-memory check to a slow fsync.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What to expose.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsOptions {
    /// Series per device (hash rates, share difficulty).
    pub per_device: bool,
}

/// A rate as Prometheus should print it: `0`, not the `-0` a subtraction can leave.
fn rate(value: f64) -> f64 {
    value + 0.0
}

/// `miner` and `miner_namespace` labels for a MicroMiner key `namespace/name`.
/// `miner_namespace` rather than `namespace`: Prometheus Operator sets `namespace` to the
/// scraped pod's.
fn miner_labels(key: &str) -> [KeyValue; 2] {
    let namespace = key.split_once('/').map_or("", |(ns, _)| ns).to_string();
    [
        KeyValue::new("miner", key.to_string()),
        KeyValue::new("miner_namespace", namespace),
    ]
}

/// Why metrics could not be set up or encoded.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus exporter refused its configuration.
    #[error("setting up the Prometheus exporter: {0}")]
    Exporter(String),
    /// Encoding the text format failed.
    #[error("encoding metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// The controller's instruments and the registry `/metrics` reads.
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    share_verification: Histogram<f64>,
    ledger_commit: Histogram<f64>,
    assignment_latency: Histogram<f64>,
    enrollments: Counter<u64>,
    reconciles: Counter<u64>,
    agent_spans: Counter<u64>,
    reconcile_duration: Histogram<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// What the fleet's gauges read: the fleet, seen only through its views, so that the
/// metrics, which the fleet records into, need not know the fleet.
pub trait FleetViews: Send + Sync {
    /// The fleet as operators see it now.
    fn view(&self) -> FleetView;
}

/// A fleet view shared by the instruments of one scrape.
struct ViewCache {
    fleet: Weak<dyn FleetViews>,
    last: Mutex<Option<(Instant, Arc<FleetView>)>>,
}

impl ViewCache {
    fn get(&self) -> Option<Arc<FleetView>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, view)) = last.as_ref()
            && at.elapsed() < VIEW_REUSE
        {
            return Some(view.clone());
        }
        let view = Arc::new(self.fleet.upgrade()?.view());
        *last = Some((Instant::now(), view.clone()));
        Some(view)
    }
}

impl Metrics {
    /// Instruments observing `fleet` (weakly: metrics never keep a fleet alive).
    /// `ca_expiry_unix_s`: when each CA the fleet trusts expires.
    pub fn new<F: FleetViews + 'static>(
        fleet: &Arc<F>,
        options: MetricsOptions,
        ca_expiry_unix_s: Vec<i64>,
    ) -> Result<Arc<Metrics>, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError::Exporter(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("micromine-controller");
        let fleet: Weak<F> = Arc::downgrade(fleet);
        let views = Arc::new(ViewCache {
            fleet,
            last: Mutex::new(None),
        });
        observe_fleet(&meter, &views, options);
        observe_certificates(&meter, &views, ca_expiry_unix_s);
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        Ok(Arc::new(Metrics {
            share_verification: histogram(
                "micromine.share_verification.duration",
                "Re-verifying one batch of shares (hashing and checks), before the ledger",
            ),
            ledger_commit: histogram(
                "micromine.ledger_commit.duration",
                "Recording one batch of shares durably (group commit, fsync)",
            ),
            assignment_latency: histogram(
                "micromine.assignment.latency",
                "From a device asking for work (its Hello, a finished range) to the new assignment on its way (after the writes it depends on are durable)",
            ),
            reconcile_duration: histogram(
                "micromine.reconcile.duration",
                "One MicroMiner reconcile, API calls included",
            ),
            enrollments: meter
                .u64_counter("micromine.enrollments")
                .with_description("Enrollment attempts by outcome")
                .build(),
            reconciles: meter
                .u64_counter("micromine.reconciles")
                .with_description("MicroMiner reconciles by result")
                .build(),
            agent_spans: meter
                .u64_counter("micromine.agent_spans")
                .with_description(
                    "Spans agents sent in-band, by what became of them (relayed or why dropped)",
                )
                .build(),
            provider,
            registry,
        }))
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// One share batch: how long re-verification and the durable record took.
    pub fn share_batch(&self, verification: Duration, commit: Duration) {
        self.share_verification
            .record(verification.as_secs_f64(), &[]);
        self.ledger_commit.record(commit.as_secs_f64(), &[]);
    }

    /// The time from a device asking for work to its assignment leaving.
    pub fn assignment_latency(&self, latency: Duration) {
        self.assignment_latency.record(latency.as_secs_f64(), &[]);
    }

    /// One enrollment attempt: `enrolled`, `refused` (bad token), `name-taken`,
    /// `unavailable` (tokens could not be checked).
    pub fn enrollment(&self, outcome: &'static str) {
        self.enrollments
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }

    /// Spans an agent sent in-band and what became of them.
    pub fn agent_spans(&self, outcome: micromine_fleet::span_relay::Outcome, count: u64) {
        self.agent_spans
            .add(count, &[KeyValue::new("outcome", outcome.as_str())]);
    }

    /// One reconcile and how long it took.
    pub fn reconcile(&self, ok: bool, took: Duration) {
        let result = KeyValue::new("result", if ok { "ok" } else { "error" });
        self.reconciles.add(1, std::slice::from_ref(&result));
        self.reconcile_duration
            .record(took.as_secs_f64(), &[result]);
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        // Stops the callbacks; the fleet they observe may be going away too.
        let _ = self.provider.shutdown();
    }
}

/// Certificate expiry: the CAs (fixed for the process's life) and the soonest device
/// certificate among the devices the controller knows.
fn observe_certificates(meter: &Meter, views: &Arc<ViewCache>, ca_expiry_unix_s: Vec<i64>) {
    let v = views.clone();
    meter
        .i64_observable_gauge("micromine.certificate.expiry.timestamp_seconds")
        .with_description("When certificates expire, Unix seconds: each CA the fleet trusts (kind=ca) and the soonest-expiring certificate among connected devices (kind=device-soonest)")
        .with_callback(move |observer| {
            for expiry in &ca_expiry_unix_s {
                observer.observe(*expiry, &[KeyValue::new("kind", "ca")]);
            }
            let Some(view) = v.get() else { return };
            let soonest = view
                .devices
                .iter()
                // Connected devices only: one that has been gone past its certificate's end
                // would otherwise hide every other device from an expiry alert for good.
                .filter(|d| d.connected)
                .map(|d| d.certificate_not_after_unix_ms)
                .filter(|ms| *ms > 0)
                .min();
            if let Some(ms) = soonest {
                observer.observe(ms / 1000, &[KeyValue::new("kind", "device-soonest")]);
            }
        })
        .build();
}

/// One figure of a MicroMiner's economics status.
type EconomicsFigure = fn(&micromine_resources::microminer::EconomicsStatus) -> f64;

/// Observes `pick` of every MicroMiner that has economics, labelled by MicroMiner.
fn observe_economics(
    views: Arc<ViewCache>,
    pick: EconomicsFigure,
) -> impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<f64>) + Send + Sync + 'static {
    move |observer| {
        let Some(view) = views.get() else { return };
        for miner in &view.miners {
            if let Some(economics) = &miner.status.economics {
                observer.observe(pick(economics), &miner_labels(&miner.key));
            }
        }
    }
}

/// Per site: the hottest and the mean temperature of connected devices with a sensor.
fn site_temperatures(view: &FleetView) -> std::collections::BTreeMap<String, (f64, f64)> {
    let mut sites: std::collections::BTreeMap<String, (f64, f64, u32)> = Default::default();
    for device in view.devices.iter().filter(|d| d.connected) {
        if let Some(celsius) = device.readings.temperature_c {
            let site = device.labels.get("site").cloned().unwrap_or_default();
            let entry = sites.entry(site).or_insert((f64::MIN, 0.0, 0));
            entry.0 = entry.0.max(f64::from(celsius));
            entry.1 += f64::from(celsius);
            entry.2 += 1;
        }
    }
    sites
        .into_iter()
        .map(|(site, (max, sum, n))| (site, (max, sum / f64::from(n))))
        .collect()
}

/// A MicroMiner's counts by `result` (`accepted`, with reason "") and, for `rejected`,
/// by `reason`.
fn observe_by_result(
    observer: &dyn opentelemetry::metrics::AsyncInstrument<u64>,
    miner: &str,
    accepted: u64,
    rejected: impl IntoIterator<Item = (&'static str, u64)>,
) {
    let [m, ns] = miner_labels(miner);
    let series = std::iter::once(("accepted", "", accepted)).chain(
        rejected
            .into_iter()
            .map(|(reason, n)| ("rejected", reason, n)),
    );
    for (result, reason, count) in series {
        observer.observe(
            count,
            &[
                m.clone(),
                ns.clone(),
                KeyValue::new("result", result),
                KeyValue::new("reason", reason),
            ],
        );
    }
}

/// The series read from the fleet at scrape time.
fn observe_fleet(meter: &Meter, views: &Arc<ViewCache>, options: MetricsOptions) {
    let v = views.clone();
    meter
        .u64_observable_counter("micromine.shares")
        .with_description(
            "Shares by MicroMiner and result; rejected ones by reason (from the ledger)",
        )
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                let t = &miner.totals;
                let r = &t.rejected;
                observe_by_result(
                    observer,
                    &miner.key,
                    t.accepted,
                    [
                        ("low-difficulty", r.low_difficulty),
                        ("duplicate", r.duplicate),
                        ("stale", r.stale),
                        ("out-of-range", r.out_of_range),
                        ("unknown-assignment", r.unknown_assignment),
                    ],
                );
            }
        })
        .build();

    let v = views.clone();
    meter
        .u64_observable_counter("micromine.pool.shares")
        .with_description(
            "Shares submitted to the pool by MicroMiner and the pool's answer; rejected ones by reason, including timeout and session-lost (from the ledger)",
        )
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                let Some(pool) = &miner.status.pool else { continue };
                // Every reason always, so a rate over a first rejection is not lost.
                let rejected = micromine_stratum::message::RejectReason::ALL.map(|reason| {
                    let count = pool.rejected_by_reason.get(reason.as_str()).copied();
                    (reason.as_str(), count.unwrap_or(0))
                });
                observe_by_result(observer, &miner.key, pool.accepted, rejected);
            }
        })
        .build();

    let v = views.clone();
    meter
        .u64_observable_gauge("micromine.pool.connected")
        .with_description("1 while the MicroMiner's pool connection is up; `pool` is the pool in use or last tried, `failover` whether it is not the primary")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                let Some(pool) = &miner.status.pool else { continue };
                let [m, ns] = miner_labels(&miner.key);
                observer.observe(
                    u64::from(pool.state == "Connected"),
                    &[
                        m,
                        ns,
                        KeyValue::new("pool", pool.url.clone().unwrap_or_default()),
                        KeyValue::new("failover", pool.failover.to_string()),
                    ],
                );
            }
        })
        .build();

    let v = views.clone();
    meter
        .f64_observable_gauge("micromine.pool.difficulty")
        .with_description("The pool's share difficulty for the MicroMiner")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                if let Some(pool) = &miner.status.pool {
                    observer.observe(pool.difficulty, &miner_labels(&miner.key));
                }
            }
        })
        .build();

    let v = views.clone();
    meter
        .u64_observable_counter("micromine.blocks_found")
        .with_description("Shares that met the network target, by MicroMiner (from the ledger)")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                observer.observe(miner.totals.blocks, &miner_labels(&miner.key));
            }
        })
        .build();

    let v = views.clone();
    meter
        .f64_observable_gauge("micromine.hashrate.hashes_per_second")
        .with_description("Hash rate by MicroMiner: nominal (what working devices claim, times duty cycle) and effective (what accepted shares prove)")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                let [m, ns] = miner_labels(&miner.key);
                observer.observe(rate(miner.status.hashrate.nominal),
                    &[m.clone(), ns.clone(), KeyValue::new("kind", "nominal")],
                );
                observer.observe(rate(miner.status.hashrate.effective), &[m, ns, KeyValue::new("kind", "effective")]);
            }
        })
        .build();

    let v = views.clone();
    meter
        .u64_observable_gauge("micromine.devices")
        .with_description("Devices by state (mining, idle, throttled, paused, offline, unschedulable, revoked), the MicroMiner they match (\"\" for none) and their site label")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            let mut counts: std::collections::BTreeMap<(String, String, String), u64> = Default::default();
            for device in &view.devices {
                // `throttled:thermal` counts as throttled; the reason is the device's own.
                let state = device.state.split(':').next().unwrap_or_default().to_string();
                let site = device.labels.get("site").cloned().unwrap_or_default();
                *counts
                    .entry((device.miner.clone().unwrap_or_default(), state, site))
                    .or_default() += 1;
            }
            for ((miner, state, site), count) in counts {
                let [m, ns] = miner_labels(&miner);
                observer.observe(count, &[m, ns, KeyValue::new("state", state), KeyValue::new("site", site)]);
            }
        })
        .build();

    let v = views.clone();
    meter
        .f64_observable_gauge("micromine.site.hashrate.hashes_per_second")
        .with_description("Hash rate by the devices' site label: reported (by the agents) and effective (proven by accepted shares)")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            let mut sites: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
            for device in &view.devices {
                let site = device.labels.get("site").cloned().unwrap_or_default();
                let rates = sites.entry(site).or_default();
                rates.0 += device.reported_hashrate;
                rates.1 += device.effective_hashrate;
            }
            for (site, (reported, effective)) in sites {
                let s = KeyValue::new("site", site);
                observer.observe(rate(reported), &[s.clone(), KeyValue::new("kind", "reported")]);
                observer.observe(rate(effective), &[s, KeyValue::new("kind", "effective")]);
            }
        })
        .build();

    type SiteTemperature = fn(&(f64, f64)) -> f64;
    let site_series: [(&'static str, &'static str, SiteTemperature); 2] = [
        (
            "micromine.site.max_temperature_celsius",
            "The hottest connected device of each site, by its own thermal zones (devices without a sensor are left out)",
            |t| t.0,
        ),
        (
            "micromine.site.mean_temperature_celsius",
            "Mean temperature of each site's connected devices that have a sensor",
            |t| t.1,
        ),
    ];
    for (name, description, pick) in site_series {
        let v = views.clone();
        meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| {
                let Some(view) = v.get() else { return };
                for (site, temperatures) in site_temperatures(&view) {
                    observer.observe(pick(&temperatures), &[KeyValue::new("site", site)]);
                }
            })
            .build();
    }

    let v = views.clone();
    meter
        .f64_observable_gauge("micromine.power_watts")
        .with_description("Power drawn by each MicroMiner's devices: with spec.economics, the working devices' (measured, else the spec's figure); without, what connected devices that measure it report")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            let mut by_miner: std::collections::BTreeMap<&str, f64> = Default::default();
            for device in view.devices.iter().filter(|d| d.connected) {
                if let (Some(miner), Some(watts)) = (&device.miner, device.readings.power_watts) {
                    *by_miner.entry(miner.as_str()).or_default() += f64::from(watts);
                }
            }
            for miner in &view.miners {
                if let Some(economics) = &miner.status.economics {
                    by_miner.insert(&miner.key, economics.power_watts);
                }
            }
            for (miner, watts) in by_miner {
                observer.observe(watts, &miner_labels(miner));
            }
        })
        .build();

    // Counters accrue (energy drawn, expected revenue earned); gauges are rates now.
    let economics_series: [(&'static str, &'static str, EconomicsFigure, bool); 4] = [
        (
            "micromine.energy.joules",
            "Energy drawn by each MicroMiner's working devices (MicroMiners with spec.economics)",
            |e| e.energy_k_wh * 3.6e6,
            true,
        ),
        (
            "micromine.expected_revenue",
            "Expected revenue of each MicroMiner's accepted work, in the currency of spec.economics (accepted difficulty over network difficulty, times a block's value)",
            |e| e.revenue,
            true,
        ),
        (
            "micromine.energy_cost_per_hour",
            "Energy cost per hour of each MicroMiner's working devices, in the currency of spec.economics",
            |e| e.cost_per_hour,
            false,
        ),
        (
            "micromine.expected_revenue_per_hour",
            "Expected revenue per hour of each MicroMiner at its effective hash rate, in the currency of spec.economics",
            |e| e.revenue_per_hour,
            false,
        ),
    ];
    for (name, description, pick, counter) in economics_series {
        let callback = observe_economics(views.clone(), pick);
        if counter {
            meter
                .f64_observable_counter(name)
                .with_description(description)
                .with_callback(callback)
                .build();
        } else {
            meter
                .f64_observable_gauge(name)
                .with_description(description)
                .with_callback(callback)
                .build();
        }
    }

    let v = views.clone();
    meter
        .u64_observable_gauge("micromine.profitable")
        .with_description("1 while a MicroMiner's Profitable condition is True, 0 while False (MicroMiners with spec.economics)")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for miner in &view.miners {
                if let Some(c) = miner.status.conditions.iter().find(|c| c.type_ == "Profitable") {
                    observer.observe(u64::from(c.status == "True"), &miner_labels(&miner.key));
                }
            }
        })
        .build();

    let v = views.clone();
    meter
        .u64_observable_gauge("micromine.sessions.active")
        .with_description("Agent sessions open now")
        .with_callback(move |observer| {
            if let Some(view) = v.get() {
                observer.observe(view.sessions as u64, &[]);
            }
        })
        .build();

    let v = views.clone();
    meter
        .u64_observable_gauge("micromine.assignments.active")
        .with_description("Nonce-range leases held by devices now")
        .with_callback(move |observer| {
            if let Some(view) = v.get() {
                observer.observe(view.assignments as u64, &[]);
            }
        })
        .build();

    if !options.per_device {
        return;
    }
    let v = views.clone();
    meter
        .f64_observable_gauge("micromine.device.hashrate.hashes_per_second")
        .with_description("Hash rate per device: reported (by the agent) and effective (proven by accepted shares)")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for device in &view.devices {
                let d = KeyValue::new("device", device.name.clone());
                observer.observe(rate(device.reported_hashrate), &[d.clone(), KeyValue::new("kind", "reported")]);
                observer.observe(rate(device.effective_hashrate), &[d, KeyValue::new("kind", "effective")]);
            }
        })
        .build();
    type Pick = fn(&DeviceReadings) -> Option<f64>;
    let readings: [(&'static str, &'static str, Pick); 5] = [
        (
            "micromine.device.duty_cycle_ratio",
            "Fraction of the device's mining threads' time spent hashing lately, as the agent measured it",
            |r| r.duty_cycle.map(f64::from),
        ),
        (
            "micromine.device.temperature_celsius",
            "The device's hottest thermal zone",
            |r| r.temperature_c.map(f64::from),
        ),
        (
            "micromine.device.host_cpu_ratio",
            "CPU the device's own work uses (everything but the agent), 0 to 1",
            |r| r.host_cpu_percent.map(|p| f64::from(p) / 100.0),
        ),
        (
            "micromine.device.battery_ratio",
            "The device's emptiest system battery, 0 to 1",
            |r| r.battery_percent.map(|p| f64::from(p) / 100.0),
        ),
        (
            "micromine.device.power_watts",
            "Power the device reports drawing",
            |r| r.power_watts.map(f64::from),
        ),
    ];
    for (name, description, pick) in readings {
        let v = views.clone();
        meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| {
                let Some(view) = v.get() else { return };
                for device in view.devices.iter().filter(|d| d.connected) {
                    if let Some(value) = pick(&device.readings) {
                        observer.observe(value, &[KeyValue::new("device", device.name.clone())]);
                    }
                }
            })
            .build();
    }
    let v = views.clone();
    meter
        .f64_observable_gauge("micromine.device.share_difficulty")
        .with_description("Current vardiff share difficulty per device")
        .with_callback(move |observer| {
            let Some(view) = v.get() else { return };
            for device in &view.devices {
                observer.observe(
                    device.share_difficulty,
                    &[KeyValue::new("device", device.name.clone())],
                );
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::fleet::Fleet;
    use micromine_resources::microminer::MinerSet;
    use micromine_store::ledger::Ledger;
    use micromine_store::store::Store;

    async fn fleet_with_a_miner(dir: &std::path::Path) -> Arc<Fleet> {
        let store = Store::open(&dir.join("store.redb")).unwrap();
        let ledger = Ledger::open(store.clone()).unwrap();
        let fleet = Fleet::open(store, ledger).await.unwrap();
        let miners: MinerSet = micromine_resources::microminer::parse_str(
            "test",
            "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: night, namespace: plant}\nspec:\n  selector: {}\n  workSource: {builtin: {networkDifficulty: 1}}\n",
        )
        .unwrap()
        .into_iter()
        .map(|m| (m.key(), m))
        .collect();
        fleet.apply_miners(&miners);
        fleet
    }

    /// A 1 MH/s device's `Hello` with the label `site`.
    fn hello_from(site: &str) -> micromine_proto::pb::Hello {
        micromine_proto::pb::Hello {
            capacity: Some(micromine_proto::pb::Capacity {
                nominal_hashrate: 1e6,
                mining_threads: 1,
                ..Default::default()
            }),
            version: "test".into(),
            labels: [("site".to_string(), site.to_string())].into(),
            ..Default::default()
        }
    }

    /// The value of the series `name{labels}` exactly as written, if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    #[tokio::test]
    async fn the_exposition_has_the_fleet_series_with_prometheus_names() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = fleet_with_a_miner(dir.path()).await;
        let metrics = Metrics::new(&fleet, MetricsOptions::default(), vec![2_000_000_000]).unwrap();
        metrics.share_batch(Duration::from_micros(300), Duration::from_millis(4));
        metrics.enrollment("enrolled");
        metrics.reconcile(false, Duration::from_millis(20));
        let text = metrics.encode().unwrap();

        let m = r#"miner="plant/night",miner_namespace="plant""#;
        assert_eq!(
            sample(
                &text,
                &format!(r#"micromine_shares_total{{{m},reason="",result="accepted"}}"#)
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(r#"micromine_shares_total{{{m},reason="stale",result="rejected"}}"#)
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, &format!("micromine_blocks_found_total{{{m}}}")),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!(r#"micromine_hashrate_hashes_per_second{{kind="effective",{m}}}"#)
            ),
            Some(0.0)
        );
        assert_eq!(sample(&text, "micromine_sessions_active"), Some(0.0));
        assert_eq!(sample(&text, "micromine_assignments_active"), Some(0.0));
        assert_eq!(
            sample(&text, "micromine_share_verification_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"micromine_ledger_commit_duration_seconds_bucket{le="0.005"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"micromine_ledger_commit_duration_seconds_bucket{le="0.0025"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"micromine_enrollments_total{outcome="enrolled"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"micromine_reconciles_total{result="error"}"#),
            Some(1.0)
        );
        assert!(
            text.contains("# TYPE micromine_shares_total counter"),
            "{text}"
        );
        assert!(text.contains("# TYPE micromine_reconcile_duration_seconds histogram"));
        assert!(!text.contains("otel_scope"), "no scope labels: {text}");
        assert!(
            !text.contains("micromine_device_"),
            "per-device series are off by default"
        );
    }

    #[tokio::test]
    async fn a_devices_first_assignment_is_timed_from_its_hello() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = fleet_with_a_miner(dir.path()).await;
        let metrics = Metrics::new(&fleet, MetricsOptions::default(), Vec::new()).unwrap();
        fleet.set_metrics(metrics.clone());
        let (outbound, mut inbound) = tokio::sync::mpsc::channel(64);
        fleet.connect(
            "gw-1",
            &hello_from("plant-3"),
            outbound,
            tokio_util::sync::CancellationToken::new(),
        );
        // Welcome, then the assignments: by the time they are out, the latency is in.
        loop {
            let message = inbound.recv().await.unwrap().unwrap();
            if matches!(
                message.kind,
                Some(micromine_proto::pb::controller_message::Kind::Assignment(_))
            ) {
                break;
            }
        }
        let text = metrics.encode().unwrap();
        assert_eq!(
            sample(&text, "micromine_assignment_latency_seconds_count"),
            Some(1.0),
            "{text}"
        );
        // A report is no request for work: nothing more is timed.
        fleet.report("gw-1", &micromine_proto::pb::CapacityReport::default());
        fleet.flush().await.unwrap();
        let text = metrics.encode().unwrap();
        assert_eq!(
            sample(&text, "micromine_assignment_latency_seconds_count"),
            Some(1.0)
        );
    }

    #[tokio::test]
    async fn per_device_series_only_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = fleet_with_a_miner(dir.path()).await;
        let (outbound, _inbound) = tokio::sync::mpsc::channel(64);
        let hello = hello_from("plant-3");
        for (name, temperature, power, host_cpu) in [
            ("gw-1", 60.0, Some(5.0), Some(30.0)),
            ("gw-2", 70.0, Some(3.5), None),
            // A broken sensor (or a lying agent): no temperature, not 999 °C.
            ("gw-3", 999.0, None, None),
        ] {
            fleet.connect(
                name,
                &hello,
                outbound.clone(),
                tokio_util::sync::CancellationToken::new(),
            );
            fleet.report(
                name,
                &micromine_proto::pb::CapacityReport {
                    hashrate: 1e6,
                    state: "mining".into(),
                    temperature_c: Some(temperature),
                    power_watts: power,
                    host_cpu_percent: host_cpu,
                    duty_cycle: Some(0.25),
                    ..Default::default()
                },
            );
        }

        let fleetwide = Metrics::new(&fleet, MetricsOptions::default(), vec![2_000_000_000])
            .unwrap()
            .encode()
            .unwrap();
        assert!(!fleetwide.contains("micromine_device_"), "{fleetwide}");
        assert_eq!(
            sample(
                &fleetwide,
                r#"micromine_devices{miner="plant/night",miner_namespace="plant",site="plant-3",state="mining"}"#
            ),
            Some(3.0),
            "{fleetwide}"
        );
        assert_eq!(sample(&fleetwide, "micromine_sessions_active"), Some(3.0));
        assert_eq!(
            sample(
                &fleetwide,
                r#"micromine_site_max_temperature_celsius{site="plant-3"}"#
            ),
            Some(70.0)
        );
        assert_eq!(
            sample(
                &fleetwide,
                r#"micromine_site_mean_temperature_celsius{site="plant-3"}"#
            ),
            Some(65.0)
        );
        assert_eq!(
            sample(
                &fleetwide,
                r#"micromine_power_watts{miner="plant/night",miner_namespace="plant"}"#
            ),
            Some(8.5)
        );
        assert_eq!(
            sample(
                &fleetwide,
                r#"micromine_site_hashrate_hashes_per_second{kind="effective",site="plant-3"}"#
            ),
            Some(0.0)
        );

        let text = Metrics::new(&fleet, MetricsOptions { per_device: true }, Vec::new())
            .unwrap()
            .encode()
            .unwrap();
        assert_eq!(
            sample(
                &text,
                r#"micromine_device_hashrate_hashes_per_second{device="gw-1",kind="effective"}"#
            ),
            Some(0.0),
            "{text}"
        );
        assert!(
            sample(&text, r#"micromine_device_share_difficulty{device="gw-1"}"#)
                .is_some_and(|d| d > 0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"micromine_device_temperature_celsius{device="gw-2"}"#
            ),
            Some(70.0)
        );
        assert_eq!(
            sample(&text, r#"micromine_device_host_cpu_ratio{device="gw-1"}"#),
            Some(0.3),
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"micromine_device_power_watts{device="gw-1"}"#),
            Some(5.0)
        );
        assert_eq!(
            sample(&text, r#"micromine_device_duty_cycle_ratio{device="gw-1"}"#),
            Some(0.25)
        );
        assert!(
            !text.contains(r#"micromine_device_temperature_celsius{device="gw-3"}"#),
            "an implausible reading is no reading"
        );
        assert!(
            !text.contains("micromine_device_battery_ratio"),
            "no battery, no series"
        );
    }

    #[tokio::test]
    async fn metrics_do_not_keep_a_fleet_alive() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = fleet_with_a_miner(dir.path()).await;
        let weak = Arc::downgrade(&fleet);
        let metrics = Metrics::new(&fleet, MetricsOptions::default(), vec![2_000_000_000]).unwrap();
        drop(fleet);
        assert!(weak.upgrade().is_none());
        assert!(
            !metrics
                .encode()
                .unwrap()
                .contains("micromine_sessions_active ")
        );
    }
}
