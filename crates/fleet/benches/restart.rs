//! What remembering ended leases across a restart costs: the extra records and bytes the
//! store holds for a large fleet, and how long reading the fleet back (what `Fleet::open`
//! does before it serves: `persist::load`, `FleetState::new`, forgetting leases whose
//! window closed) takes with and without them.
//!
//! The records are the fleet's own: a `FleetState` with one builtin MicroMiner is given
//! `--devices` devices (10,000) hashing at `--hashrate` H/s (500, as `scripts/bench-fleet`
//! simulates), and each finishes its ranges for the ten minutes an ended lease is
//! remembered, topped up as it goes. Its writes go through `persist::apply` into a redb
//! file twice, once as they are and once without the ended leases' records, and each file
//! is read back `--rounds` times (5). Prints figures; asserts nothing.
//!
//! `cargo bench -p micromine-fleet --bench restart -- --devices 10000`

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use micromine_fleet::persist::{self, PersistOp, Restored};
use micromine_fleet::state::FleetState;
use micromine_proto::pb;
use redb::ReadableDatabase;

/// Unix ms the simulated fleet starts at.
const START_MS: i64 = 1_700_000_000_000;
/// How long an ended lease is remembered (`ENDED_LEASE_MEMORY_MS` in `state/mod.rs`).
const WINDOW_MS: i64 = 600_000;
/// Writes per redb transaction while filling the file: about what a group commit holds.
const OPS_PER_COMMIT: usize = 5_000;

struct Options {
    devices: usize,
    hashrate: f64,
    rounds: usize,
}

fn options() -> Options {
    let mut options = Options {
        devices: 10_000,
        hashrate: 500.0,
        rounds: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse::<f64>().ok());
        match arg.as_str() {
            "--devices" => options.devices = value().map_or(options.devices, |v| v as usize),
            "--hashrate" => options.hashrate = value().unwrap_or(options.hashrate),
            "--rounds" => options.rounds = value().map_or(options.rounds, |v| v as usize),
            // `cargo bench` passes `--bench`; anything else is ignored.
            _ => {}
        }
    }
    options
}

fn manifest() -> micromine_resources::microminer::MinerSet {
    let text = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: sim}\nspec:\n  selector: {matchLabels: {site: sim}}\n  workSource: {builtin: {networkDifficulty: 1.0e9}}\n  sharesPerMinute: 36\n  assignmentSeconds: 30\n";
    match micromine_resources::microminer::parse_str("bench.yaml", text) {
        Ok(miners) => miners.into_iter().map(|m| (m.key(), m)).collect(),
        Err(e) => panic!("the benchmark's manifest: {e}"),
    }
}

fn hello(hashrate: f64) -> pb::Hello {
    pb::Hello {
        capacity: Some(pb::Capacity {
            nominal_hashrate: hashrate,
            mining_threads: 1,
            ..Default::default()
        }),
        labels: [("site".to_string(), "sim".to_string())].into(),
        version: "bench".into(),
        resume: None,
    }
}

/// The assignments among `messages`, by device, in the order they were given.
fn given(
    held: &mut HashMap<String, VecDeque<pb::Assignment>>,
    messages: &[(String, pb::ControllerMessage)],
) {
    for (device, message) in messages {
        if let Some(pb::controller_message::Kind::Assignment(a)) = &message.kind {
            held.entry(device.clone()).or_default().push_back(a.clone());
        }
    }
}

/// The fleet's writes from its first assignment until the window is full of ended leases,
/// and the time it got to.
fn simulate(options: &Options) -> (Vec<PersistOp>, i64) {
    let mut state = FleetState::new(Restored::default());
    let mut ops = state.apply_miners(&manifest(), START_MS).persist;
    let names: Vec<String> = (0..options.devices)
        .map(|i| format!("device-{i:05}"))
        .collect();
    let mut held: HashMap<String, VecDeque<pb::Assignment>> = HashMap::new();
    for name in &names {
        let fx = state.connect(name, &hello(options.hashrate), START_MS).1;
        given(&mut held, &fx.messages);
        ops.extend(fx.persist);
    }
    // A range takes `size / hashrate` to scan; devices finish theirs spread over that time,
    // one device after another, each one range at a time (the other is queued).
    let size = held
        .values()
        .find_map(|q| q.front())
        .map_or(1, |a| a.nonce_end - a.nonce_start);
    let scan_ms = (size as f64 / options.hashrate * 1000.0).max(1.0) as i64;
    let mut now = START_MS;
    let until = START_MS + WINDOW_MS;
    let step = (scan_ms / options.devices as i64).max(1);
    let mut next = 0;
    while now < until {
        now += step;
        let name = &names[next % names.len()];
        next += 1;
        let Some(lease) = held.get_mut(name).and_then(VecDeque::pop_front) else {
            continue;
        };
        let progress = pb::Progress {
            assignment_id: lease.id,
            scanned_until: lease.nonce_end,
            hashes: lease.nonce_end - lease.nonce_start,
            finished: true,
        };
        let fx = state.progress(name, &progress, now);
        given(&mut held, &fx.messages);
        ops.extend(fx.persist);
    }
    // What the periodic tick would have forgotten by now.
    ops.extend(state.forget_ended_leases(now).persist);
    (ops, now)
}

fn fill(path: &Path, ops: &[PersistOp]) -> u64 {
    let _ = std::fs::remove_file(path);
    let db = match redb::Database::create(path) {
        Ok(db) => db,
        Err(e) => panic!("create {}: {e}", path.display()),
    };
    for chunk in ops.chunks(OPS_PER_COMMIT) {
        let txn = db.begin_write().unwrap_or_else(|e| panic!("begin: {e}"));
        persist::apply(&txn, chunk).unwrap_or_else(|e| panic!("apply: {e}"));
        txn.commit().unwrap_or_else(|e| panic!("commit: {e}"));
    }
    drop(db);
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Opens the file and restores the fleet from it as `Fleet::open` does; the time it took
/// and how many live and ended leases came back.
fn restart(path: &Path, now: i64) -> (Duration, usize, usize) {
    let started = Instant::now();
    let db = redb::Database::create(path).unwrap_or_else(|e| panic!("open: {e}"));
    let txn = db.begin_read().unwrap_or_else(|e| panic!("read: {e}"));
    let restored = persist::load(&txn).unwrap_or_else(|e| panic!("load: {e}"));
    let (live, ended) = (restored.leases.len(), restored.ended_leases.len());
    let mut state = FleetState::new(restored);
    let forgotten = state.forget_ended_leases(now);
    let took = started.elapsed();
    drop(forgotten);
    drop(state);
    (took, live, ended)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn main() {
    let options = options();
    let dir: PathBuf =
        std::env::temp_dir().join(format!("micromine-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));

    let simulated = Instant::now();
    let (ops, now) = simulate(&options);
    let simulated = simulated.elapsed();
    let ended: Vec<&PersistOp> = ops
        .iter()
        .filter(|op| matches!(op, PersistOp::EndedLease(_)))
        .collect();
    let ended_bytes: usize = ended
        .iter()
        .map(|op| match op {
            PersistOp::EndedLease(record) => serde_json::to_vec(record).map_or(0, |v| v.len()),
            _ => 0,
        })
        .sum();
    let lease_bytes: usize = ops
        .iter()
        .map(|op| match op {
            PersistOp::Lease(record) => serde_json::to_vec(record).map_or(0, |v| v.len()),
            _ => 0,
        })
        .sum();
    let leases_written = ops
        .iter()
        .filter(|op| matches!(op, PersistOp::Lease(_)))
        .count();
    let forgotten = ops
        .iter()
        .filter(|op| matches!(op, PersistOp::ForgetEndedLease(_)))
        .count();
    let without: Vec<PersistOp> = ops
        .iter()
        .filter(|op| {
            !matches!(
                op,
                PersistOp::EndedLease(_) | PersistOp::ForgetEndedLease(_)
            )
        })
        .cloned()
        .collect();

    let with_path = dir.join("with.redb");
    let without_path = dir.join("without.redb");
    let with_size = fill(&with_path, &ops);
    let without_size = fill(&without_path, &without);

    let mut with_times = Vec::new();
    let mut without_times = Vec::new();
    let (mut live, mut remembered) = (0, 0);
    for _ in 0..options.rounds.max(1) {
        let (t, _, _) = restart(&without_path, now);
        without_times.push(t);
        let (t, l, e) = restart(&with_path, now);
        with_times.push(t);
        (live, remembered) = (l, e);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let devices = options.devices as f64;
    let span_s = (now - START_MS) as f64 / 1000.0;
    println!(
        "fleet                 {} devices at {} H/s, {:.0} s simulated in {:.1} s",
        options.devices,
        options.hashrate,
        span_s,
        simulated.as_secs_f64()
    );
    println!(
        "leases                {leases_written} written ({:.0} B each as JSON); {live} live at the restart",
        lease_bytes as f64 / leases_written.max(1) as f64
    );
    println!(
        "ended leases          {} records written ({:.1} a second, {:.2} a device), {forgotten} forgotten again; {remembered} remembered at the restart ({:.1} a device)",
        ended.len(),
        ended.len() as f64 / span_s,
        ended.len() as f64 / devices,
        remembered as f64 / devices
    );
    println!(
        "extra bytes           {:.0} B a record as JSON, {:.1} MiB of JSON in the window; store file {:.1} MiB against {:.1} MiB without ({:+.1} MiB)",
        ended_bytes as f64 / ended.len().max(1) as f64,
        remembered as f64 * ended_bytes as f64 / ended.len().max(1) as f64 / 1048576.0,
        with_size as f64 / 1048576.0,
        without_size as f64 / 1048576.0,
        (with_size as f64 - without_size as f64) / 1048576.0
    );
    println!(
        "restart (open, load, FleetState::new, forget), median of {} warm: {:.1} ms with ended leases, {:.1} ms without (best {:.1} / {:.1} ms)",
        with_times.len(),
        median(with_times.clone()).as_secs_f64() * 1000.0,
        median(without_times.clone()).as_secs_f64() * 1000.0,
        with_times
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0,
        without_times
            .iter()
            .min()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0,
    );
}
