//! Device names and labels: one rule on both sides of the wire.
//!
//! A device name is a certificate's common name and an `EdgeDevice` object name, so it
//! follows Kubernetes' DNS-label rule. Device labels become `EdgeDevice` labels and
//! MicroMiners select by them, so they follow Kubernetes' label syntax: anything the API
//! server would refuse is refused where it is typed.

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

/// Longest label value, and longest label key name (the part after an optional prefix).
pub const MAX_LABEL_LEN: usize = 63;

/// The label charset: alphanumerics with '-', '_' and '.' between, alphanumeric at both
/// ends.
fn label_name_problem(text: &str) -> Option<&'static str> {
    if text.len() > MAX_LABEL_LEN {
        return Some("must be at most 63 characters");
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Some("may contain only letters, digits, '-', '_' and '.'");
    }
    let ends_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !ends_ok(text.bytes().next()) || !ends_ok(text.bytes().last()) {
        return Some("must start and end with a letter or digit");
    }
    None
}

/// What is wrong with `key` as a label key (`[prefix/]name`: the prefix a lower-case DNS
/// subdomain of at most 253 characters, the name 1..=63 label characters), or `None`.
pub fn label_key_problem(key: &str) -> Option<&'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Some("prefix must be 1 to 253 characters");
        }
        if prefix
            .split('.')
            .any(|part| dns_label_problem(part).is_some())
        {
            return Some("prefix must be a lower-case DNS subdomain");
        }
    }
    if name.is_empty() {
        return Some("name must not be empty");
    }
    label_name_problem(name)
}

/// What is wrong with `value` as a label value (empty, or 1..=63 label characters), or
/// `None`.
pub fn label_value_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return None;
    }
    label_name_problem(value)
}

/// Most labels one device may carry; a device that sends more is not describing itself.
pub const MAX_LABELS: usize = 64;

/// The first problem with a set of labels as `` `key=value`: problem ``, or `None`.
pub fn labels_problem<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Option<String> {
    let mut count = 0;
    for (key, value) in labels {
        count += 1;
        if count > MAX_LABELS {
            return Some(format!("more than {MAX_LABELS} labels"));
        }
        if let Some(problem) = label_key_problem(key).or_else(|| label_value_problem(value)) {
            return Some(format!("`{key}={value}`: {problem}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values_follow_kubernetes() {
        for key in [
            "site",
            "micromine.dev/class",
            "a",
            "Zone_1.b-2",
            &"k".repeat(63),
        ] {
            assert_eq!(label_key_problem(key), None, "{key}");
        }
        for (key, problem) in [
            ("", "name must not be empty"),
            ("micromine.dev/", "name must not be empty"),
            ("/site", "prefix must be 1 to 253 characters"),
            (
                "Micromine.dev/site",
                "prefix must be a lower-case DNS subdomain",
            ),
            (
                "site name",
                "may contain only letters, digits, '-', '_' and '.'",
            ),
            ("-site", "must start and end with a letter or digit"),
            (&"k".repeat(64), "must be at most 63 characters"),
        ] {
            assert_eq!(label_key_problem(key), Some(problem), "{key:?}");
        }
        for value in ["", "plant-3", "Plant_3.b", &"v".repeat(63)] {
            assert_eq!(label_value_problem(value), None, "{value}");
        }
        assert!(label_value_problem("plant 3").is_some());
        assert!(label_value_problem("plant-").is_some());
        assert!(label_value_problem(&"v".repeat(64)).is_some());
    }

    #[test]
    fn a_label_set_names_its_first_bad_label_and_is_bounded() {
        let good: std::collections::BTreeMap<String, String> =
            [("site".into(), "plant-3".into())].into();
        assert_eq!(labels_problem(&good), None);
        let bad: std::collections::BTreeMap<String, String> =
            [("site".into(), "plant 3".into())].into();
        assert_eq!(
            labels_problem(&bad).as_deref(),
            Some("`site=plant 3`: may contain only letters, digits, '-', '_' and '.'")
        );
        let many: std::collections::BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert_eq!(
            labels_problem(&many).as_deref(),
            Some("more than 64 labels")
        );
    }

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
