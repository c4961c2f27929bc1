//! The agent as an installed device runs it: settings from an env file, the bootstrap
//! token from a file (never the command line), exit status 78 with the culprit named for
//! configuration it cannot work with, and the static aarch64 and armv7 builds doing all
//! of it under qemu-user.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use micromine_e2e::{Fixture, Process, bin, create_token, number, test_manifest, wait_until};

/// `EX_CONFIG`, which the packaged unit does not restart.
const EXIT_CONFIG: i32 = 78;

/// Leases live this long unless handed back, so a lease that disappears within seconds
/// of a stop was handed back, not expired.
const ASSIGNMENT_SECONDS: u32 = 120;

/// Writes `text` to `path` with `mode`.
fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// An env file as an admin writes one from the packaged template.
fn env_file(controller: &str, name: &str, token_file: &Path, state_dir: &Path) -> String {
    format!(
        "# written by device_install.rs\n\
         MICROMINE_CONTROLLER={controller}\n\
         MICROMINE_NAME=\"{name}\"\n\
         MICROMINE_LABELS=site=e2e\n\
         MICROMINE_TOKEN_FILE={}\n\
         MICROMINE_STATE_DIR={}\n\
         MICROMINE_THREADS=1\n\
         # empty means unset\n\
         MICROMINE_ENGINE=\n",
        token_file.display(),
        state_dir.display()
    )
}

/// Every file in `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read state dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            files.insert(path.clone(), std::fs::read(&path).expect("read state file"));
        }
    }
    files
}

/// Runs `program args` (the agent, or qemu with the agent) to its exit and returns the
/// exit code and stderr. The agent must refuse at once, before it connects anywhere.
fn refused(program: &[&Path], args: &[&str]) -> (Option<i32>, String) {
    let (binary, rest) = program.split_first().expect("a program");
    let mut argv: Vec<&str> = rest
        .iter()
        .map(|p| p.to_str().expect("utf-8 path"))
        .collect();
    argv.extend_from_slice(args);
    let mut agent = Process::start("refused agent", binary, &argv);
    let status = agent.wait(Duration::from_secs(60));
    (status.code(), agent.log())
}

/// Starts an agent (`program` is the binary, or qemu and the binary) with `env` as its
/// only configuration.
fn start(name: &str, program: &[&Path], env: &Path) -> Process {
    let (binary, rest) = program.split_first().expect("a program");
    let mut argv: Vec<&str> = rest
        .iter()
        .map(|p| p.to_str().expect("utf-8 path"))
        .collect();
    argv.extend_from_slice(&["run", "--env-file", env.to_str().expect("utf-8 path")]);
    Process::start(name, binary, &argv)
}

/// Waits until the controller shows `name` mining with at least one accepted share.
fn wait_mining(f: &Fixture, name: &str, timeout: Duration) {
    wait_until(
        &format!("{name} to mine with an accepted share"),
        timeout,
        || {
            let device = f.controller.device(name)?;
            (device["state"] == "mining" && number(&device, "/shares/accepted") >= 1).then_some(())
        },
    );
}

/// SIGTERM: the agent exits 0 and its leases are gone at once (handed back, not left to
/// expire after [`ASSIGNMENT_SECONDS`]).
fn stop_and_hand_back(f: &Fixture, name: &str, agent: &mut Process) {
    let held = || {
        f.controller
            .assignments()
            .into_iter()
            .filter(|a| a["device"] == name)
            .count()
    };
    wait_until(
        &format!("{name} to hold a lease"),
        Duration::from_secs(30),
        || (held() > 0).then_some(()),
    );
    let status = agent.signal("TERM", Duration::from_secs(30));
    assert!(status.success(), "{name} stopped cleanly: {status}");
    wait_until(
        &format!("{name}'s leases to be handed back"),
        Duration::from_secs(10),
        || (held() == 0).then_some(()),
    );
}

#[test]
fn bad_configuration_exits_78_naming_the_culprit_and_keeps_the_enrolled_identity() {
    let f = Fixture::start(&test_manifest("e2e", ASSIGNMENT_SECONDS, 1e12), &[]);
    let dir = f.dir.path();
    let agent_bin = bin("micromine-agent");
    let program = [agent_bin.as_path()];
    let url = f.controller.url();
    let token_file = dir.join("token");
    let state = dir.join("gw-1");
    let env = dir.join("agent.env");
    write_file(&env, &env_file(&url, "gw-1", &token_file, &state), 0o644);

    // Before enrollment, a named token file that is absent is an error.
    let (code, log) = refused(
        &program,
        &["run", "--env-file", env.to_str().expect("utf-8")],
    );
    assert_eq!(code, Some(EXIT_CONFIG), "{log}");
    assert!(
        log.contains(&token_file.display().to_string()) && log.contains("does not exist"),
        "names the missing token file: {log}"
    );

    // A token others can read is refused, naming the file and its mode; the token keeps
    // its use.
    write_file(&token_file, &create_token(&f.data, 1), 0o644);
    let (code, log) = refused(
        &program,
        &["run", "--env-file", env.to_str().expect("utf-8")],
    );
    assert_eq!(code, Some(EXIT_CONFIG), "{log}");
    assert!(
        log.contains(&token_file.display().to_string()) && log.contains("mode 0644"),
        "names the file and its mode: {log}"
    );
    assert!(!state.exists(), "nothing enrolled from a refused token");

    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut agent = start("gw-1", &program, &env);
    wait_mining(&f, "gw-1", Duration::from_secs(60));
    assert!(
        !agent
            .log()
            .contains(&std::fs::read_to_string(&token_file).expect("token")),
        "the token is not logged"
    );
    stop_and_hand_back(&f, "gw-1", &mut agent);
    let enrolled = snapshot(&state);
    assert!(
        !enrolled.is_empty(),
        "enrollment wrote the device's identity"
    );

    let bad = dir.join("bad.env");
    let good_text = env_file(&url, "gw-1", &token_file, &state);
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "a misspelt key",
            good_text.replace("MICROMINE_CONTROLLER=", "MICROMINE_CONTROLER="),
            vec![
                format!("{}:2: unknown key MICROMINE_CONTROLER", bad.display()),
                "did you mean MICROMINE_CONTROLLER".to_string(),
            ],
        ),
        (
            "an unknown key",
            format!("{good_text}MINING_POOL=stratum+tcp://pool\n"),
            vec![format!("{}:10: unknown key MINING_POOL", bad.display())],
        ),
        (
            "a plain-text controller URL",
            good_text.replace("https://", "http://"),
            vec![
                "MICROMINE_CONTROLLER".to_string(),
                "http://".to_string(),
                "https://HOST:PORT".to_string(),
            ],
        ),
        (
            "a token file that is a directory",
            good_text.replace(
                &format!("MICROMINE_TOKEN_FILE={}", token_file.display()),
                &format!("MICROMINE_TOKEN_FILE={}", dir.display()),
            ),
            vec![format!("{}: is not a regular file", dir.display())],
        ),
    ];
    for (what, text, wanted) in cases {
        write_file(&bad, &text, 0o644);
        let (code, log) = refused(
            &program,
            &["run", "--env-file", bad.to_str().expect("utf-8")],
        );
        assert_eq!(code, Some(EXIT_CONFIG), "{what}: {log}");
        for needle in wanted {
            assert!(log.contains(&needle), "{what}: {needle:?} in {log}");
        }
    }

    // World-readable again, after enrollment: still refused (the secret is exposed).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o604)).expect("chmod");
    let (code, log) = refused(
        &program,
        &["run", "--env-file", env.to_str().expect("utf-8")],
    );
    assert_eq!(code, Some(EXIT_CONFIG), "{log}");
    assert!(
        log.contains("mode 0604") && log.contains("others can read"),
        "{log}"
    );
    std::fs::remove_file(&token_file).expect("rm token");

    // A state directory of another user (only root can make one).
    if std::fs::metadata(dir).expect("stat").uid() == 0 {
        std::os::unix::fs::chown(&state, Some(65534), None).expect("chown");
        let (code, log) = refused(
            &program,
            &["run", "--env-file", env.to_str().expect("utf-8")],
        );
        std::os::unix::fs::chown(&state, Some(0), None).expect("chown back");
        assert_eq!(code, Some(EXIT_CONFIG), "{log}");
        assert!(
            log.contains(&state.display().to_string()) && log.contains("owned by uid 65534"),
            "{log}"
        );
    } else {
        eprintln!("not root: the state directory of another user is not tried");
    }
    assert_eq!(
        snapshot(&state),
        enrolled,
        "no refusal touched the identity"
    );

    // The token is spent and gone; the device carries on with its certificate.
    let mut agent = start("gw-1", &program, &env);
    wait_mining(&f, "gw-1", Duration::from_secs(60));
    agent.wait_for_log("needs none", Duration::from_secs(5));
    stop_and_hand_back(&f, "gw-1", &mut agent);
}

/// A static agent for another architecture and the qemu-user emulator that runs it.
struct CrossAgent {
    arch: String,
    qemu: PathBuf,
    binary: PathBuf,
}

/// `MICROMINE_CROSS_AGENTS`: `ARCH=QEMU:BINARY` entries separated by spaces, set by
/// scripts/test from the binaries scripts/dist builds.
fn cross_agents() -> Option<Vec<CrossAgent>> {
    let spec = std::env::var("MICROMINE_CROSS_AGENTS").ok()?;
    let agents: Vec<CrossAgent> = spec
        .split_whitespace()
        .map(|entry| {
            let (arch, rest) = entry.split_once('=').unwrap_or_else(|| {
                panic!("MICROMINE_CROSS_AGENTS: {entry:?} is not ARCH=QEMU:BINARY")
            });
            let (qemu, binary) = rest.split_once(':').unwrap_or_else(|| {
                panic!("MICROMINE_CROSS_AGENTS: {entry:?} is not ARCH=QEMU:BINARY")
            });
            for path in [qemu, binary] {
                assert!(
                    Path::new(path).is_file(),
                    "MICROMINE_CROSS_AGENTS: {path} is missing"
                );
            }
            CrossAgent {
                arch: arch.to_string(),
                qemu: PathBuf::from(qemu),
                binary: PathBuf::from(binary),
            }
        })
        .collect();
    assert!(!agents.is_empty(), "MICROMINE_CROSS_AGENTS is empty");
    Some(agents)
}

#[test]
fn static_arm_agents_under_qemu_enroll_from_a_token_file_mine_and_hand_their_work_back() {
    let Some(agents) = cross_agents() else {
        eprintln!(
            "SKIPPED: MICROMINE_CROSS_AGENTS is not set (scripts/test sets it to the static \
             aarch64 and armv7 agents and qemu-user)"
        );
        return;
    };
    let f = Fixture::start(&test_manifest("e2e", ASSIGNMENT_SECONDS, 1e12), &[]);
    let dir = f.dir.path();
    // One token for the whole rollout, as an operator would make for many devices.
    let token_file = dir.join("token");
    write_file(
        &token_file,
        &create_token(&f.data, agents.len() as u32),
        0o600,
    );
    let url = f.controller.url();

    let mut running = Vec::new();
    for agent in &agents {
        let program = [agent.qemu.as_path(), agent.binary.as_path()];
        let name = format!("qemu-{}", agent.arch);
        let version = micromine_e2e::run_to_end(
            &agent.qemu,
            &[agent.binary.to_str().expect("utf-8"), "--version"],
        );
        eprintln!("{name}: {}", version.trim());

        // Under qemu too, bad input is named before anything happens.
        let plain = dir.join(format!("{name}-plain.env"));
        write_file(
            &plain,
            &env_file(
                &url.replace("https://", "http://"),
                &name,
                &token_file,
                &dir.join(&name),
            ),
            0o644,
        );
        let (code, log) = refused(
            &program,
            &["run", "--env-file", plain.to_str().expect("utf-8")],
        );
        assert_eq!(code, Some(EXIT_CONFIG), "{name}: {log}");
        assert!(log.contains("https://HOST:PORT"), "{name}: {log}");

        let env = dir.join(format!("{name}.env"));
        write_file(
            &env,
            &env_file(&url, &name, &token_file, &dir.join(&name)),
            0o644,
        );
        running.push((name.clone(), start(&name, &program, &env)));
    }
    // Both at once: emulated, each is slow to start, and the waits overlap.
    for (name, agent) in &mut running {
        wait_mining(&f, name, Duration::from_secs(180));
        let device = f.controller.device(name).expect("device");
        eprintln!(
            "{name}: enrolled and mining, {} accepted shares, {} H/s reported",
            number(&device, "/shares/accepted"),
            device["reportedHashrate"]
        );
        stop_and_hand_back(&f, name, agent);
    }
}
