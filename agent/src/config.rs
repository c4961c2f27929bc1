//! What `micromine-agent run` is told to do: its flags, merged over the env file a
//! packaged device keeps in `/etc/micromine/agent.env`, and the checks that turn a
//! misconfigured device into one error naming the file, line, key or path at fault,
//! before anything is enrolled or mined.
//!
//! The env file has the shape systemd's `EnvironmentFile=` reads (`KEY=VALUE` lines, `#`
//! comments, optional quotes), but the agent reads it itself: systemd would pass a
//! misspelt key on silently, and a device that ignores `MICROMINE_CONTROLER=` is one an
//! operator cannot tell apart from a broken one.
//!
//! The bootstrap token never has to be on a command line, where `ps` shows it: it comes
//! from `--token-file`, `MICROMINE_TOKEN_FILE`, or the credential systemd's
//! `LoadCredential=micromine-agent.token` puts in `$CREDENTIALS_DIRECTORY`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use micromine_proto::token::BootstrapToken;

use crate::engine::{self, EngineRequest};
use crate::identity::{self, DeviceIdentity};
use micromine_host::cli::parse_labels;

/// The state directory when neither `--state-dir` nor `MICROMINE_STATE_DIR` names one
/// (also what the packaged unit's `StateDirectory=` makes).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/micromine-agent";

/// The name of the credential the packaged unit loads (`LoadCredential=`), looked for in
/// `$CREDENTIALS_DIRECTORY` when no token file is named.
pub const TOKEN_CREDENTIAL: &str = "micromine-agent.token";

/// The exit status of a configuration error (`EX_CONFIG` from sysexits.h); the packaged
/// unit's `RestartPreventExitStatus=` keeps a misconfigured device from restarting in a
/// loop.
pub const EXIT_CONFIG: u8 = 78;

/// The keys an env file may set, with what each one means (for `--help` and for the
/// error that lists them).
pub const ENV_KEYS: &[(&str, &str)] = &[
    (
        "MICROMINE_CONTROLLER",
        "the controller's address, https://HOST:PORT",
    ),
    ("MICROMINE_NAME", "the device name (default: the host name)"),
    ("MICROMINE_LABELS", "labels to report, k=v,..."),
    (
        "MICROMINE_TOKEN_FILE",
        "a file holding the bootstrap token (first start only)",
    ),
    (
        "MICROMINE_CA_FILE",
        "a CA bundle to trust instead of the token's fingerprint",
    ),
    (
        "MICROMINE_STATE_DIR",
        "where the device key and certificates live",
    ),
    ("MICROMINE_THREADS", "hashing threads (default: all cores)"),
    ("MICROMINE_ENGINE", "hashing engine (default: auto)"),
    ("MICROMINE_LOG", "log filter, as RUST_LOG (default: info)"),
];

/// A configuration the agent refuses to run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The env file could not be read.
    #[error("reading {path}: {source}")]
    ReadEnvFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line of the env file is not `KEY=VALUE`, a comment or blank.
    #[error("{path}:{line}: {problem}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
        /// What is wrong with the line.
        problem: String,
    },
    /// The env file sets a key the agent does not know: a typo, most likely.
    #[error("{path}:{line}: unknown key {key}{hint}; the keys are {known}", known = known_keys())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// Its 1-based line number.
        line: usize,
        /// The key as written.
        key: String,
        /// ` (did you mean X?)`, or empty.
        hint: String,
    },
    /// A value (a flag's, or a key's in the env file) is not usable.
    #[error("{source_name}: {problem}")]
    Value {
        /// `--flag`, or `FILE:LINE: KEY`.
        source_name: String,
        /// What is wrong with the value.
        problem: String,
    },
    /// No controller address anywhere.
    #[error(
        "no controller address: pass --controller https://HOST:PORT or set MICROMINE_CONTROLLER in the env file{0}"
    )]
    NoController(String),
    /// A token file that cannot be used.
    #[error("token file {path}: {problem}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The state directory is not this process's to use.
    #[error("state directory {path}: {problem}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

fn known_keys() -> String {
    ENV_KEYS
        .iter()
        .map(|(key, _)| *key)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One value read from an env file, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EnvValue {
    value: String,
    line: usize,
}

/// A parsed env file: only known keys, each at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvFile {
    path: PathBuf,
    values: BTreeMap<&'static str, EnvValue>,
}

impl EnvFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<EnvFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadEnvFile {
            path: path.to_path_buf(),
            source,
        })?;
        EnvFile::parse(path, &text)
    }

    /// Parses the text of an env file read from `path` (used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<EnvFile, ConfigError> {
        let mut values = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let syntax = |problem: String| ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                problem,
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(syntax(format!("`{trimmed}` is not KEY=VALUE")));
            };
            let key = key.trim();
            let Some(known) = ENV_KEYS.iter().map(|(k, _)| *k).find(|k| *k == key) else {
                return Err(ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    line,
                    key: key.to_string(),
                    hint: closest_key(key)
                        .map(|k| format!(" (did you mean {k}?)"))
                        .unwrap_or_default(),
                });
            };
            let value =
                unquote(value.trim()).map_err(|problem| syntax(format!("{key}: {problem}")))?;
            if let Some(first) = values.get(known) {
                let first: &EnvValue = first;
                return Err(syntax(format!(
                    "{key} is set again (first on line {})",
                    first.line
                )));
            }
            values.insert(known, EnvValue { value, line });
        }
        Ok(EnvFile {
            path: path.to_path_buf(),
            values,
        })
    }

    /// The value of `key` and a name for messages (`FILE:LINE: KEY`); an empty value counts
    /// as unset, so a shipped file can list every key.
    fn get(&self, key: &str) -> Option<(String, &str)> {
        let entry = self.values.get(key)?;
        (!entry.value.is_empty()).then(|| {
            (
                format!("{}:{}: {key}", self.path.display(), entry.line),
                entry.value.as_str(),
            )
        })
    }
}

/// Strips one pair of matching quotes; refuses an opening quote without its end.
fn unquote(value: &str) -> Result<String, String> {
    for quote in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(quote) {
            return match rest.strip_suffix(quote) {
                Some(inner) => Ok(inner.to_string()),
                None => Err(format!(
                    "the value opens a {quote} quote that does not close"
                )),
            };
        }
    }
    Ok(value.to_string())
}

/// The known key nearest to `key`, if it is near enough to be a typo.
fn closest_key(key: &str) -> Option<&'static str> {
    let upper = key.to_ascii_uppercase();
    ENV_KEYS
        .iter()
        .map(|(known, _)| (*known, edit_distance(&upper, known)))
        .filter(|(known, distance)| *distance <= 3 || known.ends_with(&upper) && upper.len() > 2)
        .min_by_key(|(_, distance)| *distance)
        .map(|(known, _)| known)
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// What `run` was given on its command line; `None` where a flag was absent. The flags
/// are declared here, beside the env file keys they override.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// The controller's gRPC address (env file: MICROMINE_CONTROLLER).
    #[arg(long, value_name = "https://HOST:PORT")]
    pub controller: Option<String>,
    /// The bootstrap token itself. Prefer --token-file: a command line is visible to
    /// every user through `ps`.
    #[arg(
        long,
        env = "MICROMINE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A file holding the bootstrap token, readable by this user only (first start
    /// only; env file: MICROMINE_TOKEN_FILE).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Read settings from this env file (`KEY=VALUE` lines; keys MICROMINE_CONTROLLER,
    /// _NAME, _LABELS, _TOKEN_FILE, _CA_FILE, _STATE_DIR, _THREADS, _ENGINE, _LOG).
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Device name (default: the host name; env file: MICROMINE_NAME).
    #[arg(long)]
    pub name: Option<String>,
    /// Labels to report, e.g. `site=plant-3,class=gateway` (env file: MICROMINE_LABELS).
    #[arg(long, value_name = "k=v,...")]
    pub labels: Option<String>,
    /// Where the device key and certificates live [default: /var/lib/micromine-agent]
    /// (env file: MICROMINE_STATE_DIR).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Trust this CA bundle instead of the fingerprint in the token (env file:
    /// MICROMINE_CA_FILE).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Hashing threads (default: all cores; env file: MICROMINE_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Hashing engine; `auto` times every engine this CPU runs at the first start (200 ms)
    /// and uses the fastest, keeping the choice in the state directory per CPU model and
    /// agent version (env file: MICROMINE_ENGINE).
    #[arg(long)]
    pub engine: Option<String>,
}

/// Where a bootstrap token was looked for, and what was there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Given directly (`--token`, `MICROMINE_TOKEN`).
    Given,
    /// Read from this file.
    File(PathBuf),
    /// This file was named but is absent, which is fine for a device that has enrolled.
    MissingFile(PathBuf),
    /// None was named or found.
    None,
}

/// The flags and the env file merged and checked: everything `run` needs to start.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// `https://HOST:PORT` of the controller.
    pub controller: String,
    /// The bootstrap token, if one is at hand.
    pub token: Option<BootstrapToken>,
    /// Where the token came from (for the log).
    pub token_source: TokenSource,
    /// The device name to enroll as.
    pub name: Option<String>,
    /// Labels to report.
    pub labels: BTreeMap<String, String>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// A CA bundle to trust instead of the token's fingerprint.
    pub ca_file: Option<PathBuf>,
    /// Hashing threads, if set.
    pub threads: Option<usize>,
    /// The hashing engine asked for.
    pub engine: EngineRequest,
    /// A log filter from the env file.
    pub log_filter: Option<String>,
}

/// Merges `args` over the env file they name (flags win) and checks the result;
/// `credentials_dir` is `$CREDENTIALS_DIRECTORY`, where systemd puts loaded credentials.
pub fn resolve(args: RunArgs, credentials_dir: Option<&Path>) -> Result<RunSettings, ConfigError> {
    let file = match &args.env_file {
        Some(path) => EnvFile::read(path)?,
        None => EnvFile::default(),
    };
    // Each setting: the flag if given, else the file's value, with a name for messages.
    let pick = |flag: Option<String>, flag_name: &str, key: &str| -> Option<(String, String)> {
        flag.map(|v| (flag_name.to_string(), v))
            .or_else(|| file.get(key).map(|(name, v)| (name, v.to_string())))
    };
    let value_error = |source_name: &str, problem: String| ConfigError::Value {
        source_name: source_name.to_string(),
        problem,
    };

    let (controller_name, controller) =
        pick(args.controller, "--controller", "MICROMINE_CONTROLLER").ok_or_else(|| {
            ConfigError::NoController(match &args.env_file {
                Some(path) => format!(" ({} sets none)", path.display()),
                None => String::new(),
            })
        })?;
    check_controller_url(&controller).map_err(|problem| value_error(&controller_name, problem))?;

    let name = match pick(args.name, "--name", "MICROMINE_NAME") {
        Some((source_name, name)) => {
            identity::validate_device_name(&name)
                .map_err(|e| value_error(&source_name, e.to_string()))?;
            Some(name)
        }
        None => None,
    };
    let labels = match pick(args.labels, "--labels", "MICROMINE_LABELS") {
        Some((source_name, text)) => parse_labels(Some(&text))
            .map_err(|e| value_error(&source_name, format!("`{}` {}", e.pair, e.problem)))?,
        None => BTreeMap::new(),
    };
    let state_dir = pick(
        args.state_dir.map(|p| p.display().to_string()),
        "--state-dir",
        "MICROMINE_STATE_DIR",
    )
    .map(|(_, dir)| PathBuf::from(dir))
    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    check_state_dir(&state_dir)?;
    let ca_file = pick(
        args.ca_file.map(|p| p.display().to_string()),
        "--ca-file",
        "MICROMINE_CA_FILE",
    )
    .map(|(_, path)| PathBuf::from(path));
    let threads = match pick(
        args.threads.map(|t| t.to_string()),
        "--threads",
        "MICROMINE_THREADS",
    ) {
        Some((source_name, text)) => match text.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(value_error(
                    &source_name,
                    format!("`{text}` is not a number of threads (1 or more)"),
                ));
            }
        },
        None => None,
    };
    let engine = match pick(args.engine, "--engine", "MICROMINE_ENGINE") {
        Some((source_name, requested)) => engine::select(Some(&requested)).map_err(|e| {
            // The engine's own message starts with `--engine: `; name the real source.
            let text = e.to_string();
            value_error(
                &source_name,
                text.strip_prefix("--engine: ").unwrap_or(&text).to_string(),
            )
        })?,
        None => engine::select(None).map_err(|e| value_error("--engine", e.to_string()))?,
    };
    let log_filter = file.get("MICROMINE_LOG").map(|(_, v)| v.to_string());

    let token_file = args.token_file.clone().or_else(|| {
        file.get("MICROMINE_TOKEN_FILE")
            .map(|(_, v)| PathBuf::from(v))
    });
    let (token, token_source) = if let Some(text) = args.token {
        let token = text
            .trim()
            .parse::<BootstrapToken>()
            .map_err(|e| value_error("--token", e.to_string()))?;
        (Some(token), TokenSource::Given)
    } else if let Some(path) = token_file {
        match read_token_file(&path)? {
            Some(token) => (Some(token), TokenSource::File(path)),
            None if enrolled(&state_dir) => (None, TokenSource::MissingFile(path)),
            None => {
                return Err(ConfigError::TokenFile {
                    problem: format!(
                        "does not exist, and this device has not enrolled yet (no certificate in {}): put the token from `micromine-controller token create` there",
                        state_dir.display()
                    ),
                    path,
                });
            }
        }
    } else {
        let credential = credentials_dir.map(|dir| dir.join(TOKEN_CREDENTIAL));
        match credential {
            Some(path) => match read_token_file(&path)? {
                Some(token) => (Some(token), TokenSource::File(path)),
                None => (None, TokenSource::None),
            },
            None => (None, TokenSource::None),
        }
    };

    Ok(RunSettings {
        controller,
        token,
        token_source,
        name,
        labels,
        state_dir,
        ca_file,
        threads,
        engine,
        log_filter,
    })
}

fn enrolled(state_dir: &Path) -> bool {
    matches!(DeviceIdentity::load(state_dir), Ok(Some(_)))
}

/// Agents speak only TLS to the controller: anything but `https://HOST[:PORT]` is refused
/// here rather than failing later as a connection error.
pub fn check_controller_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(other) => {
            return Err(format!(
                "`{url}` uses {other}://; the agent talks to the controller only over TLS: use https://HOST:PORT"
            ));
        }
        None => return Err(format!("`{url}` has no scheme: use https://HOST:PORT")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` names no host: use https://HOST:PORT"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(format!(
            "`{url}` has a path; the controller's address is https://HOST:PORT alone"
        ));
    }
    Ok(())
}

/// Reads a bootstrap token from `path`. `Ok(None)` when the file does not exist; an error
/// when it cannot be read, is not a plain file, is readable or writable by others, or
/// does not hold a token.
pub fn read_token_file(path: &Path) -> Result<Option<BootstrapToken>, ConfigError> {
    let problem = |problem: String| ConfigError::TokenFile {
        path: path.to_path_buf(),
        problem,
    };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(problem(format!("cannot be examined: {e}"))),
    };
    if !metadata.is_file() {
        return Err(problem("is not a regular file".to_string()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            return Err(problem(format!(
                "has mode {mode:04o}: others can {} it; a bootstrap token is a secret: chmod o-rwx it (0600 or 0640)",
                if mode & 0o004 != 0 { "read" } else { "use" }
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        problem(match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                format!("cannot be read by this process ({}): {e}", process_user())
            }
            _ => format!("cannot be read: {e}"),
        })
    })?;
    let token = text
        .trim()
        .parse::<BootstrapToken>()
        .map_err(|e| problem(format!("does not hold a bootstrap token: {e}")))?;
    Ok(Some(token))
}

/// Refuses a state directory owned by another user: the agent would write a device key
/// that user can read, or fail to write at all after enrolling.
pub fn check_state_dir(path: &Path) -> Result<(), ConfigError> {
    let problem = |problem: String| ConfigError::StateDir {
        path: path.to_path_buf(),
        problem,
    };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        // Created (private) at enrollment.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(problem(format!("cannot be examined: {e}"))),
    };
    if !metadata.is_dir() {
        return Err(problem("is not a directory".to_string()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = rustix::process::geteuid().as_raw();
        if metadata.uid() != me {
            return Err(problem(format!(
                "is owned by uid {}, but the agent runs as uid {me}; chown it to the agent's user, or pass another --state-dir",
                metadata.uid()
            )));
        }
    }
    Ok(())
}

fn process_user() -> String {
    #[cfg(unix)]
    {
        format!("uid {}", rustix::process::geteuid().as_raw())
    }
    #[cfg(not(unix))]
    {
        "this user".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = concat!(
        "mm1.0123456789abcdef.0123456789abcdef0123456789abcdef.",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    );

    fn env(text: &str) -> Result<EnvFile, ConfigError> {
        EnvFile::parse(Path::new("/etc/micromine/agent.env"), text)
    }

    #[test]
    fn env_files_take_comments_quotes_and_empty_values() {
        let file = env(concat!(
            "# the shipped file\n",
            "\n",
            "MICROMINE_CONTROLLER=https://ctl.example:7443\n",
            "  MICROMINE_LABELS = \"site=plant-3,class=gateway\"  \n",
            "MICROMINE_NAME=\n",
            "; also a comment\n",
            "MICROMINE_LOG='info,micromine_agent=debug'\n",
        ))
        .expect("valid");
        assert_eq!(
            file.get("MICROMINE_CONTROLLER"),
            Some((
                "/etc/micromine/agent.env:3: MICROMINE_CONTROLLER".to_string(),
                "https://ctl.example:7443"
            ))
        );
        assert_eq!(
            file.get("MICROMINE_LABELS").map(|(_, v)| v),
            Some("site=plant-3,class=gateway")
        );
        assert_eq!(file.get("MICROMINE_NAME"), None, "empty is unset");
        assert_eq!(
            file.get("MICROMINE_LOG").map(|(_, v)| v),
            Some("info,micromine_agent=debug")
        );
    }

    #[test]
    fn a_misspelt_key_is_named_with_its_line_and_the_likely_one() {
        let err = env("MICROMINE_NAME=gw-1\nMICROMINE_CONTROLER=https://x:1\n").expect_err("typo");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "/etc/micromine/agent.env:2: unknown key MICROMINE_CONTROLER (did you mean MICROMINE_CONTROLLER?); the keys are MICROMINE_CONTROLLER, "
            ),
            "{text}"
        );
        // Without the prefix, and in lower case, still found.
        let err = env("controller=https://x:1").expect_err("bare key");
        assert!(
            err.to_string()
                .contains("(did you mean MICROMINE_CONTROLLER?)"),
            "{err}"
        );
        // Nothing near: no guess.
        let err = env("PATH=/usr/bin").expect_err("foreign key");
        assert!(
            err.to_string().contains("unknown key PATH; the keys are"),
            "{err}"
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let err = env("MICROMINE_CONTROLLER https://x:1").expect_err("no =");
        assert_eq!(
            err.to_string(),
            "/etc/micromine/agent.env:1: `MICROMINE_CONTROLLER https://x:1` is not KEY=VALUE"
        );
        let err = env("\nMICROMINE_LABELS=\"site=a").expect_err("open quote");
        assert_eq!(
            err.to_string(),
            "/etc/micromine/agent.env:2: MICROMINE_LABELS: the value opens a \" quote that does not close"
        );
        let err = env("MICROMINE_NAME=a\nMICROMINE_NAME=b").expect_err("twice");
        assert_eq!(
            err.to_string(),
            "/etc/micromine/agent.env:2: MICROMINE_NAME is set again (first on line 1)"
        );
    }

    #[test]
    fn only_https_controller_urls_pass() {
        assert!(check_controller_url("https://127.0.0.1:7443").is_ok());
        assert!(check_controller_url("https://ctl.plant-3.example:7443/").is_ok());
        for (url, expect) in [
            ("http://ctl:7443", "uses http://"),
            ("ctl:7443", "has no scheme"),
            ("grpc://ctl:7443", "uses grpc://"),
            ("https://ctl:7443/v1", "has a path"),
            ("https://", "not a URL"),
            ("", "not a URL"),
        ] {
            let problem = check_controller_url(url).expect_err(url);
            assert!(problem.contains(expect), "{url}: {problem}");
        }
    }

    fn private_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn token_files_others_can_read_are_refused_with_path_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = private_file(dir.path(), "token", &format!("{TOKEN}\n"), 0o600);
        assert!(read_token_file(&good).expect("readable").is_some());
        let group = private_file(dir.path(), "group-token", TOKEN, 0o640);
        assert!(read_token_file(&group).expect("group may read").is_some());
        let open = private_file(dir.path(), "open-token", TOKEN, 0o644);
        let err = read_token_file(&open).expect_err("world-readable");
        assert_eq!(
            err.to_string(),
            format!(
                "token file {}: has mode 0644: others can read it; a bootstrap token is a secret: chmod o-rwx it (0600 or 0640)",
                open.display()
            )
        );
        let writable = private_file(dir.path(), "w-token", TOKEN, 0o602);
        assert!(read_token_file(&writable).is_err(), "others can write it");
        let junk = private_file(dir.path(), "junk", "not a token", 0o600);
        let err = read_token_file(&junk).expect_err("junk");
        assert!(
            err.to_string().contains("does not hold a bootstrap token"),
            "{err}"
        );
        assert!(
            read_token_file(&dir.path().join("absent"))
                .expect("absent")
                .is_none()
        );
        let err = read_token_file(dir.path()).expect_err("a directory");
        assert!(err.to_string().ends_with("is not a regular file"), "{err}");
    }

    fn args(dir: &Path) -> RunArgs {
        RunArgs {
            controller: Some("https://127.0.0.1:7443".to_string()),
            state_dir: Some(dir.join("state")),
            ..RunArgs::default()
        }
    }

    #[test]
    fn flags_win_over_the_env_file_and_empty_keys_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = private_file(dir.path(), "token", TOKEN, 0o600);
        let env_file = private_file(
            dir.path(),
            "agent.env",
            &format!(
                "MICROMINE_CONTROLLER=https://from-file:7443\nMICROMINE_NAME=gw-file\nMICROMINE_LABELS=site=file\nMICROMINE_TOKEN_FILE={}\nMICROMINE_THREADS=3\nMICROMINE_ENGINE=\n",
                token.display()
            ),
            0o644,
        );
        let settings = resolve(
            RunArgs {
                env_file: Some(env_file.clone()),
                name: Some("gw-flag".to_string()),
                ..args(dir.path())
            },
            None,
        )
        .expect("valid");
        assert_eq!(settings.controller, "https://127.0.0.1:7443");
        assert_eq!(settings.name.as_deref(), Some("gw-flag"));
        assert_eq!(
            settings.labels.get("site").map(String::as_str),
            Some("file")
        );
        assert_eq!(settings.threads, Some(3));
        assert_eq!(settings.token_source, TokenSource::File(token));
        assert!(settings.token.is_some());
        assert_eq!(settings.engine, EngineRequest::Auto);

        let only_file = resolve(
            RunArgs {
                env_file: Some(env_file),
                state_dir: Some(dir.path().join("state")),
                ..RunArgs::default()
            },
            None,
        )
        .expect("valid");
        assert_eq!(only_file.controller, "https://from-file:7443");
    }

    #[test]
    fn bad_values_name_the_file_line_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, expect) in [
            (
                "MICROMINE_CONTROLLER=http://ctl:7443",
                "agent.env:1: MICROMINE_CONTROLLER: `http://ctl:7443` uses http://",
            ),
            (
                "MICROMINE_CONTROLLER=https://ctl:1\nMICROMINE_THREADS=many",
                "agent.env:2: MICROMINE_THREADS: `many` is not a number of threads",
            ),
            (
                "MICROMINE_CONTROLLER=https://ctl:1\nMICROMINE_LABELS=site",
                "agent.env:2: MICROMINE_LABELS: `site` is not key=value",
            ),
            (
                "MICROMINE_CONTROLLER=https://ctl:1\nMICROMINE_ENGINE=warp-drive",
                "agent.env:2: MICROMINE_ENGINE: ",
            ),
            (
                "MICROMINE_CONTROLLER=https://ctl:1\nMICROMINE_NAME=Not_A_Name",
                "agent.env:2: MICROMINE_NAME: device name `Not_A_Name` is invalid",
            ),
            (
                "MICROMINE_NAME=gw-1",
                "no controller address: pass --controller https://HOST:PORT or set MICROMINE_CONTROLLER in the env file (",
            ),
        ] {
            let env_file = private_file(dir.path(), "agent.env", text, 0o644);
            let err = resolve(
                RunArgs {
                    env_file: Some(env_file),
                    state_dir: Some(dir.path().join("state")),
                    ..RunArgs::default()
                },
                None,
            )
            .expect_err(text);
            assert!(err.to_string().contains(expect), "{text}: {err}");
        }
        let err = resolve(
            RunArgs {
                env_file: Some(dir.path().join("missing.env")),
                ..args(dir.path())
            },
            None,
        )
        .expect_err("missing env file");
        assert!(err.to_string().starts_with("reading "), "{err}");
    }

    #[test]
    fn the_token_comes_from_the_named_file_or_the_systemd_credential() {
        let dir = tempfile::tempdir().expect("tempdir");
        let credentials = dir.path().join("credentials");
        std::fs::create_dir(&credentials).expect("mkdir");
        // No token anywhere: not an error here (an enrolled device needs none).
        let none = resolve(args(dir.path()), Some(&credentials)).expect("no token");
        assert_eq!(none.token_source, TokenSource::None);
        // systemd's credential (mode 0400, owned by the service user).
        let credential = private_file(&credentials, TOKEN_CREDENTIAL, TOKEN, 0o400);
        let loaded = resolve(args(dir.path()), Some(&credentials)).expect("credential");
        assert_eq!(loaded.token_source, TokenSource::File(credential));
        // A named file that is missing on a device that never enrolled says so.
        let missing = dir.path().join("nowhere");
        let err = resolve(
            RunArgs {
                token_file: Some(missing.clone()),
                ..args(dir.path())
            },
            Some(&credentials),
        )
        .expect_err("missing token file, not enrolled");
        assert!(
            err.to_string().starts_with(&format!(
                "token file {}: does not exist, and this device has not enrolled yet",
                missing.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn a_state_dir_of_another_user_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_state_dir(dir.path()).is_ok(), "our own");
        assert!(
            check_state_dir(&dir.path().join("later")).is_ok(),
            "made at enrollment"
        );
        let file = private_file(dir.path(), "file", "", 0o600);
        assert!(check_state_dir(&file).is_err(), "not a directory");
        // Another owner: `/` belongs to root, so this holds for any other user; as root,
        // a directory handed to nobody.
        let foreign = if rustix::process::geteuid().is_root() {
            let foreign = dir.path().join("foreign");
            std::fs::create_dir(&foreign).expect("mkdir");
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
            foreign
        } else {
            PathBuf::from("/")
        };
        let err = check_state_dir(&foreign).expect_err("foreign");
        assert!(
            err.to_string().contains("is owned by uid ")
                && err.to_string().contains(", but the agent runs as uid "),
            "{err}"
        );
    }
}
