//! Command-line pieces both micromine binaries share, so `--labels` and signal handling
//! behave the same on the controller and on a device.

use std::collections::BTreeMap;

use micromine_proto::names::{label_key_problem, label_value_problem};

/// A `--labels` value that is not `k=v,...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--labels: `{pair}` {problem}")]
pub struct LabelsError {
    /// The offending item.
    pub pair: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

/// Parses `key=value,key=value` (spaces around items are ignored; empty input is no labels).
pub fn parse_labels(text: Option<&str>) -> Result<BTreeMap<String, String>, LabelsError> {
    let mut labels = BTreeMap::new();
    for pair in text
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.trim().is_empty())
    {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(LabelsError {
                pair: pair.trim().to_string(),
                problem: "is not key=value",
            });
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(LabelsError {
                pair: pair.trim().to_string(),
                problem: "has an empty key",
            });
        }
        // Labels end up on EdgeDevice objects; refuse here what the API server would.
        if let Some(problem) = label_key_problem(key).or_else(|| label_value_problem(value)) {
            return Err(LabelsError {
                pair: pair.trim().to_string(),
                problem,
            });
        }
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

/// Raises this process's open-file limit to the most it may have: a controller holding
/// thousands of device connections (or a simulator holding as many) needs a descriptor
/// each, and the usual soft limit of 1,024 would refuse them long before memory or CPU run
/// out. Returns the limit now in force, if known.
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            limit.current = limit.maximum;
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::debug!(error = %e, "cannot raise the open-file limit");
                return getrlimit(Resource::Nofile).current;
            }
        }
        limit.current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// A token cancelled (after logging `note`, if any) on Ctrl-C or SIGTERM. Must be called
/// within a Tokio runtime.
pub fn cancel_on_signal(note: Option<&'static str>) -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        if let Some(note) = note {
            tracing::info!("{note}");
        }
        signal.cancel();
    });
    shutdown
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, the two ways a process is asked to stop.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    // Without a SIGTERM handler (or off Unix), Ctrl-C is the only way in; if even that
    // cannot be installed, run until killed.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_errors_name_the_pair() {
        let labels = parse_labels(Some("site=plant-3, class=gateway")).expect("valid");
        assert_eq!(labels.get("site").map(String::as_str), Some("plant-3"));
        assert_eq!(labels.len(), 2);
        assert!(parse_labels(None).expect("empty").is_empty());
        let err = parse_labels(Some("site")).expect_err("no =");
        assert_eq!(err.to_string(), "--labels: `site` is not key=value");
        assert_eq!(
            parse_labels(Some("=x")).expect_err("no key").problem,
            "has an empty key"
        );
        let err = parse_labels(Some("site=plant 3")).expect_err("space in the value");
        assert_eq!(
            err.to_string(),
            "--labels: `site=plant 3` may contain only letters, digits, '-', '_' and '.'"
        );
        assert!(parse_labels(Some("bad key=x")).is_err());
    }
}
