//! Invariant 4 end to end: vardiff gives each device the share target that makes it find
//! its MicroMiner's `sharesPerMinute`, whatever the device claimed about itself. A real
//! controller and `micromine-agent simulate` pacing one device at 50 kH/s.

use std::time::{Duration, Instant};

use micromine_e2e::{
    ControllerProcess, Process, bin, create_token, number, test_manifest, wait_until,
};
use serde_json::Value;

/// 6 shares a second: a short window holds enough of them to measure the rate.
const SHARES_PER_MINUTE: f64 = 360.0;
/// What the device really hashes, H/s.
const HASHRATE: f64 = 50_000.0;
/// What it claims: a quarter of it, so its first difficulty is four times too easy and
/// only the shares can tell the controller better (one retarget step is at most 4x).
const CLAIMED_HASHRATE: f64 = HASHRATE / 4.0;
/// The measurement window. Shares arrive as a Poisson process: 240 expected in 40 s, a
/// standard deviation of about 15.5, so the ±30 % allowed (72 shares) is more than 4.6
/// standard deviations; a correct vardiff fails this by chance a few times in a million
/// runs.
const WINDOW: Duration = Duration::from_secs(40);
/// Longer than vardiff's shortest window (10 s): a difficulty that stays put this long
/// is one vardiff is content with; one as far off as the claim would have moved by then.
const SETTLED_FOR: Duration = Duration::from_secs(12);

#[test]
fn a_device_finds_shares_per_minute_once_vardiff_has_settled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    // A hard network difficulty: no block rolls the header during the measurement.
    let manifest = test_manifest("vardiff", 5, 1e12).replace(
        "sharesPerMinute: 60",
        &format!("sharesPerMinute: {SHARES_PER_MINUTE}"),
    );
    std::fs::write(manifests.join("vardiff.yaml"), manifest).expect("write");
    let data = dir.path().join("data");
    let controller = ControllerProcess::start(&manifests, &data);
    let token = create_token(&data, 1);
    let state = dir.path().join("sim");
    let (hashrate, claimed) = (HASHRATE.to_string(), CLAIMED_HASHRATE.to_string());
    let _simulator = Process::start(
        "simulator",
        &bin("micromine-agent"),
        &[
            "simulate",
            "--controller",
            &controller.url(),
            "--token",
            &token,
            "--devices",
            "1",
            "--labels",
            "site=e2e",
            "--state-dir",
            state.to_str().expect("utf-8 path"),
            "--hashrate",
            &hashrate,
            "--claimed-hashrate",
            &claimed,
        ],
    );
    let device = || controller.device("sim-00001");
    let difficulty = |d: &Value| d["shareDifficulty"].as_f64().unwrap_or(0.0);
    let first = wait_until("the device to mine", Duration::from_secs(60), || {
        let d = device()?;
        (d["state"] == "mining" && difficulty(&d) > 0.0).then(|| difficulty(&d))
    });

    // Settled: the difficulty has not changed for SETTLED_FOR.
    let mut since: (f64, Instant) = (first, Instant::now());
    let settled = wait_until("vardiff to settle", Duration::from_secs(90), || {
        let now = difficulty(&device()?);
        if now != since.0 {
            since = (now, Instant::now());
        }
        (since.1.elapsed() >= SETTLED_FOR).then_some(now)
    });
    // The claim was four times too low: vardiff found the real rate from the shares.
    assert!(
        settled > first * 2.0,
        "vardiff never left the claimed rate's difficulty: {first:e} -> {settled:e}"
    );

    let (start, accepted_before) = (Instant::now(), accepted(&device()));
    // The measurement window itself: shares are counted over a known time, not awaited.
    std::thread::sleep(WINDOW);
    let accepted_after = accepted(&device());
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    let expected = SHARES_PER_MINUTE * minutes;
    let found = (accepted_after - accepted_before) as f64;
    eprintln!(
        "{found} shares in {:.1} s ({:.0}/min, aiming at {SHARES_PER_MINUTE}) at difficulty {settled:e} (claimed rate's {first:e})",
        minutes * 60.0,
        found / minutes
    );
    assert!(
        (found - expected).abs() <= 0.3 * expected,
        "{found} shares where {expected:.0} were aimed at"
    );
    // The difficulty vardiff settled on is the one for the real rate, within the same
    // tolerance.
    let ideal = HASHRATE * 60.0 / SHARES_PER_MINUTE / 4_294_967_296.0;
    let now = difficulty(&device().expect("the device"));
    assert!(
        (now / ideal - 1.0).abs() <= 0.3,
        "difficulty {now:e} for a device whose rate wants {ideal:e}"
    );
}

/// The device's accepted shares in the ledger.
fn accepted(device: &Option<Value>) -> u64 {
    number(device.as_ref().expect("the device"), "/shares/accepted")
}
