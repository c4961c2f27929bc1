//! The agent binary as an operator runs it. Having an integration test also makes
//! `cargo test` build the binary that the end-to-end tests in `tests/` start.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_micromine-agent"))
}

#[test]
fn bench_json_reports_a_real_measurement() {
    let output = agent()
        .args(["bench", "--seconds", "0.5", "--threads", "1", "--json"])
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    let report = &out["results"][0];
    assert_eq!(report["engine"], out["selected"], "{out}");
    assert_eq!(report["threads"], 1);
    let hashes = report["hashes"].as_u64().expect("hashes");
    let rate = report["hashes_per_second"].as_f64().expect("rate");
    let seconds = report["seconds"].as_f64().expect("seconds");
    assert!(hashes > 0 && rate > 0.0, "{report}");
    // The rate is what was hashed over how long it took, not a number from elsewhere.
    assert!(
        (rate - hashes as f64 / seconds).abs() <= rate * 1e-6,
        "{report}"
    );
    assert!(
        out["cpu"].as_str().is_some_and(|cpu| !cpu.is_empty()),
        "{out}"
    );
}

#[test]
fn bad_labels_are_refused_before_anything_else_happens() {
    let state = tempfile::tempdir().expect("tempdir");
    let token = format!(
        "mm1.{}.{}.{}",
        "0".repeat(16),
        "1".repeat(32),
        "2".repeat(64)
    );
    let output = agent()
        .args([
            "run",
            "--controller",
            "https://127.0.0.1:9",
            "--token",
            &token,
            "--labels",
            "site=plant 3",
            "--state-dir",
        ])
        .arg(state.path())
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--labels: `site=plant 3`"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(state.path()).expect("state dir").count(),
        0,
        "no key was made for a device that cannot start"
    );
}
