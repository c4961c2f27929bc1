//! `run --listen-addresses-file`: a controller asked for port 0 reports the ports it got,
//! so tests (and operators' scripts) never have to guess a free one and race for it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use micromine_e2e::{ControllerProcess, Process, bin, get_json, run_to_end, test_manifest};

fn manifests(dir: &std::path::Path) -> std::path::PathBuf {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("e2e.yaml"), test_manifest("e2e", 5, 1e12)).expect("write");
    manifests
}

#[test]
fn port_0_gives_every_listener_its_own_connectable_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = manifests(dir.path());
    // Two controllers at once, both on port 0 (what ControllerProcess asks for).
    let a = ControllerProcess::start(&manifests, &dir.path().join("a"));
    let b = ControllerProcess::start(&manifests, &dir.path().join("b"));
    let ports: Vec<u16> = [a.grpc, a.http, b.grpc, b.http]
        .iter()
        .map(SocketAddr::port)
        .collect();
    assert!(ports.iter().all(|p| *p != 0), "resolved ports: {ports:?}");
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "every listener its own port: {ports:?}");
    for controller in [&a, &b] {
        for addr in [controller.grpc, controller.http] {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        }
        // The HTTP address is the controller's own, not something else's that happens to
        // listen there; the log names the same gRPC address.
        assert!(get_json(controller.http, "/readyz").is_some());
        let running = controller
            .process
            .wait_for_log("controller running", Duration::from_secs(5));
        assert!(
            running.contains(&controller.grpc.to_string()),
            "{running} vs {}",
            controller.grpc
        );
    }
    // Agents use the reported address: b's ledger sees its device mine.
    let token = micromine_e2e::create_token(&dir.path().join("b"), 1);
    let _agent = micromine_e2e::start_agent(
        &b,
        &token,
        "gw-listen",
        &dir.path().join("gw-listen"),
        "site=e2e",
    );
    micromine_e2e::wait_until("the agent to mine", Duration::from_secs(30), || {
        (b.device("gw-listen")?["state"] == "mining").then_some(())
    });
}

#[test]
fn the_address_file_is_documented_and_a_failed_start_leaves_none_behind() {
    let help = run_to_end(&bin("micromine-controller"), &["run", "--help"]);
    assert!(help.contains("--listen-addresses-file"), "{help}");

    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = manifests(dir.path());
    // Last run's file, and a gRPC port someone else holds: this run never gets going, and
    // a script waiting for the file must not find the old addresses there.
    let file = dir.path().join("listen.json");
    std::fs::write(&file, r#"{"grpc":"127.0.0.1:1","http":"127.0.0.1:2"}"#).expect("write");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let (manifests, data, file_arg) = (
        manifests.display().to_string(),
        dir.path().join("data").display().to_string(),
        file.display().to_string(),
    );
    let mut controller = Process::start(
        "controller",
        &bin("micromine-controller"),
        &[
            "run",
            "--manifests",
            &manifests,
            "--data-dir",
            &data,
            "--listen",
            &taken_addr,
            "--http-listen",
            "127.0.0.1:0",
            "--listen-addresses-file",
            &file_arg,
        ],
    );
    let status = controller.wait(Duration::from_secs(30));
    assert!(!status.success(), "started on a taken port: {status}");
    assert!(
        controller.log().contains(&taken_addr),
        "says which address: {}",
        controller.log()
    );
    assert!(!file.exists(), "the stale address file is gone");
}
