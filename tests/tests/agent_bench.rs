//! `micromine-agent bench` as an operator runs it on a device: every engine the CPU runs,
//! the one `run` would select (by timing them) first, hashes per joule from the device's power draw, and clear errors
//! for engines it cannot honour.

use std::process::Command;

use micromine_agent::engine::EngineKind;
use micromine_e2e::{bin, fake_sysfs, run_to_end};
use serde_json::Value;

#[test]
fn bench_measures_every_engine_this_cpu_runs_and_hashes_per_joule() {
    let root = tempfile::tempdir().expect("tempdir");
    // A device drawing 4 W from its battery.
    let sysfs = fake_sysfs(root.path(), 50.0, 4.0);
    let out = run_to_end(
        &bin("micromine-agent"),
        &[
            "bench",
            "--seconds",
            "0.2",
            "--threads",
            "1",
            "--json",
            "--sysfs-root",
            sysfs.to_str().expect("utf-8 path"),
        ],
    );
    let report: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    // Selected as `run` selects: by timing every engine the CPU runs, the fastest wins.
    assert_eq!(report["basis"], "calibrated", "{report}");
    let calibration = report["calibration"].as_object().expect("calibration");
    let available: Vec<&str> = EngineKind::available().map(EngineKind::name).collect();
    let mut timed: Vec<&str> = calibration.keys().map(String::as_str).collect();
    timed.sort();
    let mut expected = available.clone();
    expected.sort();
    assert_eq!(timed, expected, "{report}");
    let fastest = calibration
        .iter()
        .max_by(|a, b| {
            a.1.as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b.1.as_f64().unwrap_or(0.0))
        })
        .map(|(name, _)| name.as_str());
    assert_eq!(report["selected"].as_str(), fastest, "{report}");
    let results = report["results"].as_array().expect("results");
    let engines: Vec<&str> = results
        .iter()
        .map(|r| r["engine"].as_str().expect("engine name"))
        .collect();
    let selected = report["selected"].as_str().expect("selected");
    let rest = available.iter().copied().filter(|name| *name != selected);
    assert_eq!(
        engines,
        std::iter::once(selected).chain(rest).collect::<Vec<_>>(),
        "the selected engine first, then the rest"
    );
    for result in results {
        let rate = result["hashes_per_second"].as_f64().expect("rate");
        assert!(rate > 0.0, "{result}");
        assert_eq!(result["threads"], 1);
        assert_eq!(result["power_watts"], 4.0, "{result}");
        let per_joule = result["hashes_per_joule"]
            .as_f64()
            .expect("hashes per joule");
        assert!((per_joule - rate / 4.0).abs() <= rate * 1e-9, "{result}");
    }
}

#[test]
fn bench_with_a_forced_engine_measures_it_first_and_prints_a_table() {
    let root = tempfile::tempdir().expect("tempdir");
    let out = run_to_end(
        &bin("micromine-agent"),
        &[
            "bench",
            "--seconds",
            "0.1",
            "--threads",
            "1",
            "--engine",
            "portable",
            "--sysfs-root",
            root.path().to_str().expect("utf-8 path"),
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("engine"), "{out}");
    assert!(
        lines[1].starts_with("portable") && lines[1].ends_with("selected"),
        "{out}"
    );
    // No power supply in this sysfs: no made-up efficiency, and the table says why.
    assert!(out.contains("reports no power draw"), "{out}");
    // A forced engine is not timed against the others, but a faster one is pointed out.
    assert!(!out.contains("selected by timing"), "{out}");
    let faster_exists = EngineKind::available().count() > 1;
    assert_eq!(
        out.contains("measured faster here than the selected `portable`"),
        faster_exists,
        "{out}"
    );
    assert_eq!(
        lines.len(),
        2 + EngineKind::available().count() + usize::from(faster_exists),
        "{out}"
    );
}

#[test]
fn bench_and_run_refuse_engines_they_cannot_honour() {
    let agent = bin("micromine-agent");
    let unknown = Command::new(&agent)
        .args(["bench", "--seconds", "0.1", "--engine", "avx9"])
        .output()
        .expect("runs");
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains(
            "--engine: unknown engine `avx9`; the engines are: avx512, sha-ni, armv8-sha2, neon, avx2, portable"
        ),
        "{stderr}"
    );
    let missing = EngineKind::ALL
        .into_iter()
        .find(|kind| !kind.is_available())
        .expect("no CPU runs both the x86-64 and the ARM engines");
    let run = Command::new(&agent)
        .args([
            "run",
            "--controller",
            "https://127.0.0.1:1",
            "--engine",
            missing.name(),
        ])
        .output()
        .expect("runs");
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains(&format!(
            "--engine: `{missing}` needs CPU features this machine does not have"
        )),
        "{stderr}"
    );
    let bad_seconds = Command::new(&agent)
        .args(["bench", "--seconds", "0"])
        .output()
        .expect("runs");
    assert!(!bad_seconds.status.success());
    assert!(
        String::from_utf8_lossy(&bad_seconds.stderr).contains("--seconds: 0 is not between"),
        "{}",
        String::from_utf8_lossy(&bad_seconds.stderr)
    );
}
