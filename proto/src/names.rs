//! Device names: one rule on both sides of the wire.
//!
//! A device name is a certificate's common name and an `EdgeDevice` object name, so it
//! follows Kubernetes' DNS-label rule.

/// Longest device name (a DNS label).
pub const MAX_DEVICE_NAME_LEN: usize = 63;

/// What is wrong with `name` as a device name (a DNS label: 1..=63 characters of
/// `[a-z0-9-]`, not starting or ending with '-'), or `None` if nothing is.
pub fn dns_label_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > MAX_DEVICE_NAME_LEN {
        return Some("must be at most 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("may contain only lower-case letters, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some("must not start or end with '-'");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label_problem("gw-0042"), None);
        assert_eq!(dns_label_problem(&"a".repeat(63)), None);
        assert_eq!(dns_label_problem(""), Some("must not be empty"));
        assert_eq!(
            dns_label_problem(&"a".repeat(64)),
            Some("must be at most 63 characters")
        );
        assert!(dns_label_problem("GW").is_some());
        assert!(dns_label_problem("gw.1").is_some());
        assert_eq!(
            dns_label_problem("-gw"),
            Some("must not start or end with '-'")
        );
    }
}
