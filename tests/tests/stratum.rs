//! The controller as a Stratum V1 proxy, against a test pool on loopback that checks every
//! share it is sent by itself (coinbase, merkle root, header, target): the handshake,
//! header-only work for the devices, only pool-difficulty shares upstream, `clean_jobs`,
//! difficulty changes, dropped connections, failover and back, TLS, and hostile pool
//! messages. Pool verdicts are compared with what the controller recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use micromine_e2e::stratum_pool::{PoolConfig, PoolEvent, TestPool};
use micromine_e2e::{
    ControllerProcess, Process, create_token, get_text, number, start_agent, wait_until,
};
use serde_json::Value;

const WORKER: &str = "acct.worker";
const PASSWORD: &str = "s3cret";

/// A controller with a `stratum` MicroMiner whose pools are `urls` (primary first).
struct Proxy {
    dir: tempfile::TempDir,
    data: PathBuf,
    controller: ControllerProcess,
    agents: Vec<Process>,
}

fn manifest(urls: &[String], shares_per_minute: u32, failback_seconds: u32) -> String {
    let mut text = format!(
        "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {{name: pool}}\nspec:\n  selector: {{matchLabels: {{site: e2e}}}}\n  workSource:\n    stratum:\n      url: {}\n      user: {WORKER}\n      passwordFile: pool.pass\n      failbackSeconds: {failback_seconds}\n",
        urls[0]
    );
    if urls.len() > 1 {
        text.push_str("      failover:\n");
        for url in &urls[1..] {
            text.push_str(&format!(
                "        - {{url: {url}, user: {WORKER}, passwordFile: pool.pass}}\n"
            ));
        }
    }
    text.push_str(&format!(
        "  sharesPerMinute: {shares_per_minute}\n  assignmentSeconds: 5\n"
    ));
    text
}

impl Proxy {
    fn start(manifest: &str, env: &[(&str, &Path)]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        std::fs::write(manifests.join("pool.pass"), format!("{PASSWORD}\n")).expect("password");
        std::fs::write(manifests.join("pool.yaml"), manifest).expect("manifest");
        let data = dir.path().join("data");
        let controller = ControllerProcess::start_with_env(&manifests, &data, &[], env);
        Proxy {
            dir,
            data,
            controller,
            agents: Vec::new(),
        }
    }

    fn agents(&mut self, names: &[&str]) {
        let token = create_token(&self.data, names.len() as u32);
        for name in names {
            let agent = start_agent(
                &self.controller,
                &token,
                name,
                &self.dir.path().join(name),
                "site=e2e",
            );
            self.agents.push(agent);
        }
    }

    fn miner(&self) -> Value {
        self.controller
            .status()
            .and_then(|s| s["miners"].get(0).cloned())
            .unwrap_or(Value::Null)
    }

    fn pool_status(&self) -> Value {
        self.miner()["status"]["pool"].clone()
    }

    /// Stops the agents and waits until every pool answer is recorded.
    fn stop_agents(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
    }
}

fn pool(difficulty: f64) -> TestPool {
    TestPool::start(PoolConfig {
        difficulty,
        workers: vec![(WORKER.into(), PASSWORD.into())],
        ..PoolConfig::default()
    })
}

/// Waits until the controller has recorded as many pool answers as the pools gave.
fn settle(proxy: &Proxy, pools: &[&TestPool]) -> Value {
    wait_until(
        "the controller to record every pool answer",
        Duration::from_secs(30),
        || {
            let status = proxy.pool_status();
            let answered: usize = pools.iter().map(|p| p.submissions().len()).sum();
            let recorded = number(&status, "/accepted")
                + status["rejectedByReason"]
                    .as_object()
                    .map(|r| {
                        r.iter()
                            // Answered by the controller itself, never sent.
                            .filter(|(reason, _)| {
                                !["session-lost", "job-replaced"].contains(&reason.as_str())
                            })
                            .map(|(_, n)| n.as_u64().unwrap_or(0))
                            .sum::<u64>()
                    })
                    .unwrap_or(0);
            (recorded as usize == answered).then_some(status)
        },
    )
}

/// The difficulty a hash (display hex) meets, from its top 128 bits: plenty of precision
/// to tell 0.0005 from 0.001.
fn hash_difficulty(hash_hex: &str) -> f64 {
    let top = u128::from_str_radix(&hash_hex[..32], 16).unwrap_or(u128::MAX);
    // Difficulty 1 is 0xffff * 2^208; the top 128 bits carry 2^128 of it.
    65535.0 * 2f64.powi(80) / (top as f64).max(1.0)
}

#[test]
fn pool_work_is_split_across_devices_and_only_pool_shares_go_upstream() {
    // Devices aim at 600 shares a minute, far below the pool's difficulty: most of their
    // shares are for the controller's books only.
    let pool = pool(0.002);
    let mut proxy = Proxy::start(&manifest(&[pool.url()], 600, 60), &[]);
    let connected = wait_until("the controller to connect", Duration::from_secs(30), || {
        let status = proxy.pool_status();
        (status["state"] == "Connected").then_some(status)
    });
    assert_eq!(connected["url"], pool.url());
    assert_eq!(connected["failover"], false);
    assert_eq!(connected["difficulty"], 0.002);
    let events = pool.events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PoolEvent::Authorized { worker, ok: true } if worker == WORKER)),
        "authorized with the password from the file: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PoolEvent::Configured { mask: Some(_) })),
        "version rolling negotiated: {events:?}"
    );

    proxy.agents(&["pi-1", "pi-2"]);
    wait_until(
        "pool shares from both devices",
        Duration::from_secs(60),
        || {
            let status = proxy.pool_status();
            (pool.accepted() >= 8 && number(&status, "/accepted") >= 8).then_some(())
        },
    );
    proxy.stop_agents();
    let status = settle(&proxy, &[&pool]);

    // Every share the pool saw, it accepted: right coinbase, merkle root, header, target.
    let submissions = pool.submissions();
    let rejected: Vec<_> = submissions.iter().filter(|s| s.verdict.is_err()).collect();
    assert!(rejected.is_empty(), "the pool rejected {rejected:?}");
    assert_eq!(number(&status, "/accepted") as usize, pool.accepted());
    assert_eq!(number(&status, "/rejected"), 0);
    for s in &submissions {
        let ok = s.verdict.as_ref().expect("accepted");
        assert!(ok.share_difficulty >= 0.002 * 0.999_999, "{s:?}");
    }
    // Version rolling is used: the submissions carry rolled bits inside the mask, and
    // each device worked on several extranonce2 values.
    assert!(submissions.iter().any(|s| s.version_bits.is_some()));
    // The controller checked many more device shares than it sent upstream.
    let miner = proxy.miner();
    let device_shares = number(&miner, "/status/shares/accepted");
    assert!(
        device_shares > submissions.len() as u64,
        "{device_shares} device shares, {} pool shares",
        submissions.len()
    );
    // Pool answers per device add up to the MicroMiner's.
    let devices = proxy.controller.status().expect("status")["devices"].clone();
    let per_device: u64 = devices
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| number(d, "/pool/accepted"))
        .sum();
    assert_eq!(per_device, number(&status, "/accepted"));

    // Prometheus sees the same.
    let metrics = get_text(proxy.controller.http, "/metrics").expect("metrics");
    let series = |prefix: &str, labels: &[&str]| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix) && labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} {labels:?} in\n{metrics}"))
    };
    let accepted = series("micromine_pool_shares_total{", &[r#"result="accepted""#]);
    assert_eq!(accepted as usize, pool.accepted());
    assert_eq!(
        series("micromine_pool_shares_total{", &[r#"reason="stale""#]),
        0.0
    );
    let url = format!(r#"pool="{}""#, pool.url());
    assert_eq!(
        series("micromine_pool_connected{", &[&url, r#"failover="false""#]),
        1.0
    );
    assert_eq!(series("micromine_pool_difficulty{", &[]), 0.002);
}

#[test]
fn clean_jobs_cancel_work_within_a_second_and_a_difficulty_change_is_followed() {
    let pool = pool(0.001);
    let mut proxy = Proxy::start(&manifest(&[pool.url()], 60, 60), &[]);
    proxy.agents(&["gw-1"]);
    wait_until("pool shares", Duration::from_secs(60), || {
        (pool.accepted() >= 3).then_some(())
    });
    let before: u64 = proxy
        .controller
        .assignments()
        .iter()
        .map(|a| number(a, "/header"))
        .max()
        .expect("leases");

    let replaced = pool.current_job();
    let job = pool.notify(true);
    let sent = Instant::now();
    wait_until(
        "every lease to be on the new job",
        Duration::from_secs(10),
        || {
            let leases = proxy.controller.assignments();
            (!leases.is_empty() && leases.iter().all(|a| number(a, "/header") > before))
                .then_some(())
        },
    );
    let took = sent.elapsed();
    eprintln!("clean_jobs: every lease on the new job {took:?} after the notify");
    assert!(
        took < Duration::from_secs(1),
        "old work was cancelled after {took:?}"
    );
    assert_eq!(proxy.pool_status()["job"], job);
    wait_until("shares on the new job", Duration::from_secs(60), || {
        pool.submissions()
            .iter()
            .any(|s| s.job_id == job && s.verdict.is_ok())
            .then_some(())
    });

    // Harder, then easier, in the middle of a job: nothing the controller submits is
    // below what the pool asks for.
    let seen = pool.submissions().len();
    pool.set_difficulty(0.004);
    wait_until(
        "the new difficulty in status",
        Duration::from_secs(10),
        || (proxy.pool_status()["difficulty"] == 0.004).then_some(()),
    );
    wait_until(
        "shares at the new difficulty",
        Duration::from_secs(60),
        || (pool.submissions().len() >= seen + 3).then_some(()),
    );
    // A job sent at the higher difficulty is judged at it alone: a controller still
    // submitting at the old one would now be refused.
    let harder_job = pool.notify(false);
    wait_until(
        "shares of the job sent at the higher difficulty",
        Duration::from_secs(60),
        || {
            (pool
                .submissions()
                .iter()
                .filter(|s| s.job_id == harder_job)
                .count()
                >= 3)
                .then_some(())
        },
    );
    pool.set_difficulty(0.0005);
    let seen = pool.submissions().len();
    // The controller follows down too: it submits shares the old difficulty would not
    // have let through.
    wait_until(
        "a share below the earlier difficulty submitted",
        Duration::from_secs(60),
        || {
            pool.submissions()[seen..]
                .iter()
                .filter_map(|s| s.verdict.as_ref().ok())
                .any(|ok| hash_difficulty(&ok.hash_hex) < 0.001)
                .then_some(())
        },
    );
    proxy.stop_agents();
    let status = settle(&proxy, &[&pool]);
    assert_eq!(pool.rejected("low-difficulty"), 0);
    // A share already on its way when the pool replaced its job may arrive after the
    // clean_jobs (the pool says stale); nothing of the old job is sent once the notify is
    // read, and nothing else is ever stale.
    let stale: Vec<_> = pool
        .submissions()
        .into_iter()
        .filter(|s| s.verdict.as_ref().is_err_and(|r| r.reason == "stale"))
        .collect();
    assert!(stale.iter().all(|s| s.job_id == replaced), "{stale:?}");
    assert!(stale.len() <= 2, "{stale:?}");
    assert_eq!(
        number(&status, "/rejectedByReason/stale") as usize,
        stale.len(),
        "the books agree with the pool: {status}"
    );
    let sent_rejections =
        number(&status, "/rejected") - number(&status, "/rejectedByReason/job-replaced");
    assert_eq!(sent_rejections as usize, stale.len(), "{status}");
}

#[test]
fn a_dropped_pool_is_resumed_a_dead_one_failed_over_and_the_primary_taken_back() {
    let primary = pool(0.001);
    let backup = pool(0.001);
    let mut proxy = Proxy::start(&manifest(&[primary.url(), backup.url()], 60, 3), &[]);
    proxy.agents(&["edge-1"]);
    wait_until("shares at the primary", Duration::from_secs(60), || {
        (primary.accepted() >= 2).then_some(())
    });

    // A dropped connection: the controller comes back and resumes its session, so the
    // work devices hold stays good.
    primary.drop_connections();
    wait_until("a resumed session", Duration::from_secs(30), || {
        primary
            .events()
            .iter()
            .any(|e| matches!(e, PoolEvent::Subscribed { resumed: true, .. }))
            .then_some(())
    });
    let at_drop = primary.accepted();
    wait_until(
        "shares after the reconnect",
        Duration::from_secs(60),
        || (primary.accepted() >= at_drop + 2).then_some(()),
    );

    // The primary dies: the controller moves to the backup.
    primary.set_accepting(false);
    primary.drop_connections();
    wait_until("failover to the backup", Duration::from_secs(60), || {
        let status = proxy.pool_status();
        (status["state"] == "Connected" && status["url"] == backup.url()).then_some(())
    });
    assert_eq!(proxy.pool_status()["failover"], true);
    wait_until("shares at the backup", Duration::from_secs(60), || {
        (backup.accepted() >= 2).then_some(())
    });

    // The primary is back: the controller returns to it.
    primary.set_accepting(true);
    wait_until("back on the primary", Duration::from_secs(60), || {
        let status = proxy.pool_status();
        (status["url"] == primary.url() && status["state"] == "Connected").then_some(())
    });
    let back = primary.accepted();
    wait_until(
        "shares at the primary again",
        Duration::from_secs(60),
        || (primary.accepted() >= back + 2).then_some(()),
    );
    proxy.stop_agents();
    let status = settle(&proxy, &[&primary, &backup]);
    // Both pools accepted everything they were sent, and the controller's books agree.
    assert_eq!(
        primary
            .submissions()
            .iter()
            .filter(|s| s.verdict.is_err())
            .count(),
        0
    );
    assert_eq!(
        backup
            .submissions()
            .iter()
            .filter(|s| s.verdict.is_err())
            .count(),
        0
    );
    assert_eq!(
        number(&status, "/accepted") as usize,
        primary.accepted() + backup.accepted()
    );
}

#[test]
fn hostile_pool_messages_are_logged_and_survived() {
    let pool = pool(0.001);
    let mut proxy = Proxy::start(&manifest(&[pool.url()], 60, 60), &[]);
    proxy.agents(&["gw-9"]);
    wait_until("pool shares", Duration::from_secs(60), || {
        (pool.accepted() >= 2).then_some(())
    });
    for line in [
        "this is not json",
        "[1,2,3]",
        r#"{"id":null,"method":"mining.set_difficulty","params":[-5]}"#,
        r#"{"id":null,"method":"mining.notify","params":["j","zz","","",[],"20000000","1d00ffff","5f5e1000",true]}"#,
        r#"{"id":null,"method":"mining.set_extranonce","params":["abcd",400]}"#,
        r#"{"id":null,"method":"client.reconnect","params":["evil/host",1,1]}"#,
        r#"{"id":99999,"result":true,"error":null}"#,
    ] {
        pool.send_raw(line);
    }
    proxy.controller.process.wait_for_log(
        "client.reconnect: params[0] (host)",
        Duration::from_secs(10),
    );
    let log = proxy.controller.process.log();
    for expected in [
        "pool sent a malformed message; ignored",
        "mining.set_difficulty: params[0] (difficulty) must be a number above 0",
        "mining.notify: params[1] (prevhash)",
        "mining.set_extranonce: params[1] (extranonce2_size)",
    ] {
        assert!(log.contains(expected), "the log names `{expected}`");
    }
    // Still mining on the pool's real job.
    let seen = pool.accepted();
    wait_until("shares after the garbage", Duration::from_secs(60), || {
        (pool.accepted() >= seen + 2).then_some(())
    });
    assert_eq!(proxy.pool_status()["state"], "Connected");

    // A line beyond any real message ends the connection; the controller reconnects.
    pool.send_raw(&"x".repeat(300 * 1024));
    wait_until(
        "a resumed session after the flood",
        Duration::from_secs(30),
        || {
            pool.events()
                .iter()
                .any(|e| matches!(e, PoolEvent::Subscribed { resumed: true, .. }))
                .then_some(())
        },
    );
    proxy
        .controller
        .process
        .wait_for_log("longer than", Duration::from_secs(10));
    let seen = pool.accepted();
    wait_until(
        "shares after the reconnect",
        Duration::from_secs(60),
        || (pool.accepted() >= seen + 2).then_some(()),
    );
    proxy.stop_agents();
}

/// A CA and a pool certificate for 127.0.0.1, as PEM, and the pool's TLS config.
fn tls_pool_config(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("pool key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("pool certificate");
    let ca_file = dir.join("pool-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("CA file");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    (ca_file, Arc::new(config))
}

#[test]
fn stratum_over_tls_checks_the_pools_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_file, config) = tls_pool_config(dir.path());
    let pool = TestPool::start(PoolConfig {
        difficulty: 0.001,
        workers: vec![(WORKER.into(), PASSWORD.into())],
        tls: Some(config),
        ..PoolConfig::default()
    });
    assert!(pool.url().starts_with("stratum+ssl://"));

    // Without the pool's CA the connection is refused, and status says why.
    let untrusting = Proxy::start(&manifest(&[pool.url()], 60, 60), &[]);
    let status = wait_until("a TLS failure in status", Duration::from_secs(30), || {
        let status = untrusting.pool_status();
        status["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("TLS"))
            .then_some(status)
    });
    assert_eq!(status["state"], "Disconnected", "{status}");
    assert!(
        pool.events()
            .iter()
            .all(|e| !matches!(e, PoolEvent::Subscribed { .. })),
        "nothing was said to an unverified pool"
    );
    drop(untrusting);

    let mut proxy = Proxy::start(
        &manifest(&[pool.url()], 60, 60),
        &[("SSL_CERT_FILE", ca_file.as_path())],
    );
    proxy.agents(&["tls-1"]);
    wait_until("pool shares over TLS", Duration::from_secs(60), || {
        (pool.accepted() >= 2).then_some(())
    });
    proxy.stop_agents();
    let status = settle(&proxy, &[&pool]);
    assert_eq!(number(&status, "/accepted") as usize, pool.accepted());
}

#[test]
fn the_pool_changes_the_extranonce_and_moves_the_controller_elsewhere() {
    let first = pool(0.001);
    let second = pool(0.001);
    let mut proxy = Proxy::start(&manifest(&[first.url()], 60, 60), &[]);
    proxy.agents(&["gw-r"]);
    wait_until("shares at the first pool", Duration::from_secs(60), || {
        (first.accepted() >= 2).then_some(())
    });
    let old_extranonce1 = first.submissions()[0].extranonce1.clone();

    // A new extranonce1 on the same connection: work built with the old one is void, and
    // new work uses the new one.
    first.set_extranonce();
    wait_until(
        "shares with the new extranonce1",
        Duration::from_secs(60),
        || {
            (first
                .submissions()
                .iter()
                .filter(|s| s.extranonce1 != old_extranonce1 && s.verdict.is_ok())
                .count()
                >= 2)
                .then_some(())
        },
    );

    // client.reconnect: the pool sends the controller to another address.
    first.reconnect("127.0.0.1", second.addr().port(), 0);
    wait_until(
        "the controller at the new address",
        Duration::from_secs(30),
        || {
            let status = proxy.pool_status();
            (status["state"] == "Connected" && status["url"] == second.url()).then_some(())
        },
    );
    wait_until("shares at the new address", Duration::from_secs(60), || {
        (second.accepted() >= 2).then_some(())
    });
    proxy.stop_agents();
    // The pools' counts and the controller's books agree (a share in flight while the
    // extranonce changed may be refused; it is then counted as refused).
    let status = settle(&proxy, &[&first, &second]);
    assert_eq!(
        number(&status, "/accepted") as usize,
        first.accepted() + second.accepted()
    );
}

/// The chart's pool panels and alerts, evaluated by a real Prometheus scraping a proxy.
#[test]
fn pool_series_feed_the_dashboard_and_the_alerts() {
    use micromine_e2e::observability;
    use micromine_e2e::prometheus::Prometheus;

    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/micromine");
    let pool = pool(0.001);
    let mut proxy = Proxy::start(&manifest(&[pool.url()], 60, 60), &[]);
    let prometheus = Prometheus::start(&[proxy.controller.http], "/metrics");
    proxy.agents(&["gw-prom"]);
    wait_until("pool shares", Duration::from_secs(60), || {
        (pool.accepted() >= 3).then_some(())
    });

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(chart.join("dashboards/micromine.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let queries: Vec<String> = observability::dashboard_exprs(&dashboard)
        .into_iter()
        .filter(|e| e.contains("micromine_pool"))
        .map(|e| observability::substitute_grafana_variables(&e))
        .collect();
    assert!(queries.len() >= 3, "the dashboard has pool panels");
    for promql in &queries {
        wait_until(
            &format!("data for {promql}"),
            Duration::from_secs(30),
            || (!prometheus.query_vector(promql).is_empty()).then_some(()),
        );
    }

    let rules = observability::rule_exprs(
        &std::fs::read_to_string(chart.join("alerts/micromine-rules.yaml")).expect("rules"),
    );
    let rule = |name: &str| {
        rules
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no rule {name}"))
    };
    let disconnected = rule("MicrominePoolDisconnected");
    let rejecting = rule("MicrominePoolRejectingShares");
    assert!(
        prometheus.query_vector(&disconnected).is_empty(),
        "connected"
    );
    assert!(
        prometheus.query_vector(&rejecting).is_empty(),
        "nothing rejected"
    );

    // The pool goes away for good: the alert's condition holds for this MicroMiner.
    pool.set_accepting(false);
    pool.drop_connections();
    let firing = wait_until(
        "the pool-disconnected condition",
        Duration::from_secs(30),
        || {
            let result = prometheus.query_vector(&disconnected);
            (!result.is_empty()).then_some(result)
        },
    );
    assert_eq!(
        firing[0].0.get("miner").map(String::as_str),
        Some("default/pool")
    );
    proxy.stop_agents();
}

#[test]
fn a_crashed_controller_resumes_its_pool_session_and_the_work_devices_hold() {
    let pool = pool(0.001);
    // Long assignments: the device holds work across the restart.
    let text =
        manifest(&[pool.url()], 60, 60).replace("assignmentSeconds: 5", "assignmentSeconds: 20");
    let mut proxy = Proxy::start(&text, &[]);
    proxy.agents(&["gw-crash"]);
    wait_until("shares at the pool", Duration::from_secs(60), || {
        (pool.accepted() >= 2).then_some(())
    });
    let before = pool.submissions().len();
    let (grpc, http) = (proxy.controller.grpc, proxy.controller.http);
    proxy.controller.process.kill();
    proxy.controller = ControllerProcess::start_on(
        &proxy.dir.path().join("manifests"),
        &proxy.data,
        grpc,
        http,
        &[],
        &[],
    );
    wait_until("the pool session resumed", Duration::from_secs(30), || {
        pool.events()
            .iter()
            .any(|e| matches!(e, PoolEvent::Subscribed { resumed: true, .. }))
            .then_some(())
    });
    // A share of a header built before the crash reaches the pool after it, and counts.
    let header = |s: &micromine_e2e::stratum_pool::Submission| {
        (
            s.job_id.clone(),
            s.extranonce1.clone(),
            s.extranonce2.clone(),
            s.version_bits.clone(),
        )
    };
    wait_until(
        "a share of pre-crash work accepted after the crash",
        Duration::from_secs(60),
        || {
            let all = pool.submissions();
            let old: Vec<_> = all[..before].iter().map(header).collect();
            all[before..]
                .iter()
                .any(|s| s.verdict.is_ok() && old.contains(&header(s)))
                .then_some(())
        },
    );
    proxy.stop_agents();
    let status = settle(&proxy, &[&pool]);
    assert_eq!(pool.rejected("stale") + pool.rejected("job-not-found"), 0);
    assert_eq!(number(&status, "/accepted") as usize, pool.accepted());
    assert_eq!(
        number(&proxy.miner(), "/status/shares/stale"),
        0,
        "no device work was voided"
    );
}
