//! The controller under a simulated fleet: `scripts/bench-fleet` (which builds the release
//! binaries first) or, with them built, `cargo bench -p micromine-e2e --bench fleet`.
//!
//! Starts a standalone controller and `micromine-agent simulate` on loopback and prints:
//! sessions held, the controller's RSS (and per session), shares verified and durably
//! recorded per second (the simulator counts acknowledgements, which the controller sends
//! only once a share is on disk), assignment latency p50/p99 as devices see it, and how
//! long the whole fleet takes to be re-admitted after the controller is killed (SIGKILL)
//! and started again. Then it stops the fleet and holds the simulator's tally of
//! acknowledged shares against the ledger.
//!
//! Options (after `--`): `--devices N` (10000), `--hashrate H/s` (500, each device),
//! `--shares-per-minute N` (36, each device: 6,000 a second offered by 10,000), `--measure
//! SECS` (60), `--churn RATE` (0). The simulator shares the machine's cores with the
//! controller, so its hashing rate is kept low; assignment latency is printed both as the
//! controller measures it (`micromine_assignment_latency_seconds`: from the request for
//! work to the durable assignment leaving) and as the devices see it (which adds both
//! processes waiting for a core).
//! Figures, never assertions: a benchmark reports, the tests judge.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use micromine_agent::simulated::LATENCY_BUCKETS_MS;
use micromine_e2e::{
    ListenAddresses, Process, bin, get_json, get_text, listen_addresses, run_to_end, wait_until,
};
use serde_json::Value;

struct Options {
    devices: u64,
    hashrate: f64,
    shares_per_minute: f64,
    measure: Duration,
    churn: f64,
}

fn options() -> Options {
    let mut options = Options {
        devices: 10_000,
        hashrate: 500.0,
        shares_per_minute: 36.0,
        measure: Duration::from_secs(60),
        churn: 0.0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--devices" => options.devices = value() as u64,
            "--hashrate" => options.hashrate = value(),
            "--shares-per-minute" => options.shares_per_minute = value(),
            "--measure" => options.measure = Duration::from_secs_f64(value()),
            "--churn" => options.churn = value(),
            // `cargo bench` passes `--bench`; anything else is a mistake worth hearing of.
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    options
}

/// One sample of a Prometheus text exposition, unlabelled.
fn metric(http: SocketAddr, name: &str) -> Option<f64> {
    let text = get_text(http, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A process's resident set and its peak, in bytes, and its CPU seconds so far.
fn process_usage(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_default()
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in the kernel's clock ticks (100 a second on Linux).
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (kib("VmRSS:"), kib("VmHWM:"), cpu)
}

/// Starts the controller on `grpc` and `http` (port 0: any) and returns it with the
/// addresses it got.
fn start_controller(dir: &Path, grpc: SocketAddr, http: SocketAddr) -> (Process, ListenAddresses) {
    let (manifests, data) = (dir.join("manifests"), dir.join("data"));
    let (grpc, http_arg) = (grpc.to_string(), http.to_string());
    let addresses = dir.join("listen.json");
    let addresses_arg = addresses.to_str().expect("utf-8");
    let mut process = Process::start_with_env(
        "controller",
        &bin("micromine-controller"),
        &[
            "run",
            "--manifests",
            manifests.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen",
            &grpc,
            "--http-listen",
            &http_arg,
            "--listen-addresses-file",
            addresses_arg,
        ],
        &[("RUST_LOG", Path::new("warn"))],
    );
    let bound = listen_addresses(&mut process, &addresses, Duration::from_secs(60));
    wait_until("controller /readyz", Duration::from_secs(60), || {
        get_json(bound.http, "/readyz")
    });
    (process, bound)
}

/// The cumulative buckets of a histogram: (upper bound, count), ascending.
fn buckets(http: SocketAddr, name: &str) -> Vec<(f64, f64)> {
    let text = get_text(http, "/metrics").unwrap_or_default();
    let prefix = format!("{name}_bucket{{le=\"");
    let mut found: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    found
}

/// Quantile `q` of the observations between two bucket snapshots, interpolated within
/// its bucket as Prometheus' `histogram_quantile` does.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, m)| *m);
            (*le, n - earlier)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, cumulative) in &counts {
        if *cumulative >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (cumulative - lower.1).max(1e-9);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (*le, *cumulative);
    }
    None
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The simulator's JSON progress lines so far.
fn progress_lines(simulator: &Process) -> Vec<Value> {
    simulator
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn main() {
    let options = options();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("manifests")).expect("mkdir");
    std::fs::write(
        dir.path().join("manifests/sim.yaml"),
        format!(
            "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata:\n  name: sim\nspec:\n  selector:\n    matchLabels: {{site: sim}}\n  workSource:\n    builtin: {{networkDifficulty: 1.0e9}}\n  sharesPerMinute: {}\n  assignmentSeconds: 30\n",
            options.shares_per_minute
        ),
    )
    .expect("write manifest");
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (mut controller, ListenAddresses { grpc, http }) = start_controller(dir.path(), any, any);
    let (idle_rss, _, _) = process_usage(controller.pid());
    let token = run_to_end(
        &bin("micromine-controller"),
        &[
            "token",
            "create",
            "--data-dir",
            dir.path().join("data").to_str().expect("utf-8"),
            "--uses",
            &options.devices.to_string(),
        ],
    )
    .trim()
    .to_string();

    let devices = options.devices.to_string();
    let (hashrate, churn) = (options.hashrate.to_string(), options.churn.to_string());
    let tally_path = dir.path().join("tally.json");
    let state = dir.path().join("sim");
    let mut simulator = Process::start_with_env(
        "simulator",
        &bin("micromine-agent"),
        &[
            "simulate",
            "--controller",
            &format!("https://{grpc}"),
            "--token",
            &token,
            "--devices",
            &devices,
            "--labels",
            "site=sim",
            "--state-dir",
            state.to_str().expect("utf-8"),
            "--hashrate",
            &hashrate,
            "--churn",
            &churn,
            "--ramp",
            "1000",
            "--report-every",
            "5",
            "--json",
            "--tally",
            tally_path.to_str().expect("utf-8"),
        ],
        &[("RUST_LOG", Path::new("warn"))],
    );
    let sessions = || metric(http, "micromine_sessions_active").unwrap_or(0.0) as u64;
    let started = Instant::now();
    wait_until(
        "the fleet to enroll and connect",
        Duration::from_secs(900),
        || (sessions() >= options.devices).then_some(()),
    );
    let admitted = started.elapsed();
    println!(
        "{} devices enrolled and connected in {:.1} s",
        options.devices,
        admitted.as_secs_f64()
    );

    // Let vardiff settle, then measure.
    std::thread::sleep(Duration::from_secs(30));
    let lines_before = progress_lines(&simulator).len();
    const LATENCY: &str = "micromine_assignment_latency_seconds";
    let latency_before = buckets(http, LATENCY);
    let (_, _, cpu_before) = process_usage(controller.pid());
    let window = Instant::now();
    std::thread::sleep(options.measure);
    let cpu_seconds = process_usage(controller.pid()).2 - cpu_before;
    let window = window.elapsed();
    let latency_after = buckets(http, LATENCY);
    let controller_latency =
        |q: f64| quantile(&latency_before, &latency_after, q).map_or(f64::NAN, |s| s * 1000.0);
    let assigned =
        latency_after.last().map_or(0.0, |b| b.1) - latency_before.last().map_or(0.0, |b| b.1);
    let (rss, peak, _) = process_usage(controller.pid());
    let held = sessions();
    let lines: Vec<Value> = progress_lines(&simulator)
        .into_iter()
        .skip(lines_before)
        .collect();
    let rates: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["accepted_per_second"].as_f64())
        .collect();
    let rate = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    // The devices' view over the whole window: the simulator's per-interval bucket
    // counts, summed, as cumulative (upper bound in seconds, count) pairs.
    let mut counts = vec![0.0; LATENCY_BUCKETS_MS.len()];
    let mut samples = 0.0;
    let mut worst_interval_p99: f64 = 0.0;
    for line in &lines {
        let latency = &line["assignment_latency"];
        samples += latency["count"].as_f64().unwrap_or(0.0);
        worst_interval_p99 = worst_interval_p99.max(latency["p99_ms"].as_f64().unwrap_or(0.0));
        for (sum, n) in counts
            .iter_mut()
            .zip(latency["buckets"].as_array().into_iter().flatten())
        {
            *sum += n.as_f64().unwrap_or(0.0);
        }
    }
    let mut device_buckets: Vec<(f64, f64)> = LATENCY_BUCKETS_MS
        .iter()
        .zip(counts.iter().scan(0.0, |total, n| {
            *total += n;
            Some(*total)
        }))
        .map(|(le, cumulative)| (le / 1000.0, cumulative))
        .collect();
    device_buckets.push((f64::INFINITY, samples));
    let device_latency =
        |q: f64| quantile(&[], &device_buckets, q).map_or(f64::NAN, |s| s * 1000.0);

    // A crash and a fresh start: how long until every device is back?
    controller.kill();
    let restarted = Instant::now();
    // Where the devices know it.
    (controller, _) = start_controller(dir.path(), grpc, http);
    let ready = restarted.elapsed();
    // When half, nine in ten, 99 in 100 and all devices were back.
    let marks = [0.5, 0.9, 0.99, 1.0];
    let mut reached: Vec<f64> = Vec::new();
    wait_until(
        "the whole fleet to be re-admitted",
        Duration::from_secs(600),
        || {
            let held = sessions() as f64;
            while reached.len() < marks.len()
                && held >= (marks[reached.len()] * options.devices as f64).ceil()
            {
                reached.push(restarted.elapsed().as_secs_f64());
            }
            (reached.len() == marks.len()).then_some(())
        },
    );
    let readmitted = restarted.elapsed();
    let (rss_after_restart, _, _) = process_usage(controller.pid());

    let status = simulator.signal("INT", Duration::from_secs(300));
    let tally: Value = std::fs::read_to_string(&tally_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let ledger = get_json(http, "/api/v1/status")
        .map(|s| s["totals"]["accepted"].as_u64().unwrap_or(0))
        .unwrap_or(0);

    println!();
    println!(
        "fleet: {} simulated devices at {} H/s each, {} shares/min each; measured over {:.0} s after a 30 s settle",
        options.devices,
        options.hashrate,
        options.shares_per_minute,
        window.as_secs_f64()
    );
    println!("sessions held                  {held}");
    println!(
        "controller RSS                 {:.0} MiB (peak {:.0} MiB; {:.0} MiB before the fleet)",
        mib(rss),
        mib(peak),
        mib(idle_rss)
    );
    println!(
        "RSS per session                {:.1} KiB ({:.1} KiB above the idle controller)",
        rss as f64 / 1024.0 / held.max(1) as f64,
        rss.saturating_sub(idle_rss) as f64 / 1024.0 / held.max(1) as f64
    );
    println!("shares verified + durable      {rate:.0} /s");
    println!(
        "controller CPU                 {:.0} % of one core",
        cpu_seconds / window.as_secs_f64() * 100.0
    );
    println!(
        "assignment latency, controller p50 {:.1} ms, p99 {:.1} ms ({assigned:.0} assignments)",
        controller_latency(0.5),
        controller_latency(0.99),
    );
    println!(
        "assignment latency, devices    p50 {:.1} ms, p99 {:.1} ms ({samples:.0} samples; the worst 5 s interval's p99 {worst_interval_p99:.1} ms)",
        device_latency(0.5),
        device_latency(0.99),
    );
    println!(
        "restart after SIGKILL          ready in {:.1} s, whole fleet re-admitted in {:.1} s (half in {:.1} s, 90 % in {:.1} s, 99 % in {:.1} s; RSS then {:.0} MiB)",
        ready.as_secs_f64(),
        readmitted.as_secs_f64(),
        reached[0],
        reached[1],
        reached[2],
        mib(rss_after_restart)
    );
    println!(
        "tally                          simulator acknowledged {} accepted ({} found, {} rejected, {} unanswered at the stop), ledger holds {}; simulator exit {status}",
        tally["accepted"], tally["found"], tally["rejected"], tally["unanswered"], ledger
    );
}
