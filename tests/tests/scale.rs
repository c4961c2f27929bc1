//! A simulated fleet (`micromine-agent simulate`) against a real controller: a SIGKILL
//! under load loses no acknowledged share and counts none twice; a lost controller's
//! devices come back spread over time, not in one wave; a link that slows down and then
//! drops costs no share; links that keep dropping (`--churn`) cost none either.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use micromine_e2e::proxy::{FlakyProxy, Link};
use micromine_e2e::{ControllerProcess, Process, bin, create_token, get_text, number, wait_until};
use serde_json::Value;

/// A MicroMiner for every simulated device: builtin work, a share every 5 s per device,
/// ranges of 5 s of hashing (at least 65,536 nonces, 30 s at 2 kH/s, so leases stay held
/// across the crash).
const MANIFEST: &str = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata:\n  name: sim\nspec:\n  selector:\n    matchLabels: {site: sim}\n  workSource:\n    builtin: {networkDifficulty: 1.0e9}\n  sharesPerMinute: 12\n  assignmentSeconds: 5\n";

struct Fleet {
    dir: tempfile::TempDir,
    controller: ControllerProcess,
    token: String,
}

impl Fleet {
    fn start(devices: u32) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        std::fs::write(manifests.join("sim.yaml"), MANIFEST).expect("write manifest");
        let data = dir.path().join("data");
        let controller = ControllerProcess::start(&manifests, &data);
        let token = create_token(&data, devices);
        Fleet {
            dir,
            controller,
            token,
        }
    }

    /// `micromine-agent simulate` with `devices` devices against `url`, tally in the
    /// fleet's directory.
    fn simulate(&self, url: &str, devices: u32, extra: &[&str]) -> Process {
        let state = self.dir.path().join("sim");
        let tally = self.tally_path();
        let devices = devices.to_string();
        let mut args = vec![
            "simulate",
            "--controller",
            url,
            "--token",
            &self.token,
            "--devices",
            &devices,
            "--labels",
            "site=sim",
            "--state-dir",
            state.to_str().expect("utf-8 path"),
            "--hashrate",
            "2000",
            "--ramp",
            "200",
            "--report-every",
            "1",
            "--json",
            "--tally",
            tally.to_str().expect("utf-8 path"),
            "--backoff-max",
            "5",
        ];
        args.extend_from_slice(extra);
        Process::start("simulator", &bin("micromine-agent"), &args)
    }

    fn tally_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tally.json")
    }

    fn restart_killed(&mut self) {
        let (grpc, http) = (self.controller.grpc, self.controller.http);
        self.controller = ControllerProcess::start_on(
            &self.dir.path().join("manifests"),
            &self.dir.path().join("data"),
            grpc,
            http,
            &[],
            &[],
        );
    }

    fn sessions(&self) -> Option<u64> {
        self.controller.status()?["sessions"].as_u64()
    }

    fn accepted(&self) -> Option<u64> {
        Some(number(&self.controller.status()?, "/totals/accepted"))
    }

    /// Waits until `devices` sessions are open; returns how long that took.
    fn wait_for_sessions(&self, devices: u64, timeout: Duration) -> Duration {
        let started = Instant::now();
        wait_until(&format!("{devices} sessions"), timeout, || {
            (self.sessions()? == devices).then_some(())
        });
        started.elapsed()
    }

    /// Waits until the ledger holds `more` accepted shares beyond what it holds now.
    fn wait_for_more_shares(&self, more: u64, timeout: Duration) {
        let from = self.accepted().expect("status");
        wait_until(&format!("{more} more accepted shares"), timeout, || {
            (self.accepted()? >= from + more).then_some(())
        });
    }
}

/// The simulator's latest progress line (`--json`).
fn last_progress(simulator: &Process) -> Option<Value> {
    simulator
        .stdout()
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
}

/// Sessions in which the controller let the device keep work it held (its log says so).
fn resumed_sessions(simulator: &Process) -> usize {
    simulator
        .log()
        .lines()
        .filter(|l| l.contains("session open") && !l.contains("resumed=0"))
        .count()
}

/// Stops the simulator as an operator would and reads its tally.
fn stop_and_tally(simulator: &mut Process, path: &Path) -> Value {
    let status = simulator.signal("INT", Duration::from_secs(60));
    assert!(status.success(), "the simulator stopped cleanly: {status}");
    let text = std::fs::read_to_string(path).expect("the simulator wrote its tally");
    serde_json::from_str(&text).expect("the tally is JSON")
}

/// Every device's acknowledged shares, as the simulator counted them, equal the ledger's
/// count for it, and every share it found was answered; the totals agree too.
fn assert_tally_matches_ledger(tally: &Value, controller: &ControllerProcess, devices: usize) {
    assert_eq!(tally["failures"], serde_json::json!({}), "no device failed");
    let status = controller.status().expect("status");
    let ledger: std::collections::BTreeMap<String, u64> = status["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or_default().to_string(),
                number(d, "/shares/accepted"),
            )
        })
        .collect();
    let counted = tally["devices"].as_object().expect("tally devices");
    assert_eq!(counted.len(), devices);
    let mut mismatches = Vec::new();
    for (name, stats) in counted {
        let acknowledged = number(stats, "/accepted");
        let recorded = ledger.get(name).copied().unwrap_or_default();
        if acknowledged != recorded {
            mismatches.push(format!(
                "{name}: acknowledged {acknowledged}, ledger {recorded}"
            ));
        }
        // Every share the device found was answered before it stopped: none was lost on
        // the way, offline or across the crash.
        let found = number(stats, "/found");
        let answered = acknowledged + number(stats, "/rejected");
        if found != answered {
            mismatches.push(format!("{name}: found {found}, answered {answered}"));
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert_eq!(
        number(tally, "/accepted"),
        number(&status, "/totals/accepted"),
        "the totals"
    );
    assert_eq!(
        number(&status, "/totals/rejected/duplicate"),
        0,
        "nothing resubmitted was counted as a replay: {}",
        status["totals"]
    );
}

#[test]
fn a_sigkill_under_load_loses_no_acknowledged_share_and_counts_none_twice() {
    const DEVICES: u32 = 500;
    let mut fleet = Fleet::start(DEVICES);
    let mut simulator = fleet.simulate(&fleet.controller.url(), DEVICES, &[]);
    fleet.wait_for_sessions(u64::from(DEVICES), Duration::from_secs(180));
    // Shares are flowing from the whole fleet (100 a second at 12 a minute each).
    fleet.wait_for_more_shares(1000, Duration::from_secs(120));

    fleet.controller.process.kill();
    fleet.restart_killed();
    let readmitted = fleet.wait_for_sessions(u64::from(DEVICES), Duration::from_secs(120));
    eprintln!("{DEVICES} devices re-admitted {readmitted:?} after the restart");
    fleet.wait_for_more_shares(1000, Duration::from_secs(120));

    let tally = stop_and_tally(&mut simulator, &fleet.tally_path());
    assert!(number(&tally, "/accepted") >= 2000, "{}", tally["accepted"]);
    assert_tally_matches_ledger(&tally, &fleet.controller, DEVICES as usize);
    // The restarted controller kept the leases the devices held: they resumed them.
    assert!(
        resumed_sessions(&simulator) > 0,
        "no device resumed its work after the restart"
    );
}

#[test]
fn a_lost_controllers_devices_come_back_spread_over_time() {
    const DEVICES: u32 = 300;
    let mut fleet = Fleet::start(DEVICES);
    let _simulator = fleet.simulate(&fleet.controller.url(), DEVICES, &[]);
    fleet.wait_for_sessions(u64::from(DEVICES), Duration::from_secs(180));

    // The controller dies; something that refuses to speak TLS takes its port, so every
    // attempt fails and is counted.
    let grpc = fleet.controller.grpc;
    fleet.controller.process.kill();
    let lost = Instant::now();
    let listener = TcpListener::bind(grpc).expect("take over the controller's port");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut attempts: Vec<Duration> = Vec::new();
    while lost.elapsed() < Duration::from_secs(6) {
        match listener.accept() {
            Ok((stream, _)) => {
                attempts.push(lost.elapsed());
                drop(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    // The first attempts after losing a working session are spread over the report
    // interval (2 s for a fleet this size): in 100 ms slices a uniform spread puts 5 %
    // in each; without jitter they would all land in the first slice.
    let first_window: Vec<Duration> = attempts
        .iter()
        .copied()
        .filter(|t| *t < Duration::from_secs(2))
        .collect();
    let mut slices = [0usize; 20];
    for t in &first_window {
        slices[(t.as_millis() / 100).min(19) as usize] += 1;
    }
    eprintln!("reconnect attempts per 100 ms over the first 2 s: {slices:?}");
    assert!(
        first_window.len() >= DEVICES as usize * 3 / 4,
        "most devices tried within the window: {} of {DEVICES}",
        first_window.len()
    );
    let busiest = slices.iter().copied().max().unwrap_or_default();
    assert!(
        busiest <= DEVICES as usize / 6,
        "reconnects came in a wave: {slices:?}"
    );
    assert!(
        slices.iter().filter(|n| **n > 0).count() >= 15,
        "reconnects spread over the window: {slices:?}"
    );
    // The failed attempts back off further: the second round is slower than the first.
    let later = attempts
        .iter()
        .filter(|t| **t >= Duration::from_secs(2) && **t < Duration::from_secs(4))
        .count();
    assert!(
        later < first_window.len(),
        "failed attempts backed off: {later} in the next 2 s after {} in the first",
        first_window.len()
    );
    drop(listener);
    fleet.restart_killed();
    fleet.wait_for_sessions(u64::from(DEVICES), Duration::from_secs(120));
}

#[test]
fn a_slow_then_broken_link_costs_no_share_not_even_at_a_stop() {
    const DEVICES: u32 = 50;
    let fleet = Fleet::start(DEVICES);
    let proxy = FlakyProxy::start(fleet.controller.grpc);
    let url = format!("https://{}", proxy.addr);
    let mut simulator = fleet.simulate(&url, DEVICES, &[]);
    fleet.wait_for_sessions(u64::from(DEVICES), Duration::from_secs(120));
    fleet.wait_for_more_shares(50, Duration::from_secs(60));

    // 300 ms each way: slow, but the sessions hold and shares keep being accepted.
    proxy.set(Link::Delayed(Duration::from_millis(300)));
    fleet.wait_for_more_shares(50, Duration::from_secs(60));
    assert_eq!(fleet.sessions(), Some(u64::from(DEVICES)), "sessions held");

    // The link breaks: the controller sees every session end; the devices go on hashing
    // what they hold (within its lease) and keep their shares.
    proxy.set(Link::Down);
    wait_until("every session to end", Duration::from_secs(30), || {
        (fleet.sessions()? == 0).then_some(())
    });
    let offline = fleet.accepted().expect("status");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        fleet.accepted(),
        Some(offline),
        "nothing arrives while the link is down"
    );
    let refused = proxy.accepted();

    proxy.set(Link::Up);
    fleet.wait_for_sessions(u64::from(DEVICES), Duration::from_secs(60));
    assert!(
        proxy.accepted() > refused,
        "devices came back through the link"
    );
    let metrics = get_text(fleet.controller.http, "/metrics").expect("metrics");
    assert!(
        metrics.contains("micromine_sessions_active 50"),
        "{metrics}"
    );
    // Shares found while offline arrive once the link is back.
    fleet.wait_for_more_shares(50, Duration::from_secs(60));
    assert!(
        resumed_sessions(&simulator) > 0,
        "devices resumed their leases after the outage"
    );

    // A second outage, and the fleet is stopped the moment the link returns, before the
    // devices' backoff brings them back: each with shares still unanswered makes one last
    // session, so every share found is answered all the same.
    proxy.set(Link::Down);
    wait_until(
        "every session to end again",
        Duration::from_secs(30),
        || (fleet.sessions()? == 0).then_some(()),
    );
    // The fleet (10 shares a second) finds shares offline: wait until the simulator says
    // its devices, none of them connected, hold some the controller has not answered.
    wait_until(
        "the devices to hold shares found offline",
        Duration::from_secs(30),
        || {
            let line = last_progress(&simulator)?;
            (number(&line, "/sessions") == 0 && number(&line, "/unanswered") >= 10).then_some(())
        },
    );
    proxy.set(Link::Up);
    let tally = stop_and_tally(&mut simulator, &fleet.tally_path());
    assert_tally_matches_ledger(&tally, &fleet.controller, DEVICES as usize);
    let last_sessions = simulator
        .log()
        .matches("last shares delivered before the stop")
        .count();
    assert!(
        last_sessions > 0,
        "devices stopped offline delivered their last shares"
    );
}

#[test]
fn churning_links_drop_and_come_back_without_losing_a_share() {
    const DEVICES: u32 = 20;
    let fleet = Fleet::start(DEVICES);
    // Each device loses its link about every 3 s.
    let mut simulator = fleet.simulate(&fleet.controller.url(), DEVICES, &["--churn", "20"]);
    let drops = || {
        simulator
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|l| l["link_drops"].as_u64())
            .max()
            .unwrap_or(0)
    };
    wait_until("links to drop", Duration::from_secs(60), || {
        (drops() >= u64::from(DEVICES)).then_some(())
    });
    fleet.wait_for_more_shares(20, Duration::from_secs(60));
    let tally = stop_and_tally(&mut simulator, &fleet.tally_path());
    assert_tally_matches_ledger(&tally, &fleet.controller, DEVICES as usize);
    let sessions: u64 = tally["devices"]
        .as_object()
        .expect("devices")
        .values()
        .map(|d| number(d, "/sessions"))
        .sum();
    assert!(
        sessions > u64::from(DEVICES),
        "devices reconnected after their links dropped: {sessions} sessions"
    );
}
