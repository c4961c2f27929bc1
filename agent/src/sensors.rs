//! What the device itself says about its condition: temperature (Linux thermal zones),
//! battery and power draw (`power_supply`), and how busy its own work keeps the CPU
//! (`/proc/stat` less the agent's share from `/proc/self/stat`).
//!
//! The roots are configurable (`--sysfs-root`, `--proc-root`), so tests drive the agent with
//! a fake tree. A reading the device does not offer (no thermal zone, no battery) is
//! `None`, not zero: a gateway without a battery is not at 0 %.

use std::path::{Path, PathBuf};

/// Temperatures outside this range are a broken sensor, not a reading.
const PLAUSIBLE_CELSIUS: std::ops::RangeInclusive<f32> = -40.0..=150.0;

/// Where to read from.
#[derive(Debug, Clone)]
pub struct SensorPaths {
    /// The sysfs root (`/sys`): `class/thermal/thermal_zone*/temp`,
    /// `class/power_supply/*/{type,capacity,status,online,power_now}`.
    pub sysfs: PathBuf,
    /// The procfs root (`/proc`): `stat` and `self/stat`.
    pub proc: PathBuf,
}

impl Default for SensorPaths {
    fn default() -> Self {
        SensorPaths {
            sysfs: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
        }
    }
}

/// One look at the device.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Readings {
    /// The hottest thermal zone, °C.
    pub temperature_c: Option<f32>,
    /// The emptiest battery, percent.
    pub battery_percent: Option<f32>,
    /// True when a battery is present and no external supply is online.
    pub on_battery: Option<bool>,
    /// Power the batteries report drawing, watts.
    pub power_watts: Option<f32>,
    /// CPU used by everything but the agent since the previous reading, percent of the
    /// whole machine (all cores).
    pub host_cpu_percent: Option<f32>,
}

/// CPU time counters, in the kernel's clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    busy: u64,
    total: u64,
    own: u64,
}

/// Reads the device's sensors; keeps the previous CPU sample to compute rates.
#[derive(Debug)]
pub struct Sensors {
    paths: SensorPaths,
    previous_cpu: Option<CpuSample>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_number(path: &Path) -> Option<f64> {
    read_trimmed(path)?.parse().ok()
}

/// Entries of a sysfs class directory, sorted so readings do not depend on listing order.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

impl Sensors {
    /// Sensors under `paths`.
    pub fn new(paths: SensorPaths) -> Sensors {
        Sensors {
            paths,
            previous_cpu: None,
        }
    }

    /// Reads everything; the first call has no host CPU figure yet (it needs two samples).
    pub fn read(&mut self) -> Readings {
        let (battery_percent, on_battery, power_watts) = self.power();
        Readings {
            temperature_c: self.temperature(),
            battery_percent,
            on_battery,
            power_watts,
            host_cpu_percent: self.host_cpu(),
        }
    }

    fn temperature(&self) -> Option<f32> {
        entries(&self.paths.sysfs.join("class/thermal"))
            .into_iter()
            .filter(|zone| {
                zone.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("thermal_zone"))
            })
            .filter_map(|zone| read_number(&zone.join("temp")))
            .map(|millidegrees| (millidegrees / 1000.0) as f32)
            .filter(|c| PLAUSIBLE_CELSIUS.contains(c))
            .reduce(f32::max)
    }

    fn power(&self) -> (Option<f32>, Option<bool>, Option<f32>) {
        let mut battery: Option<f32> = None;
        let mut draw: Option<f32> = None;
        let mut external_online = false;
        let mut any_battery = false;
        for supply in entries(&self.paths.sysfs.join("class/power_supply")) {
            match read_trimmed(&supply.join("type")).as_deref() {
                Some("Battery") => {
                    // Peripherals (a mouse's battery) report `scope` Device; only the
                    // system's own batteries count.
                    if read_trimmed(&supply.join("scope")).as_deref() == Some("Device") {
                        continue;
                    }
                    any_battery = true;
                    if let Some(percent) =
                        read_number(&supply.join("capacity")).filter(|p| (0.0..=100.0).contains(p))
                    {
                        let percent = percent as f32;
                        battery = Some(battery.map_or(percent, |b| b.min(percent)));
                    }
                    if let Some(microwatts) =
                        read_number(&supply.join("power_now")).filter(|w| *w >= 0.0)
                    {
                        draw = Some(draw.unwrap_or(0.0) + (microwatts / 1e6) as f32);
                    }
                }
                // Mains, USB, wireless: any external supply that is online.
                Some(_) if read_number(&supply.join("online")) == Some(1.0) => {
                    external_online = true;
                }
                _ => {}
            }
        }
        let on_battery = any_battery.then_some(!external_online);
        (battery, on_battery, draw)
    }

    fn cpu_sample(&self) -> Option<CpuSample> {
        let stat = std::fs::read_to_string(self.paths.proc.join("stat")).ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time
        // is already inside user and nice.
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        // /proc/self/stat: the command name may hold spaces and parentheses, so fields
        // are counted from the last ')'. utime and stime are fields 14 and 15.
        let own_stat = std::fs::read_to_string(self.paths.proc.join("self/stat")).ok()?;
        let after_name = &own_stat[own_stat.rfind(')')? + 1..];
        let own_fields: Vec<&str> = after_name.split_whitespace().collect();
        let utime: u64 = own_fields.get(11)?.parse().ok()?;
        let stime: u64 = own_fields.get(12)?.parse().ok()?;
        Some(CpuSample {
            busy: total.saturating_sub(idle),
            total,
            own: utime + stime,
        })
    }

    fn host_cpu(&mut self) -> Option<f32> {
        let now = self.cpu_sample()?;
        let previous = self.previous_cpu.replace(now)?;
        let total = now.total.checked_sub(previous.total)?;
        if total == 0 {
            return None;
        }
        let busy = now.busy.saturating_sub(previous.busy);
        let own = now.own.saturating_sub(previous.own);
        Some((busy.saturating_sub(own) as f64 / total as f64 * 100.0).clamp(0.0, 100.0) as f32)
    }
}

/// Where an agent's readings come from: the device itself, or a simulated one.
#[derive(Debug)]
pub enum SensorSource {
    /// sysfs and procfs of this machine.
    Device(Sensors),
    /// A simulated device (`micromine-agent simulate`).
    Synthetic(SyntheticSensors),
}

impl SensorSource {
    /// Reads the sensors; `load` is the fraction of its time the device spends hashing
    /// (a simulated device heats up and drains its battery with it).
    pub fn read(&mut self, load: f32) -> Readings {
        match self {
            SensorSource::Device(sensors) => sensors.read(),
            SensorSource::Synthetic(synthetic) => synthetic.read(load),
        }
    }
}

/// Plausible, moving readings for a simulated device: the temperature follows the load
/// with a minute's lag, the host's own work wanders, and one device in four runs on a
/// battery that drains while unplugged (faster while hashing) and charges when plugged
/// in. Enough for the controller's limits, status and dashboards to see a real-looking
/// fleet; the agent's governor acts on them as on real sensors.
#[derive(Debug)]
pub struct SyntheticSensors {
    ambient_c: f32,
    temperature_c: f32,
    host_cpu_percent: f32,
    battery: Option<SyntheticBattery>,
    last: std::time::Instant,
}

#[derive(Debug)]
struct SyntheticBattery {
    percent: f32,
    plugged_in: bool,
}

impl Default for SyntheticSensors {
    fn default() -> Self {
        SyntheticSensors::new()
    }
}

impl SyntheticSensors {
    /// A device with its own ambient temperature, host load and (maybe) battery.
    pub fn new() -> SyntheticSensors {
        use rand::RngExt as _;
        let mut rng = rand::rng();
        let ambient_c = rng.random_range(20.0..40.0);
        SyntheticSensors {
            ambient_c,
            temperature_c: ambient_c,
            host_cpu_percent: rng.random_range(5.0..40.0),
            battery: rng.random_bool(0.25).then(|| SyntheticBattery {
                percent: rng.random_range(40.0..100.0),
                plugged_in: rng.random_bool(0.5),
            }),
            last: std::time::Instant::now(),
        }
    }

    /// The readings now, after `load` (0 to 1) since the previous reading.
    pub fn read(&mut self, load: f32) -> Readings {
        use rand::RngExt as _;
        let mut rng = rand::rng();
        let load = if load.is_finite() {
            load.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let seconds = self.last.elapsed().as_secs_f32().min(600.0);
        self.last = std::time::Instant::now();
        // First-order lag towards the load's steady temperature (time constant 60 s).
        let steady = self.ambient_c + 35.0 * load;
        let step = 1.0 - (-seconds / 60.0).exp();
        self.temperature_c += (steady - self.temperature_c) * step;
        let wander = 3.0 * seconds.sqrt().min(3.0);
        self.host_cpu_percent =
            (self.host_cpu_percent + rng.random_range(-wander..=wander)).clamp(2.0, 95.0);
        let power_watts = 1.5 + 3.5 * load;
        let (battery_percent, on_battery) = match &mut self.battery {
            Some(battery) => {
                // A plug is pulled or put back about every ten minutes.
                if rng.random_bool(f64::from((seconds / 600.0).min(1.0))) {
                    battery.plugged_in = !battery.plugged_in;
                }
                // A 20 Wh battery: percent per second at this draw.
                let rate = power_watts / 20.0 / 36.0;
                let delta = if battery.plugged_in {
                    2.0 * rate
                } else {
                    -rate
                };
                battery.percent = (battery.percent + delta * seconds).clamp(0.0, 100.0);
                (Some(battery.percent), Some(!battery.plugged_in))
            }
            None => (None, None),
        };
        Readings {
            temperature_c: Some(self.temperature_c + rng.random_range(-0.5..=0.5)),
            battery_percent,
            on_battery,
            power_watts: Some(power_watts),
            host_cpu_percent: Some(self.host_cpu_percent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys and /proc under one temporary directory.
    struct FakeDevice {
        dir: tempfile::TempDir,
    }

    impl FakeDevice {
        fn new() -> FakeDevice {
            FakeDevice {
                dir: tempfile::tempdir().expect("tempdir"),
            }
        }

        fn write(&self, path: &str, content: &str) {
            let path = self.dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, content).expect("write");
        }

        fn sensors(&self) -> Sensors {
            Sensors::new(SensorPaths {
                sysfs: self.dir.path().join("sys"),
                proc: self.dir.path().join("proc"),
            })
        }

        fn cpu(&self, user: u64, idle: u64, own: u64) {
            self.write(
                "proc/stat",
                &format!(
                    "cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\n"
                ),
            );
            // A command name with spaces and a parenthesis, as a process may have.
            self.write(
                "proc/self/stat",
                &format!("4242 (micromine (agent) x) S 1 1 1 0 -1 0 0 0 0 0 {own} 0 0 0 20 0 3 0"),
            );
        }
    }

    #[test]
    fn a_bare_device_reports_nothing_rather_than_zero() {
        let device = FakeDevice::new();
        assert_eq!(device.sensors().read(), Readings::default());
    }

    #[test]
    fn the_hottest_plausible_zone_is_the_temperature() {
        let device = FakeDevice::new();
        device.write("sys/class/thermal/thermal_zone0/temp", "45000\n");
        device.write("sys/class/thermal/thermal_zone1/temp", "71500\n");
        // A disconnected sensor reads absurdly; it is ignored.
        device.write("sys/class/thermal/thermal_zone2/temp", "-273000\n");
        device.write("sys/class/thermal/cooling_device0/temp", "99000\n");
        assert_eq!(device.sensors().read().temperature_c, Some(71.5));
    }

    #[test]
    fn batteries_report_the_emptiest_and_whether_mains_is_online() {
        let device = FakeDevice::new();
        device.write("sys/class/power_supply/BAT0/type", "Battery\n");
        device.write("sys/class/power_supply/BAT0/capacity", "80\n");
        device.write("sys/class/power_supply/BAT0/power_now", "4500000\n");
        device.write("sys/class/power_supply/BAT1/type", "Battery\n");
        device.write("sys/class/power_supply/BAT1/capacity", "35\n");
        device.write("sys/class/power_supply/hid-mouse/type", "Battery\n");
        device.write("sys/class/power_supply/hid-mouse/scope", "Device\n");
        device.write("sys/class/power_supply/hid-mouse/capacity", "5\n");
        device.write("sys/class/power_supply/AC/type", "Mains\n");
        device.write("sys/class/power_supply/AC/online", "0\n");
        let readings = device.sensors().read();
        assert_eq!(readings.battery_percent, Some(35.0));
        assert_eq!(readings.on_battery, Some(true));
        assert_eq!(readings.power_watts, Some(4.5));

        device.write("sys/class/power_supply/AC/online", "1\n");
        assert_eq!(device.sensors().read().on_battery, Some(false));
    }

    #[test]
    fn host_cpu_is_what_everything_but_the_agent_used() {
        let device = FakeDevice::new();
        let mut sensors = device.sensors();
        device.cpu(1000, 9000, 100);
        assert_eq!(sensors.read().host_cpu_percent, None, "needs two samples");
        // 1000 ticks pass: 600 busy, of which the agent used 200 → the host used 40 %.
        device.cpu(1600, 9400, 300);
        assert_eq!(sensors.read().host_cpu_percent, Some(40.0));
        // The agent alone: the host is idle.
        device.cpu(2100, 9900, 800);
        assert_eq!(sensors.read().host_cpu_percent, Some(0.0));
    }

    #[test]
    fn synthetic_readings_stay_plausible_and_heat_follows_the_load() {
        let mut sensors = SyntheticSensors::new();
        let ambient = sensors.ambient_c;
        // Pretend ten minutes of full load passed between readings.
        sensors.last -= std::time::Duration::from_secs(600);
        let hot = sensors.read(1.0);
        let temperature = hot.temperature_c.expect("a temperature");
        assert!(
            temperature > ambient + 30.0,
            "{temperature} after ten loaded minutes"
        );
        assert!(PLAUSIBLE_CELSIUS.contains(&temperature));
        assert_eq!(hot.power_watts, Some(5.0));
        let host = hot.host_cpu_percent.expect("a host load");
        assert!((2.0..=95.0).contains(&host));
        if let Some(percent) = hot.battery_percent {
            assert!((0.0..=100.0).contains(&percent));
            assert!(hot.on_battery.is_some());
        }
        sensors.last -= std::time::Duration::from_secs(600);
        let cool = sensors.read(0.0).temperature_c.expect("a temperature");
        assert!(cool < ambient + 5.0, "{cool} after ten idle minutes");
    }

    #[test]
    fn the_real_proc_parses() {
        if !Path::new("/proc/self/stat").exists() {
            return;
        }
        let sample = Sensors::new(SensorPaths::default())
            .cpu_sample()
            .expect("this machine's /proc/stat and /proc/self/stat parse");
        assert!(sample.busy <= sample.total);
    }
}
