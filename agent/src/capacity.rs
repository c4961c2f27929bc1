//! What the device has: cores, architecture, memory. Reported in `Hello`.

/// Logical CPUs available to this process.
pub fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// The CPU architecture this binary runs on.
pub fn arch() -> &'static str {
    std::env::consts::ARCH
}

/// Physical memory in bytes, from `/proc/meminfo` on Linux; 0 where unknown.
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total(&text))
        .unwrap_or(0)
}

/// The CPU's model as `/proc/cpuinfo` names it (x86 `model name`, or ARM's `Hardware` /
/// `Model` lines), for benchmark reports; the architecture where it names none.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| parse_cpu_model(&text))
        .unwrap_or_else(|| arch().to_string())
}

/// The CPU as precisely as `/proc/cpuinfo` says: its model name plus the family, model
/// and stepping numbers (x86) or implementer, part, variant and revision (ARM). Virtual
/// machines often name every generation alike ("AMD EPYC"), and what is fastest on one
/// generation need not be on the next; the numbers tell them apart.
pub fn cpu_identity() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_cpu_identity(&cpuinfo).unwrap_or_else(cpu_model)
}

fn parse_cpu_identity(cpuinfo: &str) -> Option<String> {
    let model = parse_cpu_model(cpuinfo)?;
    let numbers: Vec<String> = [
        "cpu family",
        "model",
        "stepping",
        "CPU implementer",
        "CPU part",
        "CPU variant",
        "CPU revision",
    ]
    .iter()
    .filter_map(|key| {
        cpuinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == *key && !value.trim().is_empty())
                .then(|| format!("{key} {}", value.trim()))
        })
    })
    .collect();
    if numbers.is_empty() {
        Some(model)
    } else {
        Some(format!("{model} ({})", numbers.join(", ")))
    }
}

fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    ["model name", "Hardware", "Model"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == *key && !value.trim().is_empty()).then(|| value.trim().to_string())
        })
    })
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_model() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpu_model(x86).as_deref(), Some("AMD EPYC 7B13"));
        let pi =
            "processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(
            parse_cpu_model(pi).as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        assert_eq!(parse_cpu_model("processor\t: 0\n"), None);
    }

    #[test]
    fn the_cpu_identity_tells_generations_with_one_name_apart() {
        let zen3 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 1\n";
        let zen4 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n";
        assert_eq!(
            parse_cpu_identity(zen4).as_deref(),
            Some("AMD EPYC (cpu family 25, model 17, stepping 1)")
        );
        assert_ne!(parse_cpu_identity(zen3), parse_cpu_identity(zen4));
        let a72 = "processor\t: 0\nCPU implementer\t: 0x41\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(
            parse_cpu_identity(a72).as_deref(),
            Some(
                "Raspberry Pi 4 Model B Rev 1.4 (CPU implementer 0x41, CPU part 0xd08, CPU variant 0x0, CPU revision 3)"
            )
        );
        assert_eq!(parse_cpu_identity("processor\t: 0\n"), None);
    }

    #[test]
    fn reads_meminfo() {
        let text = "MemTotal:       24567896 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_567_896 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB"), None);
        assert_eq!(parse_meminfo_total("MemTotal: lots kB"), None);
        assert!(cores() >= 1);
        assert!(!arch().is_empty());
    }
}
