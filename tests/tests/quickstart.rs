//! `micromine-controller quickstart`: the first thing a newcomer runs.

use std::time::Duration;

use micromine_e2e::{Process, bin};

fn accepted_in(summary: &str) -> u64 {
    let line = summary
        .lines()
        .find(|l| l.starts_with("shares: "))
        .unwrap_or_else(|| panic!("no shares line in:\n{summary}"));
    line.trim_start_matches("shares: ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"))
}

#[test]
fn quickstart_mines_real_shares_and_keeps_its_ledger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().display().to_string();
    let args = [
        "quickstart",
        "--devices",
        "2",
        "--duration",
        "10",
        "--data-dir",
        &data,
    ];
    let mut first = Process::start("quickstart", &bin("micromine-controller"), &args);
    assert!(
        first.wait(Duration::from_secs(60)).success(),
        "{}",
        first.log()
    );
    let summary = first.stdout();
    let accepted = accepted_in(&summary);
    assert!(accepted > 0, "no accepted shares:\n{summary}");
    assert!(
        summary.contains("rejected (low difficulty 0, duplicate 0"),
        "{summary}"
    );
    // Plain progress lines when stdout is not a terminal.
    assert!(summary.contains("qs-device-1"), "{summary}");
    assert!(
        summary.contains("MicroMiner default/quickstart"),
        "{summary}"
    );
    // The cost/revenue line: energy drawn (two devices at the example's 5 W each, for ten
    // seconds: under 0.03 Wh; the bound leaves room for a slow start) against what the
    // accepted work is expected to earn.
    let economics = summary
        .lines()
        .find(|l| l.starts_with("MicroMiner default/quickstart: energy "))
        .unwrap_or_else(|| panic!("no cost/revenue line in:\n{summary}"));
    let wh: f64 = economics
        .split_whitespace()
        .nth(3)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{economics}"));
    assert!(wh > 0.0 && wh < 0.25, "{economics}");
    assert!(
        economics.ends_with(": profitable") || economics.ends_with(": unprofitable"),
        "{economics}"
    );

    // Same data dir: the devices keep their identities and the ledger continues.
    let mut second = Process::start("quickstart again", &bin("micromine-controller"), &args);
    assert!(
        second.wait(Duration::from_secs(60)).success(),
        "{}",
        second.log()
    );
    let again = accepted_in(&second.stdout());
    assert!(
        again > accepted,
        "ledger did not continue: {accepted} then {again}"
    );
}

#[test]
fn quickstart_refuses_a_bad_device_count() {
    let output = std::process::Command::new(bin("micromine-controller"))
        .args(["quickstart", "--devices", "0", "--duration", "1"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--devices must be between 1 and 64, got 0"),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_stops_quickstart_cleanly_with_a_summary() {
    let mut quickstart = Process::start(
        "quickstart",
        &bin("micromine-controller"),
        &["quickstart", "--devices", "1"],
    );
    micromine_e2e::wait_until("a first accepted share", Duration::from_secs(60), || {
        let out = quickstart.stdout();
        out.lines()
            .any(|l| {
                l.contains("qs-device-1")
                    && l.split_whitespace().rev().nth(1).is_some_and(|n| n != "0")
            })
            .then_some(())
    });
    let status = quickstart.signal("INT", Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", quickstart.log());
    let out = quickstart.stdout();
    assert!(
        out.contains("stopping: agents hand back their work"),
        "{out}"
    );
    assert!(accepted_in(&out) > 0, "{out}");
    assert!(out.contains("state was temporary"), "{out}");
}
