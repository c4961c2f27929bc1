//! Harness for end-to-end tests: start the real `micromine-controller` and
//! `micromine-agent` binaries on loopback, read their logs and the status API, and wait for
//! conditions (never for fixed times).
//!
//! The binaries come from the same target directory as the test executable; the test
//! command (`scripts/test`) builds them first.
//!
//! Layout: this file (processes, polling, the standalone controller fixture); `raw`
//! (hand-made gRPC clients for hostile-agent tests); `fake_api` (an in-memory Kubernetes
//! API server for `run --kubernetes`); `prometheus` (a real Prometheus scraping loopback
//! targets, for PromQL queries and rule files); `observability` (the chart's dashboard
//! queries and alerting rules' PromQL, ready to evaluate against a real Prometheus);
//! `stratum_pool` (a Stratum V1 pool, written independently of the controller's client,
//! that judges every share as a real pool would).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod fake_api;
pub mod observability;
pub mod prometheus;
pub mod proxy;
pub mod raw;
pub mod stratum_pool;

/// Path of a workspace binary next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory layout");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo test --workspace` or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago: someone else may take it before it is
/// used, so only for servers that cannot report the port they bound (Prometheus, a
/// Kubernetes-mode controller). A standalone controller binds port 0 and says what it
/// got ([`ControllerProcess::start`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` saying
/// what was awaited.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process whose stderr is collected line by line.
pub struct Process {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<String>>,
    /// The threads copying stderr and stdout; joined once the process has exited, so that
    /// its last words are in [`Process::log`] when [`Process::wait`] returns.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Starts `binary` with `args`.
    pub fn start(name: &str, binary: &Path, args: &[&str]) -> Process {
        Process::start_with_env(name, binary, args, &[])
    }

    /// Starts `binary` with `args` and extra environment variables (`KUBECONFIG`).
    pub fn start_with_env(
        name: &str,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Process {
        let mut child = Command::new(binary)
            .args(args)
            // Handshake failures are logged at debug; the tests read them. `env` may say
            // otherwise (a benchmark's thousands of devices log less).
            .env("RUST_LOG", "info,micromine_controller::tls=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stdout: Arc<Mutex<String>> = Arc::default();
        let mut readers = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().expect("log lock").push(line);
                }
            }));
        }
        if let Some(mut out) = child.stdout.take() {
            let stdout = stdout.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stdout
                        .lock()
                        .expect("stdout lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        Process {
            name: name.to_string(),
            child,
            lines,
            stdout,
            readers,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        wait_until(&format!("{} to log {needle:?}", self.name), timeout, || {
            self.lines
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stderr so far.
    pub fn log(&self) -> String {
        self.lines.lock().expect("log lock").join("\n")
    }

    /// Stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout lock").clone()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (`INT`, `TERM`), then waits for the exit status.
    pub fn signal(&mut self, signal: &str, timeout: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        self.wait(timeout)
    }

    /// Waits for the process to exit by itself, and for what it wrote to be read.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let name = self.name.clone();
        let status = wait_until(&format!("{name} to exit"), timeout, || {
            self.child.try_wait().ok().flatten()
        });
        // The pipes reach their end with the process, unless a child of its holds them:
        // then what was read by now has to do.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.readers.iter().all(|r| r.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.log());
        }
    }
}

/// GET `path` from an HTTP server and parse the JSON body.
pub fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    serde_json::from_str(&get_text(addr, path)?).ok()
}

/// GET `path` from an HTTP server: the body of a 200 answer.
pub fn get_text(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(body.to_string())
}

/// Runs a command to completion and returns its stdout, panicking with stderr on failure.
pub fn run_to_end(binary: &Path, args: &[&str]) -> String {
    run_to_end_with_env(binary, args, &[])
}

/// [`run_to_end`] with extra environment variables (`KUBECONFIG`).
pub fn run_to_end_with_env(binary: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let output = Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
    assert!(
        output.status.success(),
        "{} {:?} failed: {}",
        binary.display(),
        args,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A standalone controller on loopback. [`ControllerProcess::start`] asks for port 0 and
/// learns the ports the system picked from `--listen-addresses-file`, so tests never race
/// each other for a port; [`ControllerProcess::start_on`] takes fixed addresses, for a
/// restart that must come back where the agents know it.
pub struct ControllerProcess {
    /// The process.
    pub process: Process,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Holds the listen-addresses file (none for [`ControllerProcess::adopt`]).
    _addresses: Option<tempfile::TempDir>,
}

/// Any free loopback port: the controller binds it and reports what it got.
const ANY_LOOPBACK_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

impl ControllerProcess {
    /// Starts `micromine-controller run` on loopback ports the system picks and waits
    /// until it is ready.
    pub fn start(manifests: &Path, data_dir: &Path) -> ControllerProcess {
        ControllerProcess::start_with(manifests, data_dir, &[])
    }

    /// [`ControllerProcess::start`] with extra command-line arguments.
    pub fn start_with(manifests: &Path, data_dir: &Path, extra: &[&str]) -> ControllerProcess {
        ControllerProcess::start_with_env(manifests, data_dir, extra, &[])
    }

    /// [`ControllerProcess::start_with`] and extra environment variables (`OTEL_*`).
    pub fn start_with_env(
        manifests: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> ControllerProcess {
        ControllerProcess::start_on(
            manifests,
            data_dir,
            ANY_LOOPBACK_PORT,
            ANY_LOOPBACK_PORT,
            extra,
            env,
        )
    }

    /// Starts the controller on the given addresses (port 0: any), e.g. those of the one
    /// it replaces, and waits until it is ready.
    pub fn start_on(
        manifests: &Path,
        data_dir: &Path,
        grpc: SocketAddr,
        http: SocketAddr,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> ControllerProcess {
        let addresses = tempfile::tempdir().expect("tempdir");
        let file = addresses.path().join("listen.json");
        let (manifests, data_dir, file_arg) = (
            manifests.display().to_string(),
            data_dir.display().to_string(),
            file.display().to_string(),
        );
        let (grpc_arg, http_arg) = (grpc.to_string(), http.to_string());
        let mut args = vec![
            "run",
            "--manifests",
            &manifests,
            "--data-dir",
            &data_dir,
            "--listen",
            &grpc_arg,
            "--http-listen",
            &http_arg,
            "--listen-addresses-file",
            &file_arg,
        ];
        args.extend_from_slice(extra);
        let mut process =
            Process::start_with_env("controller", &bin("micromine-controller"), &args, env);
        let bound = listen_addresses(&mut process, &file, Duration::from_secs(30));
        wait_until("controller /readyz", Duration::from_secs(30), || {
            get_json(bound.http, "/readyz")
        });
        ControllerProcess {
            process,
            grpc: bound.grpc,
            http: bound.http,
            _addresses: Some(addresses),
        }
    }

    /// A controller the caller started on addresses it chose: Kubernetes mode, whose
    /// listeners change with its role and which has no `--listen-addresses-file`.
    pub fn adopt(process: Process, grpc: SocketAddr, http: SocketAddr) -> ControllerProcess {
        ControllerProcess {
            process,
            grpc,
            http,
            _addresses: None,
        }
    }

    /// `https://` URL for agents.
    pub fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// The whole status document.
    pub fn status(&self) -> Option<Value> {
        get_json(self.http, "/api/v1/status")
    }

    /// The device's view in the status document.
    pub fn device(&self, name: &str) -> Option<Value> {
        self.status()?["devices"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
    }

    /// Live leases.
    pub fn assignments(&self) -> Vec<Value> {
        get_json(self.http, "/api/v1/assignments")
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// Where a controller's listeners are bound, from its `--listen-addresses-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddresses {
    /// gRPC.
    pub grpc: SocketAddr,
    /// HTTP.
    pub http: SocketAddr,
}

/// Waits for `controller` to write its `--listen-addresses-file` at `file`, and reads it;
/// panics with the controller's log if it exits first.
pub fn listen_addresses(
    controller: &mut Process,
    file: &Path,
    timeout: Duration,
) -> ListenAddresses {
    wait_until("the controller's listen addresses", timeout, || {
        if let Some(status) = controller.exited() {
            panic!(
                "the controller exited ({status}) before it was listening:\n{}",
                controller.log()
            );
        }
        // Written atomically: once there, it is whole.
        let json: Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        let address = |key: &str| -> Option<SocketAddr> { json[key].as_str()?.parse().ok() };
        Some(ListenAddresses {
            grpc: address("grpc")?,
            http: address("http")?,
        })
    })
}

/// Creates a bootstrap token with the controller CLI.
pub fn create_token(data_dir: &Path, uses: u32) -> String {
    run_to_end(
        &bin("micromine-controller"),
        &[
            "token",
            "create",
            "--data-dir",
            &data_dir.display().to_string(),
            "--uses",
            &uses.to_string(),
        ],
    )
    .trim()
    .to_string()
}

/// A loopback address with a port that was free a moment ago (see [`free_port`]).
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A controller on loopback ports of its own with `manifest` as its only MicroMiner file.
pub struct Fixture {
    /// Holds the directories.
    pub dir: tempfile::TempDir,
    /// The data directory.
    pub data: PathBuf,
    /// The running controller.
    pub controller: ControllerProcess,
}

impl Fixture {
    /// Starts a controller with `extra` arguments.
    pub fn start(manifest: &str, extra: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("mkdir");
        std::fs::write(manifests.join("test.yaml"), manifest).expect("write manifest");
        let data = dir.path().join("data");
        let controller = ControllerProcess::start_with(&manifests, &data, extra);
        Fixture {
            dir,
            data,
            controller,
        }
    }

    /// Stops the controller (SIGTERM, as an operator would) and starts it again on the
    /// same addresses and directories with `extra` arguments.
    pub fn restart(&mut self, extra: &[&str]) {
        let status = self
            .controller
            .process
            .signal("TERM", Duration::from_secs(30));
        assert!(status.success(), "the controller stopped cleanly: {status}");
        self.controller = ControllerProcess::start_on(
            &self.dir.path().join("manifests"),
            &self.data,
            self.controller.grpc,
            self.controller.http,
            extra,
            &[],
        );
    }

    /// Starts an agent named `name` (state in `<dir>/<name>`, label `site=e2e`) that
    /// enrolls with `token`, and waits until the controller shows it mining.
    pub fn mining_agent(&self, token: &str, name: &str) -> Process {
        self.mining_agent_with(token, name, &[])
    }

    /// [`Fixture::mining_agent`] with extra arguments.
    pub fn mining_agent_with(&self, token: &str, name: &str, extra: &[&str]) -> Process {
        let agent = start_agent_with(
            &self.controller,
            token,
            name,
            &self.dir.path().join(name),
            "site=e2e",
            extra,
            &[],
        );
        wait_until(&format!("{name} to mine"), Duration::from_secs(30), || {
            (self.controller.device(name)?["state"] == "mining").then_some(())
        });
        agent
    }

    /// The device's view in the status document, or panics.
    pub fn device(&self, name: &str) -> Value {
        self.controller
            .device(name)
            .unwrap_or_else(|| panic!("device {name} not in the status"))
    }
}

/// Starts an agent with one hashing thread.
pub fn start_agent(
    controller: &ControllerProcess,
    token: &str,
    name: &str,
    state_dir: &Path,
    labels: &str,
) -> Process {
    start_agent_with(controller, token, name, state_dir, labels, &[], &[])
}

/// [`start_agent`] with extra arguments (`--sysfs-root`) and environment variables
/// (`OTEL_*`).
pub fn start_agent_with(
    controller: &ControllerProcess,
    token: &str,
    name: &str,
    state_dir: &Path,
    labels: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Process {
    let url = controller.url();
    let state_dir = state_dir.display().to_string();
    let mut args = vec![
        "run",
        "--controller",
        &url,
        "--token",
        token,
        "--name",
        name,
        "--state-dir",
        &state_dir,
        "--labels",
        labels,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    Process::start_with_env(name, &bin("micromine-agent"), &args, env)
}

/// A fake sysfs tree under `root` for an agent's `--sysfs-root`: one thermal zone at
/// `celsius` and a battery at 80 % drawing `watts`, with mains online.
pub fn fake_sysfs(root: &Path, celsius: f32, watts: f32) -> PathBuf {
    let files = [
        (
            "class/thermal/thermal_zone0/temp",
            format!("{}", (celsius * 1000.0) as i64),
        ),
        ("class/power_supply/BAT0/type", "Battery".to_string()),
        ("class/power_supply/BAT0/capacity", "80".to_string()),
        (
            "class/power_supply/BAT0/power_now",
            format!("{}", (watts * 1e6) as i64),
        ),
        ("class/power_supply/AC/type", "Mains".to_string()),
        ("class/power_supply/AC/online", "1".to_string()),
    ];
    for (path, content) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write");
    }
    root.to_path_buf()
}

/// Field at JSON pointer `pointer` of `value` as a number (0 when missing).
pub fn number(value: &Value, pointer: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_default()
}

/// A MicroMiner manifest for tests: builtin work, all devices with `site=e2e`.
pub fn test_manifest(name: &str, assignment_seconds: u32, network_difficulty: f64) -> String {
    format!(
        "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata:\n  name: {name}\nspec:\n  selector:\n    matchLabels: {{site: e2e}}\n  workSource:\n    builtin: {{networkDifficulty: {network_difficulty}}}\n  sharesPerMinute: 60\n  assignmentSeconds: {assignment_seconds}\n"
    )
}

/// GET `path` from an HTTP server: the status code and body of whatever it answered (where
/// [`get_text`] wants a 200), for probes whose refusal says why.
pub fn get_status(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// A small tmpfs the test mounts (as root) and unmounts when dropped, for a file system that
/// fills up: [`Tmpfs::fill`] takes every free byte, and dropping the [`Filler`] gives it back.
pub struct Tmpfs {
    mount_point: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `16m`) on `mount_point`, creating it.
    pub fn mount(mount_point: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(mount_point).expect("create the mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(mount_point)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed ({status}): these tests run as root"
        );
        Tmpfs {
            mount_point: mount_point.to_path_buf(),
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// Writes a file until the file system refuses another byte (`ENOSPC`).
    pub fn fill(&self) -> Filler {
        let path = self.mount_point.join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        // Big chunks first, then small ones for what is left: every byte goes.
        for chunk in [1 << 20, 4096, 1] {
            let data = vec![0xA5u8; chunk];
            loop {
                match file.write(&data) {
                    Ok(n) if n == chunk => {}
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                    Err(e) => panic!("filling {}: {e}", path.display()),
                }
            }
        }
        Filler { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mount_point)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process of a failed test holds a file): detach it, so no mount
            // outlives the test.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
    }
}

/// The file that filled a [`Tmpfs`]; dropping it (or [`Filler::free`]) frees the space.
pub struct Filler {
    path: PathBuf,
}

impl Filler {
    /// Deletes the file: the space comes back at once.
    pub fn free(self) {}
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
