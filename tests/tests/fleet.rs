//! A standalone controller and separate agent processes on loopback: reclaiming the work
//! of a killed agent, surviving a controller crash, and the engine an agent chooses.

use std::time::Duration;

use micromine_agent::engine::EngineKind;
use micromine_e2e::{ControllerProcess, create_token, start_agent, test_manifest, wait_until};
use serde_json::Value;

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_default()
}

#[test]
fn a_killed_agents_range_is_reclaimed_and_handed_out_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    // Short assignments so leases (3 x 2 s + 5 s) run out quickly; a hard network
    // difficulty so no block rolls the header under our feet.
    std::fs::write(manifests.join("e2e.yaml"), test_manifest("e2e", 2, 1e12)).expect("write");
    let data = dir.path().join("data");
    let controller = ControllerProcess::start(&manifests, &data);
    let token = create_token(&data, 2);

    let mut first = start_agent(
        &controller,
        &token,
        "victim",
        &dir.path().join("victim"),
        "site=e2e",
    );
    let held: Vec<Value> = wait_until(
        "victim to hold two leases with progress",
        Duration::from_secs(30),
        || {
            let leases: Vec<Value> = controller
                .assignments()
                .into_iter()
                .filter(|l| l["device"] == "victim")
                .collect();
            (leases.len() == 2
                && leases
                    .iter()
                    .any(|l| u64_of(&l["scanned_until"]) > u64_of(&l["start"])))
            .then_some(leases)
        },
    );
    first.kill();

    let mut second = start_agent(
        &controller,
        &token,
        "rescuer",
        &dir.path().join("rescuer"),
        "site=e2e",
    );
    // Until a victim lease expires, its range stays the victim's: no other device may get
    // any nonce of it. (Each lease by its own expiry: the victim may have finished its
    // first range and been given a later one before it was killed.)
    let overlapped = |lease: &Value| {
        held.iter()
            .find(|h| {
                h["header"] == lease["header"]
                    && u64_of(&lease["start"]) < u64_of(&h["end"])
                    && u64_of(&h["start"]) < u64_of(&lease["end"])
            })
            .cloned()
    };
    let reclaimed = wait_until(
        "the victim's unscanned nonces to be handed to the rescuer",
        Duration::from_secs(60),
        || {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            for lease in controller
                .assignments()
                .iter()
                .filter(|l| l["device"] == "rescuer")
            {
                if let Some(victims) = overlapped(lease) {
                    let expiry = victims["expires_at_ms"].as_i64().unwrap_or(0);
                    assert!(
                        now_ms >= expiry - 1000,
                        "victim's range reassigned before its lease ran out: {lease} overlaps {victims}"
                    );
                    return Some(lease.clone());
                }
            }
            None
        },
    );
    // What the rescuer got starts where the victim had got to (its reported progress),
    // not at the start of the victim's range: scanned work is not repeated.
    let victim = held
        .iter()
        .find(|h| {
            h["header"] == reclaimed["header"]
                && u64_of(&h["start"]) <= u64_of(&reclaimed["start"])
                && u64_of(&reclaimed["start"]) < u64_of(&h["end"])
        })
        .expect("reclaimed range lies in a victim range");
    assert!(
        u64_of(&reclaimed["start"]) >= u64_of(&victim["scanned_until"]),
        "{reclaimed} vs {victim}"
    );
    // The victim shows as offline, the rescuer mines and its shares are accepted.
    wait_until(
        "rescuer to have accepted shares",
        Duration::from_secs(30),
        || {
            let device = controller.device("rescuer")?;
            (u64_of(&device["shares"]["accepted"]) > 0).then_some(())
        },
    );
    assert_eq!(
        controller.device("victim").expect("victim known")["state"],
        "offline"
    );
    second.kill();
}

#[test]
fn the_ledger_survives_a_controller_crash_and_agents_come_back_by_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("e2e.yaml"), test_manifest("e2e", 5, 0.02)).expect("write");
    let data = dir.path().join("data");
    let mut controller = ControllerProcess::start(&manifests, &data);
    let token = create_token(&data, 1);
    let _agent = start_agent(
        &controller,
        &token,
        "survivor",
        &dir.path().join("survivor"),
        "site=e2e",
    );

    let before = wait_until("a few accepted shares", Duration::from_secs(60), || {
        let totals = controller.status()?["totals"].clone();
        (u64_of(&totals["accepted"]) >= 5).then_some(totals)
    });
    controller.process.kill();

    // Where the agent knows it.
    let controller = ControllerProcess::start_on(
        &manifests,
        &data,
        controller.grpc,
        controller.http,
        &[],
        &[],
    );
    let after = controller.status().expect("status")["totals"].clone();
    assert!(
        u64_of(&after["accepted"]) >= u64_of(&before["accepted"]),
        "acknowledged shares lost: before {before}, after {after}"
    );
    // The agent reconnects with backoff on its own, resumes, and keeps mining.
    wait_until(
        "the agent to reconnect and mine on",
        Duration::from_secs(60),
        || {
            let status = controller.status()?;
            let connected = status["sessions"].as_u64()? == 1;
            (connected && u64_of(&status["totals"]["accepted"]) > u64_of(&after["accepted"]))
                .then_some(())
        },
    );
    let device = controller.device("survivor").expect("survivor known");
    assert_eq!(device["state"], "mining");
    // Nothing it resubmitted after the crash was counted twice.
    let totals = controller.status().expect("status")["totals"].clone();
    assert_eq!(u64_of(&totals["rejected"]["duplicate"]), 0, "{totals}");
}

#[test]
fn manifest_edits_take_effect_and_broken_ones_disturb_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    let file = manifests.join("e2e.yaml");
    let good = test_manifest("e2e", 5, 1e12);
    std::fs::write(&file, &good).expect("write");
    let data = dir.path().join("data");
    let controller = ControllerProcess::start(&manifests, &data);
    let token = create_token(&data, 1);
    let _agent = start_agent(
        &controller,
        &token,
        "worker",
        &dir.path().join("worker"),
        "site=e2e",
    );
    wait_until("the worker to mine", Duration::from_secs(30), || {
        (controller.device("worker")?["state"] == "mining").then_some(())
    });

    // A broken edit: reported with file, field and problem; the miner keeps going.
    std::fs::write(
        &file,
        good.replace("sharesPerMinute: 60", "sharesPerMinute: -60"),
    )
    .expect("write");
    let error = wait_until(
        "the manifest error to be reported",
        Duration::from_secs(15),
        || {
            let status = controller.status()?;
            status["manifests"]["errors"]
                .as_array()?
                .first()?
                .as_str()
                .map(String::from)
        },
    );
    assert!(
        error.contains("e2e.yaml")
            && error.contains("spec.sharesPerMinute")
            && error.contains("-60"),
        "{error}"
    );
    assert!(
        controller.process.log().contains("manifest rejected"),
        "the log says it too"
    );
    let accepted_then = u64_of(&controller.device("worker").expect("worker")["shares"]["accepted"]);
    let miners = controller.status().expect("status")["miners"].clone();
    assert_eq!(
        miners[0]["key"], "default/e2e",
        "the last good version stays in effect"
    );
    wait_until(
        "shares to keep coming in under the last good version",
        Duration::from_secs(30),
        || {
            let accepted = u64_of(&controller.device("worker")?["shares"]["accepted"]);
            (accepted > accepted_then).then_some(())
        },
    );

    // A good edit: pausing takes the work away.
    std::fs::write(&file, format!("{good}  paused: true\n")).expect("write");
    wait_until("the worker to go idle", Duration::from_secs(15), || {
        let device = controller.device("worker")?;
        (device["state"] == "idle" && device["assignments"] == 0).then_some(())
    });
    let status = controller.status().expect("status");
    assert!(
        status["manifests"]["errors"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{status}"
    );
    let paused = status["miners"][0]["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Paused").cloned())
        .expect("Paused condition");
    assert_eq!(paused["status"], "True");

    // And unpausing brings it back.
    std::fs::write(&file, &good).expect("write");
    wait_until("the worker to mine again", Duration::from_secs(15), || {
        (controller.device("worker")?["state"] == "mining").then_some(())
    });
}

/// `run` times the engines at its first start and hashes with the fastest, keeps that
/// choice for its next start on the same CPU, measures again when the kept one is from
/// another CPU model, and the controller shows each choice on the device.
#[test]
fn an_agent_times_its_engines_once_per_cpu_and_the_device_shows_the_choice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("e2e.yaml"), test_manifest("e2e", 2, 1e12)).expect("write");
    let data = dir.path().join("data");
    let controller = ControllerProcess::start(&manifests, &data);
    let token = create_token(&data, 1);
    let state = dir.path().join("gw");
    let available: Vec<&str> = EngineKind::available().map(EngineKind::name).collect();
    // The device as the controller reports it once a session with `basis` is open.
    let session_with = |basis: &str| {
        wait_until(
            &format!("a session whose engine was {basis}"),
            Duration::from_secs(30),
            || {
                let device = controller.device("gw")?;
                (device["connected"] == true && device["hashEngineBasis"] == basis)
                    .then_some(device)
            },
        )
    };

    let mut agent = start_agent(&controller, &token, "gw", &state, "site=e2e");
    let device = session_with("calibrated");
    let rates = device["hashEngineRates"]
        .as_object()
        .expect("rates")
        .clone();
    let timed: Vec<&str> = available
        .iter()
        .copied()
        .filter(|name| rates.contains_key(*name))
        .collect();
    assert_eq!(
        timed, available,
        "every engine this CPU runs is timed: {device}"
    );
    let fastest = rates
        .iter()
        .max_by(|a, b| {
            a.1.as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b.1.as_f64().unwrap_or(0.0))
        })
        .map(|(name, _)| name.clone())
        .expect("a rate");
    assert_eq!(device["hashEngine"], fastest.as_str(), "{device}");
    let cache = state.join("engine-calibration.json");
    let kept: Value =
        serde_json::from_slice(&std::fs::read(&cache).expect("the choice is kept")).expect("json");
    assert_eq!(kept["engine"], fastest.as_str());
    agent.kill();

    // Same CPU, same agent: the kept choice, not a new measurement.
    let mut agent = start_agent(&controller, &token, "gw", &state, "site=e2e");
    let device = session_with("cached");
    assert_eq!(device["hashEngine"], fastest.as_str());
    assert_eq!(device["hashEngineRates"].as_object(), Some(&rates));
    agent.kill();

    // A choice made on another CPU model (the disk moved to another board) is not trusted.
    let mut elsewhere = kept.clone();
    elsewhere["cpu_model"] = "Some Other CPU".into();
    elsewhere["engine"] = "portable".into();
    elsewhere["rates"] = serde_json::json!({"portable": 1e12});
    std::fs::write(&cache, elsewhere.to_string()).expect("write");
    let _agent = start_agent(&controller, &token, "gw", &state, "site=e2e");
    let device = session_with("calibrated");
    assert_ne!(device["hashEngineRates"]["portable"], 1e12, "{device}");
    let kept: Value = serde_json::from_slice(&std::fs::read(&cache).expect("kept")).expect("json");
    assert_ne!(kept["cpu_model"], "Some Other CPU", "{kept}");
}
