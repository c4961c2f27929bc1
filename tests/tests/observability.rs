//! What an operator's Prometheus sees: a real Prometheus scraping a quickstart-sized
//! fleet (a standalone controller, three agents) and the series it must find moving.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use micromine_e2e::observability;
use micromine_e2e::prometheus::{Prometheus, promtool_check_rules, promtool_test_rules};
use micromine_e2e::{Fixture, create_token, fake_sysfs, get_json, test_manifest, wait_until};

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
    // With economics, so the energy, cost and revenue panels have data too. Blocks of the
    // test network (difficulty 1e12) are out of reach of three test devices (~1e-11 blocks
    // an hour), so only an absurd block value makes them pay.
    let manifest = format!(
        "{}  economics:\n    energyPricePerKWh: 0.12\n    coinPrice: 1e15\n    blockReward: 1\n",
        test_manifest("obs", 5, 1e12)
    );
    let fleet = Fixture::start(&manifest, &[]);
    let token = create_token(&fleet.data, 3);
    // Each device reads its own (fake) sensors: 50, 60 and 70 °C, 2, 3 and 4 W.
    let _agents: Vec<_> = [
        ("obs-1", 50.0, 2.0),
        ("obs-2", 60.0, 3.0),
        ("obs-3", 70.0, 4.0),
    ]
    .iter()
    .map(|(name, celsius, watts)| {
        let sysfs = fake_sysfs(
            &fleet.dir.path().join(format!("{name}-sys")),
            *celsius,
            *watts,
        );
        let sysfs = sysfs.display().to_string();
        fleet.mining_agent_with(&token, name, &["--sysfs-root", &sysfs])
    })
    .collect();
    let rules = std::fs::read_to_string(chart_file("alerts/micromine-rules.yaml"))
        .expect("the chart's alert rules");
    let prometheus = Prometheus::start_with_rules(&[fleet.controller.http], "/metrics", &rules);
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
    // What the devices say about themselves reaches Prometheus through the controller.
    wait_until("device readings", Duration::from_secs(30), || {
        (total(
            &prometheus,
            r#"micromine_site_max_temperature_celsius{site="e2e"}"#,
        ) == 70.0)
            .then_some(())
    });
    assert_eq!(
        total(
            &prometheus,
            r#"micromine_site_mean_temperature_celsius{site="e2e"}"#
        ),
        60.0
    );
    // Economics: the devices' measured 9 W at 0.12 per kWh; energy accumulates.
    wait_until("energy cost per hour", Duration::from_secs(30), || {
        let cost = total(
            &prometheus,
            r#"micromine_energy_cost_per_hour{miner="default/obs"}"#,
        );
        ((cost - 9.0 / 1000.0 * 0.12).abs() < 1e-9).then_some(())
    });
    let energy = r#"micromine_energy_joules_total{miner="default/obs"}"#;
    let drawn = wait_until("energy drawn", Duration::from_secs(30), || {
        let joules = total(&prometheus, energy);
        (joules > 0.0).then_some(joules)
    });
    wait_until(
        "energy to keep accumulating",
        Duration::from_secs(30),
        || (total(&prometheus, energy) > drawn).then_some(()),
    );
    assert_eq!(
        total(&prometheus, r#"micromine_profitable{miner="default/obs"}"#),
        1.0,
        "1e15 per block pays for 9 W"
    );
    let status = fleet.controller.status().expect("status");
    let economics = &status["miners"][0]["status"]["economics"];
    assert_eq!(economics["powerWatts"], 9.0, "{economics}");
    let readings = &fleet.device("obs-3")["readings"];
    assert_eq!(readings["temperatureC"], 70.0, "{readings}");
    assert_eq!(readings["batteryPercent"], 80.0, "{readings}");
    assert_eq!(readings["onBattery"], false, "{readings}");
    wait_until("reported power", Duration::from_secs(30), || {
        (total(&prometheus, r#"micromine_power_watts{miner="default/obs"}"#) == 9.0).then_some(())
    });
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

    // Every query of the chart's dashboard runs against this fleet's series; those that
    // read what a standalone fleet has must return data.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_file("dashboards/micromine.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut empty = Vec::new();
    for expr in observability::dashboard_exprs(&dashboard) {
        let promql = observability::substitute_grafana_variables(&expr);
        let data = prometheus.query(&promql);
        let has_data = data["result"].as_array().is_none_or(|r| !r.is_empty());
        // Kubernetes-only series (reconciles) have nothing to say in standalone mode, with
        // every device mining no device is offline, throttled or paused, and pool series
        // exist only for stratum work (their panels are checked in tests/tests/stratum.rs).
        let nothing_to_show = [
            "micromine_reconcile",
            "offline",
            "throttled",
            "paused",
            "micromine_pool",
        ]
        .iter()
        .any(|word| promql.contains(word));
        if !has_data && !nothing_to_show {
            empty.push(promql);
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );

    // The alert rules load and evaluate without error; with every device mining and
    // nothing wrong, none fires. (One may be pending: Prometheus started seconds ago, so
    // `increase(...[15m])` over accepted shares may not have two samples yet; that is what
    // the rules' `for:` is for.)
    for (_, expr) in observability::rule_exprs(&rules) {
        prometheus.query(&expr);
    }
    wait_until("every rule evaluated", Duration::from_secs(30), || {
        let rules = prometheus.rules();
        (!rules.is_empty()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z"))
        .then_some(())
    });
    let firing: Vec<String> = prometheus
        .rules()
        .iter()
        .filter(|r| r["state"] == "firing")
        .map(|r| r["name"].to_string())
        .collect();
    assert!(firing.is_empty(), "alerts on a healthy fleet: {firing:?}");
}

#[test]
fn the_chart_alert_rules_pass_promtool() {
    let checked = promtool_check_rules(&chart_file("alerts/micromine-rules.yaml"))
        .unwrap_or_else(|complaint| panic!("promtool check rules: {complaint}"));
    assert!(checked.contains("SUCCESS"), "{checked}");
}

#[test]
fn slow_assignments_fire_the_latency_alert_and_fast_ones_do_not() {
    // Two controllers over 40 minutes: "slow" answers every request in 250-500 ms, "fast"
    // within 5 ms. Only the slow one alerts, and only after its 15 minutes pending.
    const ALERT: &str = "MicromineAssignmentLatencyHigh";
    let rules_path = chart_file("alerts/micromine-rules.yaml");
    let rules: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(&rules_path).expect("rules"))
            .expect("rules YAML");
    let rule = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .find(|r| r["alert"] == ALERT)
        .unwrap_or_else(|| panic!("no {ALERT} rule"));
    // p99 of a uniform 250-500 ms bucket, as Prometheus interpolates and humanizes it.
    let render = |template: &serde_json::Value| {
        template
            .as_str()
            .unwrap_or_default()
            .trim()
            .replace("{{ $value | humanizeDuration }}", "497.5ms")
    };
    let mut input_series = Vec::new();
    for (le, slow, fast) in [
        ("0.005", 0, 60),
        ("0.25", 0, 60),
        ("0.5", 60, 60),
        ("+Inf", 60, 60),
    ] {
        for (job, per_minute) in [("slow", slow), ("fast", fast)] {
            input_series.push(serde_json::json!({
                "series": format!(r#"micromine_assignment_latency_seconds_bucket{{job="{job}",le="{le}"}}"#),
                "values": format!("0+{per_minute}x40"),
            }));
        }
    }
    let test = serde_json::json!({
        "rule_files": [rules_path],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input_series,
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": ALERT, "exp_alerts": []},
                {"eval_time": "30m", "alertname": ALERT, "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "job": "slow"},
                    "exp_annotations": {
                        "summary": render(&rule["annotations"]["summary"]),
                        "description": render(&rule["annotations"]["description"]),
                    },
                }]},
            ],
        }],
    });
    // YAML is a superset of JSON: promtool reads this as it is.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("latency-test.yaml");
    std::fs::write(&path, test.to_string()).expect("write the rule test");
    let passed = promtool_test_rules(&path)
        .unwrap_or_else(|complaint| panic!("promtool test rules: {complaint}"));
    assert!(passed.contains("SUCCESS"), "{passed}");
}

/// A file of the Helm chart.
fn chart_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/micromine")
        .join(path)
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
