//! API server writes in steady state, Kubernetes mode: 1,000 MicroMiners and 10,000
//! EdgeDevices, every device connected, mining and reporting every 2 s, hash rates and
//! share counts moving all the time, nothing else changing.
//!
//! The controller's real decision code runs on a simulated clock: the EdgeDevice
//! publisher (`DevicePublisher::plan`, every 5 s as in the controller) and the MicroMiner
//! status gate (`StatusGate::worth_writing`, each MicroMiner looked at every 30 s as its
//! requeue does), each with its refresh budget. Every write it decides on is sent through a
//! `kube::Client` to a mocked API server that counts requests. The first 5 simulated
//! minutes (every object created and given its first status) are warm-up; the figure is
//! the write rate over the following 10 minutes.
//!
//! Run: `cargo bench -p micromine-controller --bench api_writes`. Prints figures; asserts
//! nothing about time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use http::{Request, Response};
use kube::api::{Api, Patch, PatchParams};
use kube::client::Body;
use micromine_controller::kubernetes::FIELD_MANAGER;
use micromine_controller::kubernetes::devices::{
    self, DEVICE_REFRESH_WRITES_PER_MINUTE, DevicePublisher, MINER_REFRESH_WRITES_PER_MINUTE,
    PUBLISH_PERIOD, WriteBudget,
};
use micromine_controller::kubernetes::miners::{STATUS_PERIOD, StatusGate};
use micromine_fleet::status::{DeviceReadings, DeviceView};
use micromine_resources::edgedevice::EdgeDevice;
use micromine_resources::microminer::{Hashrate, MicroMiner, MicroMinerStatus, ShareCounts};
use micromine_store::ledger::Totals;

const MINERS: usize = 1_000;
const DEVICES: usize = 10_000;
const WARM_UP_MS: i64 = 5 * 60_000;
const MEASURED_MS: i64 = 10 * 60_000;
const START_MS: i64 = 1_800_000_000_000;
/// Agents report every 2 s; a step is the publisher's period.
const STEP_MS: i64 = PUBLISH_PERIOD.as_millis() as i64;

/// Requests the mocked API server answered, by whether they were writes.
#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    reads: AtomicU64,
}

/// A mocked API server: answers every request with `200` and the object it was sent
/// (with the metadata and spec kube needs to parse it back), counting.
fn mocked_api(counts: Arc<Counts>) -> kube::Client {
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let service = tower::service_fn(move |request: Request<Body>| {
        let counts = counts.clone();
        async move {
            if request.method() == http::Method::GET {
                counts.reads.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.writes.fetch_add(1, Ordering::Relaxed);
            }
            let device = request.uri().path().contains("/edgedevices/");
            let bytes = request.into_body().collect_bytes().await?;
            let mut object: serde_json::Value = serde_json::from_slice(&bytes)?;
            object["metadata"]["name"] = "x".into();
            object["spec"] = if device {
                serde_json::json!({})
            } else {
                serde_json::json!({"selector": {}, "workSource": {"builtin": {"networkDifficulty": 1.0}}})
            };
            let response = Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&object)?))?;
            Ok::<_, BoxError>(response)
        }
    });
    kube::Client::new(service, "default")
}

fn device(i: usize, now_ms: i64, step: u64) -> DeviceView {
    // A little movement every report, as real hash rates and share counts have.
    let jitter = ((i as u64 * 7919 + step * 104_729) % 1000) as f64;
    DeviceView {
        name: format!("gw-{i:05}"),
        labels: BTreeMap::from([("site".to_string(), format!("plant-{}", i % MINERS))]),
        connected: true,
        state: "mining".into(),
        miner: Some(format!("plants/plant-{}", i % MINERS)),
        unschedulable: false,
        cores: 4,
        memory_bytes: 2 << 30,
        mining_threads: 3,
        arch: "aarch64".into(),
        hash_engine: "armv8-sha2".into(),
        hash_engine_basis: "cached".into(),
        hash_engine_rates: Default::default(),
        agent_version: "0.1.0".into(),
        nominal_hashrate: 2.0e6,
        reported_hashrate: 1.9e6 + jitter,
        effective_hashrate: 1.8e6 + jitter * 10.0,
        share_difficulty: 1.0,
        assignments: 2,
        shares: Totals {
            accepted: step * 3 + i as u64 % 3,
            ..Totals::default()
        },
        protocol_errors: 0,
        last_seen_unix_ms: now_ms - 1_000,
        certificate_not_after_unix_ms: START_MS + 86_400_000,
        flags: Vec::new(),
        readings: DeviceReadings {
            temperature_c: Some(45.0 + (jitter / 100.0) as f32),
            ..DeviceReadings::default()
        },
        pool: Default::default(),
    }
}

fn miner_status(m: usize, step: u64) -> MicroMinerStatus {
    let mut status: MicroMinerStatus = serde_json::from_value(serde_json::json!({
        "observedGeneration": 1,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Mining", "message": "10 of 10 matched devices mining", "lastTransitionTime": "2026-11-26T00:00:00Z"},
            {"type": "Degraded", "status": "False", "reason": "AllMining", "message": "", "lastTransitionTime": "2026-11-26T00:00:00Z"},
            {"type": "Paused", "status": "False", "reason": "Running", "message": "", "lastTransitionTime": "2026-11-26T00:00:00Z"},
        ],
        "devices": {"matched": 10, "mining": 10, "throttled": 0, "offline": 0},
    }))
    .unwrap_or_default();
    status.hashrate = Hashrate {
        nominal: 1.8e7,
        effective: 1.7e7 + ((m as u64 * 31 + step * 17) % 5000) as f64,
    };
    status.shares = ShareCounts {
        accepted: step * 30 + m as u64,
        ..ShareCounts::default()
    };
    status
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let client = mocked_api(counts.clone());
    let devices_api: Api<EdgeDevice> = Api::all(client.clone());
    let miners_api: Api<MicroMiner> = Api::namespaced(client, "plants");

    let budget = |per_minute| Arc::new(Mutex::new(WriteBudget::new(per_minute, START_MS)));
    let mut publisher = DevicePublisher::new(budget(DEVICE_REFRESH_WRITES_PER_MINUTE));
    let gate = StatusGate::new(budget(MINER_REFRESH_WRITES_PER_MINUTE));
    // What each MicroMiner object carries: the status last written.
    let mut carried: Vec<Option<MicroMinerStatus>> = vec![None; MINERS];
    let requeue_ms = STATUS_PERIOD.as_millis() as i64;

    let started = Instant::now();
    let (mut device_writes, mut miner_writes) = (0u64, 0u64);
    let mut measured_from = None;
    let mut now = START_MS;
    let mut step = 0u64;
    while now < START_MS + WARM_UP_MS + MEASURED_MS {
        if measured_from.is_none() && now >= START_MS + WARM_UP_MS {
            measured_from = Some(counts.writes.load(Ordering::Relaxed));
            (device_writes, miner_writes) = (0, 0);
        }
        let views: Vec<DeviceView> = (0..DEVICES).map(|i| device(i, now, step)).collect();
        for write in publisher.plan(&views, now) {
            devices::send(&devices_api, &write)
                .await
                .context("sending an EdgeDevice write")?;
            device_writes += 1;
        }
        // Each MicroMiner's requeue comes round once per STATUS_PERIOD, spread out.
        for (m, carried) in carried.iter_mut().enumerate() {
            let phase = (m as i64 * requeue_ms / MINERS as i64) / STEP_MS * STEP_MS;
            if (now - START_MS) % requeue_ms != phase {
                continue;
            }
            let key = format!("plants/plant-{m}");
            let status = miner_status(m, step);
            if gate.worth_writing(&key, carried.as_ref(), &status, now) {
                let patch = serde_json::json!({"apiVersion": "micromine.dev/v1alpha1", "kind": "MicroMiner", "status": status});
                miners_api
                    .patch_status(
                        &format!("plant-{m}"),
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                    .context("sending a MicroMiner status")?;
                gate.wrote(&key, now);
                *carried = Some(status);
                miner_writes += 1;
            }
        }
        now += STEP_MS;
        step += 1;
    }
    let total = counts.writes.load(Ordering::Relaxed) - measured_from.unwrap_or(0);
    let minutes = MEASURED_MS as f64 / 60_000.0;
    println!(
        "steady state, {MINERS} MicroMiners and {DEVICES} EdgeDevices, {minutes:.0} simulated minutes after {} of warm-up:",
        WARM_UP_MS / 60_000
    );
    println!(
        "  {:.1} writes/min to the API server ({:.1} EdgeDevice, {:.1} MicroMiner); refresh budgets {DEVICE_REFRESH_WRITES_PER_MINUTE} + {MINER_REFRESH_WRITES_PER_MINUTE}/min, goal at most 200/min",
        total as f64 / minutes,
        device_writes as f64 / minutes,
        miner_writes as f64 / minutes,
    );
    println!(
        "  without the budget: {:.0} writes/min (every device once a minute, every MicroMiner every {} s)",
        DEVICES as f64 + MINERS as f64 * 60.0 / STATUS_PERIOD.as_secs_f64(),
        STATUS_PERIOD.as_secs()
    );
    println!(
        "  reads: {}; wall time {:.1} s for {} simulated minutes",
        counts.reads.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        (WARM_UP_MS + MEASURED_MS) / 60_000
    );
    Ok(())
}
