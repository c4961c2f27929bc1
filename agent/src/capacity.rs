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
    fn reads_meminfo() {
        let text = "MemTotal:       24567896 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24_567_896 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB"), None);
        assert_eq!(parse_meminfo_total("MemTotal: lots kB"), None);
        assert!(cores() >= 1);
        assert!(!arch().is_empty());
    }
}
