//! A real Prometheus for tests: scrape loopback targets every second, evaluate rule files,
//! and answer PromQL, so metrics and alerting rules are checked by the thing that will read
//! them in production rather than by string matching.
//!
//! The binaries are Debian's (`scripts/tools prometheus` puts them in `.tools/bin`; the
//! test command exports their paths as `PROMETHEUS` and `PROMTOOL`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{Process, loopback, wait_until};

/// Path of `tool` (`prometheus` or `promtool`): `$PROMETHEUS`/`$PROMTOOL`, else
/// `<repo>/.tools/bin/<tool>`, else the first on `PATH`.
pub fn tool(tool: &str) -> PathBuf {
    let from_env = std::env::var_os(tool.to_uppercase()).map(PathBuf::from);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let in_tools = Some(repo.join(".tools/bin").join(tool));
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file());
    [from_env, in_tools, on_path]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{tool} is missing: run `scripts/tools prometheus` (it installs prometheus and \
                 promtool into .tools/bin), or set {} to its path",
                tool.to_uppercase()
            )
        })
}

/// `promtool test rules <path>`: runs a rule unit-test file (synthetic series, expected
/// alerts at given times). Its output when every case passes, its complaint when not.
pub fn promtool_test_rules(path: &Path) -> Result<String, String> {
    promtool(&["test", "rules"], path)
}

/// `promtool check rules <path>`: its output when the file is valid, its complaint (stdout
/// and stderr) when not.
pub fn promtool_check_rules(path: &Path) -> Result<String, String> {
    promtool(&["check", "rules"], path)
}

/// `promtool <command...> <path>`: stdout and stderr together, `Err` on a failed exit.
fn promtool(command: &[&str], path: &Path) -> Result<String, String> {
    let output = Command::new(tool("promtool"))
        .args(command)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running promtool: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// A Prometheus server on a free loopback port with its config and TSDB in a temporary
/// directory; killed on drop (its log is printed if the test is panicking).
pub struct Prometheus {
    /// The process; `process.log()` is Prometheus's log.
    pub process: Process,
    /// Its HTTP address (API, `/metrics`).
    pub addr: SocketAddr,
    /// Holds the config, the rule file and the TSDB.
    pub dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` at `metrics_path` every second, as job
    /// `micromine`, and waits until it is ready.
    pub fn start(targets: &[SocketAddr], metrics_path: &str) -> Prometheus {
        Prometheus::start_on(loopback(), targets, metrics_path, None)
    }

    /// [`Prometheus::start`] with a rule file (`groups: ...`) evaluated every second.
    pub fn start_with_rules(
        targets: &[SocketAddr],
        metrics_path: &str,
        rules_yaml: &str,
    ) -> Prometheus {
        Prometheus::start_on(loopback(), targets, metrics_path, Some(rules_yaml))
    }

    /// Starts Prometheus on `addr`, which `targets` may include (a Prometheus scraping
    /// itself, for the harness's own test).
    pub fn start_on(
        addr: SocketAddr,
        targets: &[SocketAddr],
        metrics_path: &str,
        rules_yaml: Option<&str>,
    ) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if let Some(rules) = rules_yaml {
            let path = dir.path().join("rules.yml");
            std::fs::write(&path, rules).expect("write rules");
            // JSON strings are valid YAML scalars, whatever the path holds.
            config += &format!(
                "rule_files:\n  - {}\n",
                Value::from(path.display().to_string())
            );
        }
        let targets: Vec<Value> = targets.iter().map(|t| t.to_string().into()).collect();
        config += &format!(
            "scrape_configs:\n  - job_name: micromine\n    metrics_path: {}\n    static_configs:\n      - targets: {}\n",
            Value::from(metrics_path),
            Value::from(targets)
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let (config_arg, tsdb_arg, listen_arg) = (
            config_path.display().to_string(),
            dir.path().join("tsdb").display().to_string(),
            addr.to_string(),
        );
        let process = Process::start(
            "prometheus",
            &tool("prometheus"),
            &[
                "--config.file",
                &config_arg,
                "--storage.tsdb.path",
                &tsdb_arg,
                "--web.listen-address",
                &listen_arg,
                "--web.enable-lifecycle",
            ],
        );
        let prometheus = Prometheus { process, addr, dir };
        wait_until("prometheus /-/ready", Duration::from_secs(30), || {
            let (status, _) = http_get(addr, "/-/ready")?;
            (status == 200).then_some(())
        });
        prometheus
    }

    /// GET an API path and return its `data`, panicking with Prometheus's error when the
    /// answer's `status` is not `success`.
    pub fn api(&self, path: &str) -> Value {
        self.data(path, path)
    }

    /// Instant query; the answer's `data` (`resultType`, `result`). A query Prometheus
    /// rejects (a PromQL parse error) panics with its message.
    pub fn query(&self, promql: &str) -> Value {
        self.data(
            &format!("/api/v1/query?query={}", url_encode(promql)),
            &format!("query {promql:?}"),
        )
    }

    fn data(&self, path: &str, what: &str) -> Value {
        let (status, body) = http_get(self.addr, path)
            .unwrap_or_else(|| panic!("prometheus {what}: no answer from {}", self.addr));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus {what}: HTTP {status}, not JSON ({e}): {body}"));
        if json["status"] != "success" {
            panic!(
                "prometheus {what}: HTTP {status}, {}: {}",
                json["errorType"].as_str().unwrap_or("error"),
                json["error"].as_str().unwrap_or(&body)
            );
        }
        json["data"].clone()
    }

    /// Instant query whose result is a vector: each sample's labels and value.
    pub fn query_vector(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self.query(promql);
        assert_eq!(
            data["resultType"], "vector",
            "{promql} is not an instant vector: {data}"
        );
        data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|sample| {
                let labels = sample["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                // Values come as ["<unix time>", "<number>"]; "NaN" and "+Inf" parse too.
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: odd sample {sample}"));
                (labels, value)
            })
            .collect()
    }

    /// Whether there are targets and every one was last scraped successfully.
    pub fn targets_up(&self) -> bool {
        let data = self.api("/api/v1/targets?state=active");
        let targets = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        !targets.is_empty() && targets.iter().all(|t| t["health"] == "up")
    }

    /// `/api/v1/rules` data: `groups`, each with `rules`, each with `health` ("ok" once
    /// evaluated without error, "err" with `lastError`, "unknown" before the first run).
    pub fn rule_groups(&self) -> Value {
        self.api("/api/v1/rules")
    }

    /// Every rule of every group, flattened.
    pub fn rules(&self) -> Vec<Value> {
        self.rule_groups()["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` over HTTP/1.1: the status code and the body (de-chunked), or `None` when
/// nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    // Go's server chunks any body that outgrows its buffer (the targets list does).
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            url_encode(r#"up{job="a b"} == 1"#),
            "up%7Bjob%3D%22a%20b%22%7D%20%3D%3D%201"
        );
    }

    #[test]
    fn chunked_bodies_are_joined_and_truncated_ones_refused() {
        assert_eq!(
            dechunk("4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n").as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(dechunk("4\r\n{\"a"), None);
    }
}
