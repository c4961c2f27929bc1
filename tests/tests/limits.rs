//! Device limits end to end: agents on fake sysfs trees (the same files a Linux device
//! has) throttle when hot, pause on a low battery, resume with hysteresis, keep enforcing
//! while the controller is gone, and hash no more than their duty cycle, measured from
//! the agent's CPU time in /proc.

use std::path::Path;
use std::time::{Duration, Instant};

use micromine_e2e::{Fixture, create_token, fake_sysfs, test_manifest, wait_until};

fn with_limits(limits: &str) -> String {
    format!("{}  limits:\n{limits}", test_manifest("lim", 5, 1e12))
}

fn write(root: &Path, file: &str, content: &str) {
    std::fs::write(root.join(file), content).expect("write a sensor file");
}

/// Waits until the device's report carries `reading` = `value`, and returns the state
/// that same report gave (the agent decides and reports from one reading).
fn state_at_reading(fleet: &Fixture, device: &str, reading: &str, value: f64) -> String {
    wait_until(
        &format!("{device} to report {reading} {value}"),
        Duration::from_secs(30),
        || {
            let d = fleet.controller.device(device)?;
            (d["readings"][reading].as_f64()? == value)
                .then(|| d["state"].as_str().unwrap_or_default().to_string())
        },
    )
}

fn wait_for_state(fleet: &Fixture, device: &str, state: &str) {
    wait_until(
        &format!("{device} to report {state}"),
        Duration::from_secs(30),
        || (fleet.controller.device(device)?["state"] == state).then_some(()),
    );
}

#[test]
fn heat_and_a_low_battery_hold_a_device_back_until_it_recovers_also_offline() {
    let mut fleet = Fixture::start(
        &with_limits("    maxTemperatureC: 70\n    minBatteryPercent: 30\n"),
        &[],
    );
    let token = create_token(&fleet.data, 1);
    let sysfs = fake_sysfs(&fleet.dir.path().join("lim-1-sys"), 50.0, 3.0);
    let sysfs_arg = sysfs.display().to_string();
    let agent = fleet.mining_agent_with(&token, "lim-1", &["--sysfs-root", &sysfs_arg]);
    let temperature = "class/thermal/thermal_zone0/temp";
    let battery = "class/power_supply/BAT0/capacity";

    write(&sysfs, temperature, "75000");
    wait_for_state(&fleet, "lim-1", "throttled:thermal");
    // 69 °C is below the limit but not 3 below it: still throttled.
    write(&sysfs, temperature, "69000");
    assert_eq!(
        state_at_reading(&fleet, "lim-1", "temperatureC", 69.0),
        "throttled:thermal"
    );
    write(&sysfs, temperature, "60000");
    wait_for_state(&fleet, "lim-1", "mining");

    write(&sysfs, battery, "20");
    wait_for_state(&fleet, "lim-1", "paused:battery");
    wait_until(
        "the paused device to stop hashing",
        Duration::from_secs(30),
        || (fleet.device("lim-1")["reportedHashrate"] == 0.0).then_some(()),
    );
    write(&sysfs, battery, "33");
    assert_eq!(
        state_at_reading(&fleet, "lim-1", "batteryPercent", 33.0),
        "paused:battery",
        "not yet 5 points above the floor"
    );
    write(&sysfs, battery, "40");
    wait_for_state(&fleet, "lim-1", "mining");
    wait_until("hashing again", Duration::from_secs(30), || {
        (fleet.device("lim-1")["reportedHashrate"].as_f64()? > 0.0).then_some(())
    });

    // Without a controller the agent still enforces what it was last told.
    fleet.controller.process.kill();
    write(&sysfs, temperature, "90000");
    let line = agent.wait_for_log("hashing held back", Duration::from_secs(10));
    assert!(line.contains("throttled:thermal"), "{line}");
}

/// CPU time (user + system) the process has used, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent's stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn the_duty_cycle_bounds_the_cpu_the_agent_takes() {
    let fleet = Fixture::start(&with_limits("    dutyCycle: 0.25\n"), &[]);
    let token = create_token(&fleet.data, 1);
    let agent = fleet.mining_agent(&token, "lim-duty");
    // Measure only once the duty cycle is in force, past the start-up benchmark (which
    // runs at full speed): when the agent's own report of how busy its hashing thread
    // was over its last report interval shows it held back. Checked independently below.
    wait_until(
        "the agent to report hashing at its duty cycle",
        Duration::from_secs(30),
        || {
            let duty = fleet.controller.device("lim-duty")?["readings"]["dutyCycle"].as_f64()?;
            (duty > 0.0 && duty <= 0.3).then_some(())
        },
    );
    let (cpu0, wall0) = (cpu_time(agent.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let share = (cpu_time(agent.pid()) - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
    // One hashing thread at 0.25, plus the agent's own bookkeeping. Other tests may take
    // CPU from it (its hashing threads run at nice 19), which can only lower the share.
    assert!(share <= 0.25 + 0.1, "the agent used {share:.3} of a core");
    assert!(
        share >= 0.05,
        "the agent used {share:.3} of a core: is it mining?"
    );
    // What it measured itself and reported agrees.
    let reported = fleet.device("lim-duty")["readings"]["dutyCycle"]
        .as_f64()
        .expect("a measured duty cycle");
    assert!((0.1..=0.3).contains(&reported), "reported duty {reported}");
}

/// A fake /proc for `--proc-root` whose `stat` a thread keeps advancing: of every 100
/// ticks, `busy_percent` busy, none of them the agent's (its `self/stat` stands still).
struct FakeProc {
    root: std::path::PathBuf,
    busy_percent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeProc {
    fn start(root: &Path, busy_percent: u64) -> FakeProc {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        std::fs::create_dir_all(root.join("self")).expect("mkdir");
        std::fs::write(
            root.join("self/stat"),
            "4242 (micromine-agent) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 3 0",
        )
        .expect("self/stat");
        let busy = std::sync::Arc::new(AtomicU64::new(busy_percent));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (dir, b, s) = (root.to_path_buf(), busy.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut user, mut idle) = (0u64, 0u64);
            while !s.load(Ordering::Relaxed) {
                let percent = b.load(Ordering::Relaxed);
                user += percent;
                idle += 100 - percent;
                let line = format!("cpu  {user} 0 0 {idle} 0 0 0 0 0 0\n");
                // Written whole and renamed, so the agent never reads half a file.
                let tmp = dir.join("stat.tmp");
                if std::fs::write(&tmp, line).is_ok() {
                    let _ = std::fs::rename(&tmp, dir.join("stat"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        FakeProc {
            root: root.to_path_buf(),
            busy_percent: busy,
            stop,
        }
    }

    fn set(&self, busy_percent: u64) {
        self.busy_percent
            .store(busy_percent, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn the_devices_own_work_being_unplugged_and_its_windows_hold_it_back() {
    let fleet = Fixture::start(
        &with_limits("    maxHostCpuPercent: 60\n    pauseOnBattery: true\n"),
        &[],
    );
    let token = create_token(&fleet.data, 1);
    let sysfs = fake_sysfs(&fleet.dir.path().join("host-sys"), 40.0, 3.0);
    let proc = FakeProc::start(&fleet.dir.path().join("host-proc"), 20);
    let (sysfs_arg, proc_arg) = (sysfs.display().to_string(), proc.root.display().to_string());
    let _agent = fleet.mining_agent_with(
        &token,
        "lim-host",
        &["--sysfs-root", &sysfs_arg, "--proc-root", &proc_arg],
    );
    proc.set(80);
    wait_for_state(&fleet, "lim-host", "throttled:host-load");
    // 55 % is under the ceiling but not 10 points under it.
    proc.set(55);
    assert_eq!(
        state_at_reading(&fleet, "lim-host", "hostCpuPercent", 55.0),
        "throttled:host-load"
    );
    proc.set(30);
    wait_for_state(&fleet, "lim-host", "mining");

    write(&sysfs, "class/power_supply/AC/online", "0");
    wait_for_state(&fleet, "lim-host", "paused:battery");
    write(&sysfs, "class/power_supply/AC/online", "1");
    wait_for_state(&fleet, "lim-host", "mining");

    // A MicroMiner whose only window is on another day: the device idles and is handed
    // nothing.
    let tomorrow = jiff::Zoned::now()
        .with_time_zone(jiff::tz::TimeZone::UTC)
        .weekday()
        .next();
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        [tomorrow.to_monday_zero_offset() as usize];
    std::fs::write(
        fleet.dir.path().join("manifests").join("test.yaml"),
        with_limits(&format!(
            "    windows:\n      - {{days: [{day}], from: \"00:00\", to: \"00:00\"}}\n"
        )),
    )
    .expect("edit the manifest");
    wait_for_state(&fleet, "lim-host", "outside-window");
    wait_until("its leases to run out", Duration::from_secs(60), || {
        (fleet.device("lim-host")["assignments"] == 0).then_some(())
    });
}
