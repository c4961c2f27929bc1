//! The Prometheus harness itself (`micromine_e2e::prometheus`), against a Prometheus that
//! scrapes its own `/metrics`: queries see live samples, a bad query fails with
//! Prometheus's message, and rule files are checked by promtool and evaluated cleanly.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use micromine_e2e::prometheus::{Prometheus, promtool_check_rules};
use micromine_e2e::{loopback, wait_until};

const RULES: &str = r#"groups:
  - name: harness
    rules:
      - record: job:up:sum
        expr: sum by (job) (up)
      - alert: TargetDown
        expr: up == 0
        for: 1m
        labels:
          severity: page
        annotations:
          summary: "{{ $labels.instance }} is down"
"#;

/// One sample's value, or `None` while the query has no result.
fn single(prometheus: &Prometheus, promql: &str) -> Option<f64> {
    let samples = prometheus.query_vector(promql);
    assert!(samples.len() <= 1, "{promql}: {samples:?}");
    samples.first().map(|(_, v)| *v)
}

#[test]
fn prometheus_scrapes_itself_and_answers_queries() {
    let addr = loopback();
    let prometheus = Prometheus::start_on(addr, &[addr], "/metrics", None);

    wait_until(
        "up{job=\"micromine\"} == 1",
        Duration::from_secs(15),
        || (single(&prometheus, r#"up{job="micromine"}"#)? == 1.0).then_some(()),
    );
    assert!(prometheus.targets_up(), "{}", prometheus.process.log());
    let labels = &prometheus.query_vector(r#"up{job="micromine"}"#)[0].0;
    assert_eq!(labels["instance"], addr.to_string());
    // Hundreds of series: an answer big enough that Go's server sends it chunked.
    let series = prometheus.query_vector(r#"{job="micromine"}"#);
    assert!(series.len() > 100, "{} series", series.len());

    // Every scrape appends samples, so the counter grows between two queries.
    let appended = "sum(prometheus_tsdb_head_samples_appended_total)";
    let first = wait_until("a first appended count", Duration::from_secs(10), || {
        single(&prometheus, appended)
    });
    wait_until("more samples appended", Duration::from_secs(10), || {
        (single(&prometheus, appended)? > first).then_some(())
    });

    // A PromQL syntax error fails the query with Prometheus's own message.
    let panic = catch_unwind(AssertUnwindSafe(|| prometheus.query("sum(up")))
        .expect_err("a malformed query must panic");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("parse error"), "{message}");
}

#[test]
fn rule_files_pass_promtool_and_evaluate_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.yml");
    std::fs::write(&good, RULES).expect("write rules");
    let checked = promtool_check_rules(&good).expect("promtool accepts the rules");
    assert!(checked.contains("SUCCESS: 2 rules found"), "{checked}");

    let broken = dir.path().join("broken.yml");
    std::fs::write(&broken, RULES.replace("up == 0", "up ==")).expect("write rules");
    let complaint = promtool_check_rules(&broken).expect_err("promtool rejects a bad expr");
    assert!(
        complaint.contains("FAILED")
            && complaint.contains(r#""TargetDown": could not parse expression"#),
        "{complaint}"
    );

    let addr = loopback();
    let prometheus = Prometheus::start_on(addr, &[addr], "/metrics", Some(RULES));
    let rules = wait_until("both rules evaluated", Duration::from_secs(15), || {
        let rules = prometheus.rules();
        (rules.len() == 2 && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    });
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    wait_until(
        "the recording rule's series",
        Duration::from_secs(15),
        || (single(&prometheus, r#"job:up:sum{job="micromine"}"#)? == 1.0).then_some(()),
    );
}
