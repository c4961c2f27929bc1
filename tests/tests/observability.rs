//! What an operator's Prometheus sees: a real Prometheus scraping a quickstart-sized
//! fleet (a standalone controller, three agents) and the series it must find moving.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use micromine_e2e::prometheus::Prometheus;
use micromine_e2e::{Fixture, create_token, get_json, test_manifest, wait_until};

/// The sum of an instant vector, 0 when it is empty.
fn total(prometheus: &Prometheus, promql: &str) -> f64 {
    prometheus
        .query_vector(promql)
        .iter()
        .map(|(_, value)| value)
        .sum()
}

/// A bare HTTP/1.1 request (the log-level endpoint takes PUT); returns status and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the controller's HTTP port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn prometheus_scrapes_a_quickstart_sized_fleet_and_the_key_series_move() {
    let fleet = Fixture::start(&test_manifest("obs", 5, 1e12), &[]);
    let token = create_token(&fleet.data, 3);
    let _agents: Vec<_> = ["obs-1", "obs-2", "obs-3"]
        .iter()
        .map(|name| fleet.mining_agent(&token, name))
        .collect();
    let prometheus = Prometheus::start(&[fleet.controller.http], "/metrics");
    wait_until(
        "Prometheus to scrape the controller",
        Duration::from_secs(30),
        || prometheus.targets_up().then_some(()),
    );

    let accepted = r#"micromine_shares_total{miner="default/obs",result="accepted"}"#;
    let first = wait_until(
        "accepted shares in Prometheus",
        Duration::from_secs(60),
        || {
            let value = total(&prometheus, accepted);
            (value > 0.0).then_some(value)
        },
    );
    wait_until(
        "the accepted-share counter to increase",
        Duration::from_secs(60),
        || (total(&prometheus, accepted) > first).then_some(()),
    );
    // The same counter as Prometheus computes rates from it.
    wait_until(
        "a positive accepted-share rate",
        Duration::from_secs(30),
        || (total(&prometheus, &format!("rate({accepted}[30s])")) > 0.0).then_some(()),
    );

    assert_eq!(
        total(
            &prometheus,
            r#"micromine_devices{miner="default/obs",state="mining",site="e2e"}"#
        ),
        3.0
    );
    assert_eq!(total(&prometheus, "micromine_sessions_active"), 3.0);
    assert!(total(&prometheus, "micromine_assignments_active") >= 3.0);
    assert_eq!(total(&prometheus, "micromine_controller_serving"), 1.0);
    wait_until("effective hash rate", Duration::from_secs(60), || {
        (total(
            &prometheus,
            r#"micromine_hashrate_hashes_per_second{miner="default/obs",kind="effective"}"#,
        ) > 0.0)
            .then_some(())
    });
    assert!(
        total(
            &prometheus,
            r#"micromine_hashrate_hashes_per_second{miner="default/obs",kind="nominal"}"#
        ) > 0.0
    );
    assert!(
        total(
            &prometheus,
            r#"micromine_site_hashrate_hashes_per_second{site="e2e",kind="reported"}"#
        ) > 0.0
    );
    // Three enrollments, each counted once.
    assert_eq!(
        total(
            &prometheus,
            r#"micromine_enrollments_total{outcome="enrolled"}"#
        ),
        3.0
    );
    // Latency histograms have observations and sensible quantiles.
    assert!(
        total(
            &prometheus,
            "micromine_share_verification_duration_seconds_count"
        ) > 0.0
    );
    let p99 = total(
        &prometheus,
        "histogram_quantile(0.99, sum by (le) (rate(micromine_ledger_commit_duration_seconds_bucket[1m])))",
    );
    assert!(p99 > 0.0 && p99 < 10.0, "ledger commit p99 {p99} s");
    assert!(
        total(
            &prometheus,
            r#"micromine_certificate_expiry_timestamp_seconds{kind="ca"}"#
        ) > 2e9,
        "the CA outlives 2033"
    );
    // The probe the chart uses says what it is ready with.
    let ready = get_json(fleet.controller.http, "/readyz").expect("/readyz answers 200");
    assert_eq!(ready["role"], "standalone", "{ready}");
    assert_eq!(
        ready["workSources"]["default/obs"]["connected"], true,
        "{ready}"
    );
    // No per-device series unless asked for.
    assert!(
        prometheus
            .query_vector("micromine_device_hashrate_hashes_per_second")
            .is_empty()
    );
}

#[test]
fn the_log_filter_changes_at_run_time_from_loopback() {
    let fleet = Fixture::start(&test_manifest("logs", 5, 1e12), &[]);
    let http_addr = fleet.controller.http;
    let (status, filter) = http(http_addr, "GET", "/loglevel", "");
    assert_eq!(status, 200, "{filter}");
    assert!(filter.contains("info"), "{filter}");

    let (status, changed) = http(http_addr, "PUT", "/loglevel", "debug");
    assert_eq!((status, changed.trim()), (200, "debug"));
    fleet
        .controller
        .process
        .wait_for_log("log filter changed", Duration::from_secs(10));
    assert_eq!(http(http_addr, "GET", "/loglevel", "").1.trim(), "debug");

    let (status, problem) = http(http_addr, "PUT", "/loglevel", "info,[oops");
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem.contains("info,[oops"),
        "the error names the directive: {problem}"
    );
    assert_eq!(
        http(http_addr, "GET", "/loglevel", "").1.trim(),
        "debug",
        "a bad filter changes nothing"
    );
}
