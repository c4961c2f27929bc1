//! Ledger throughput: shares re-verified (sha256d of the 80-byte header) and durably recorded
//! (group commit, fsync) per second, with `record` latency percentiles.
//!
//! 64 simulated devices, each a tokio task, submit batches of 16 fresh shares, as agents do,
//! plus now and then a replay of an earlier share, which must come back `Duplicate`. Each
//! device mines its own headers (ids never reused) and finds nonces in ascending order, as a
//! device scanning its nonce range does. Prints figures; asserts nothing about timing.
//!
//! Run: `cargo bench -p micromine-controller --bench ledger` (`LEDGER_BENCH_SECONDS` to change
//! the 5 s default).

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use micromine_proto::work::{HEADER_PREFIX_LEN, Target, header_with_nonce, sha256d};
use micromine_store::ledger::{AcceptedShare, Ledger, ShareKey, ShareOutcome};
use micromine_store::store::Store;

const DEVICES: usize = 64;
const BATCH: usize = 16;
/// Every this many batches a device replays one of its earlier shares.
const REPLAY_EVERY: u64 = 8;
/// Shares a device finds on one header before it gets a new assignment.
const SHARES_PER_HEADER: u32 = 1024;

#[derive(Default)]
struct DeviceReport {
    recorded: u64,
    duplicates: u64,
    replays_sent: u64,
    latencies: Vec<Duration>,
}

/// A tiny deterministic generator: the bench needs spread-out nonces, not good randomness.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn prefix_for(header_id: u64) -> [u8; HEADER_PREFIX_LEN] {
    let mut prefix = [0u8; HEADER_PREFIX_LEN];
    prefix[..4].copy_from_slice(&0x2000_0000u32.to_le_bytes());
    prefix[4..12].copy_from_slice(&header_id.to_le_bytes());
    prefix[36..44].copy_from_slice(&header_id.rotate_left(17).to_le_bytes());
    prefix
}

async fn device(ledger: Ledger, index: usize, deadline: Instant) -> anyhow::Result<DeviceReport> {
    let name = format!("bench-{index:02}");
    let miner = format!("bench/miner-{}", index % 4);
    // The share target the controller verifies against; the easiest one, since the bench
    // makes up nonces instead of mining them. The hashing cost is the same for any target.
    let target = Target::MAX;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1));
    let mut header_id = (index as u64) << 32;
    let mut prefix = prefix_for(header_id);
    let mut nonce = 0u32;
    let mut on_header = 0u32;
    let mut report = DeviceReport::default();
    let mut last_key: Option<ShareKey> = None;
    let mut batches = 0u64;
    while Instant::now() < deadline {
        let mut batch = Vec::with_capacity(BATCH + 1);
        for _ in 0..BATCH {
            if on_header == SHARES_PER_HEADER {
                header_id += 1;
                prefix = prefix_for(header_id);
                nonce = 0;
                on_header = 0;
            }
            on_header += 1;
            nonce += 1 + (rng.next() % 4096) as u32;
            let hash = sha256d(&header_with_nonce(&prefix, nonce));
            if !target.is_met_by(&hash) {
                bail!("share {header_id}:{nonce} does not meet its target");
            }
            batch.push(AcceptedShare {
                key: ShareKey { header_id, nonce },
                device: name.clone(),
                miner: miner.clone(),
                difficulty: target.difficulty(),
                time_unix_ms: 1_700_000_000_000 + batches as i64,
                block: false,
                resubmitted: false,
                for_pool: false,
            });
        }
        batches += 1;
        if batches.is_multiple_of(REPLAY_EVERY)
            && let Some(key) = last_key
        {
            let mut replay = batch[0].clone();
            replay.key = key;
            batch.push(replay);
            report.replays_sent += 1;
        }
        last_key = Some(batch[0].key);
        let started = Instant::now();
        let outcomes = ledger.record(batch, Vec::new()).await?;
        report.latencies.push(started.elapsed());
        for outcome in outcomes {
            match outcome {
                ShareOutcome::Recorded => report.recorded += 1,
                ShareOutcome::Duplicate => report.duplicates += 1,
                ShareOutcome::AlreadyRecorded => bail!("no share was resubmitted"),
            }
        }
    }
    Ok(report)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

async fn run(seconds: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let store = Store::open(&dir.path().join("ledger.redb"))?;
    let ledger = Ledger::open(store.clone())?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..DEVICES)
        .map(|index| tokio::spawn(device(ledger.clone(), index, deadline)))
        .collect();
    let mut total = DeviceReport::default();
    for task in tasks {
        let report = task.await.context("device task")??;
        total.recorded += report.recorded;
        total.duplicates += report.duplicates;
        total.replays_sent += report.replays_sent;
        total.latencies.extend(report.latencies);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = store.stats();

    ensure!(
        total.duplicates == total.replays_sent,
        "{} replays sent but {} duplicates detected",
        total.replays_sent,
        total.duplicates
    );
    let fleet = ledger.fleet_totals();
    ensure!(
        fleet.accepted == total.recorded && fleet.rejected.duplicate == total.duplicates,
        "fleet totals {fleet:?} disagree with {} recorded, {} duplicates",
        total.recorded,
        total.duplicates
    );

    total.latencies.sort_unstable();
    let calls = total.latencies.len();
    let submitted = total.recorded + total.duplicates;
    let commits = stats.commits.max(1);
    let file_bytes = std::fs::metadata(store.path())
        .map(|m| m.len())
        .unwrap_or(0);
    println!("ledger bench: {DEVICES} devices x batches of {BATCH} shares, {seconds} s");
    println!(
        "machine: {} x {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!("  elapsed                 {elapsed:>12.2} s");
    println!(
        "  shares verified+recorded {:>11.0} /s   ({} recorded, {} duplicates caught)",
        total.recorded as f64 / elapsed,
        total.recorded,
        total.duplicates
    );
    println!(
        "  record calls            {:>12.0} /s",
        calls as f64 / elapsed
    );
    println!(
        "  commits (fsync)         {:>12.0} /s   ({} commits, {} jobs)",
        stats.commits as f64 / elapsed,
        stats.commits,
        stats.jobs
    );
    println!(
        "  mean shares per commit  {:>12.1}      (mean jobs per commit {:.1}, largest {})",
        submitted as f64 / commits as f64,
        stats.jobs as f64 / commits as f64,
        stats.largest_batch
    );
    println!(
        "  record latency          p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&total.latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&total.latencies, 0.99).as_secs_f64() * 1e3,
        percentile(&total.latencies, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "  database file           {:>12.1} MiB",
        file_bytes as f64 / (1024.0 * 1024.0)
    );
    drop(ledger);
    store.close();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let seconds = match std::env::var("LEDGER_BENCH_SECONDS") {
        Ok(value) => value
            .parse()
            .with_context(|| format!("LEDGER_BENCH_SECONDS={value:?} is not a whole number"))?,
        Err(_) => 5,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run(seconds))
}
