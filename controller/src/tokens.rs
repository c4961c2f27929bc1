//! Bootstrap tokens: what a device presents, once or a few times, to buy its first
//! certificate.
//!
//! Tokens live as one JSON file per token under a directory rather than in the embedded
//! database, so `micromine-controller token create` works while a running controller holds
//! the database open. A file holds the SHA-256 of the secret, never the secret itself: a
//! leaked token directory does not let anyone enroll.
//!
//! # Files
//! `<dir>/<id hex>.json`, mode 0600:
//! `{id, secret_sha256, created_unix_ms, expires_unix_ms, uses_remaining, labels}`.
//! A file is deleted when its last use is consumed or when it is found expired.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use micromine_proto::token::BootstrapToken;
use rand::TryRng;
use rand::rngs::SysRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use micromine_host::files::{FileError, create_private_dir, write_file_atomic};

/// Tokens older than this are a liability, not a convenience.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything that can go wrong creating, redeeming or listing tokens. The redeem variants
/// are distinct so the controller can log the precise reason while telling the client only
/// "invalid or expired token".
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token directory or a token file could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A token file exists but is not a token record.
    #[error("token file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A field of a [`TokenSpec`] is out of range.
    #[error("token {field} {value} is invalid: {reason}")]
    InvalidSpec {
        /// The field, e.g. "uses".
        field: &'static str,
        /// The rejected value, as given.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
    /// A human duration such as `--ttl 1h30m` did not parse.
    #[error("duration `{input}` is invalid: {reason} (use e.g. 90s, 15m, 24h, 7d, 1h30m)")]
    InvalidDuration {
        /// The input as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No token with this id exists (never created, deleted, or already used up before this
    /// store was opened).
    #[error("token {id} is unknown")]
    UnknownToken {
        /// The token id, hex.
        id: String,
    },
    /// The id exists but the secret does not match.
    #[error("token {id}: wrong secret")]
    WrongSecret {
        /// The token id, hex.
        id: String,
    },
    /// The token was minted for a different CA than the one this controller serves with.
    #[error("token {id} was issued for CA {token_ca}, this controller's CA is {our_ca}")]
    WrongCa {
        /// The token id, hex.
        id: String,
        /// The CA fingerprint in the token, hex.
        token_ca: String,
        /// This controller's CA fingerprint, hex.
        our_ca: String,
    },
    /// The token's time is up.
    #[error("token {id} expired at {expires_unix_ms} (unix ms)")]
    Expired {
        /// The token id, hex.
        id: String,
        /// When it expired.
        expires_unix_ms: i64,
    },
    /// Every use of the token has been consumed.
    #[error("token {id} has no uses left")]
    UsedUp {
        /// The token id, hex.
        id: String,
    },
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

/// What a new token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// How long the token stays valid; at most a year.
    pub ttl: Duration,
    /// How many devices may enroll with it; at least 1.
    pub uses: u32,
    /// Labels given to devices enrolled with this token (the device's own labels win on
    /// conflict is the caller's policy; the store only carries them).
    pub labels: BTreeMap<String, String>,
}

impl Default for TokenSpec {
    /// One device within a day: the safe default for a token pasted into a terminal.
    fn default() -> Self {
        TokenSpec {
            ttl: Duration::from_secs(24 * 3600),
            uses: 1,
            labels: BTreeMap::new(),
        }
    }
}

/// What the store knows about a token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The public id, hex (the file name without `.json`).
    pub id_hex: String,
    /// When the token was made, Unix ms.
    pub created_unix_ms: i64,
    /// When it stops working, Unix ms.
    pub expires_unix_ms: i64,
    /// Uses left after this operation (after the consumed use, for `redeem`).
    pub uses_remaining: u32,
    /// Labels for devices that enroll with it.
    pub labels: BTreeMap<String, String>,
}

/// The stored form (a file here, a Secret in Kubernetes mode). `id` is repeated inside so
/// a renamed file or Secret is detected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenFile {
    pub(crate) id: String,
    secret_sha256: String,
    created_unix_ms: i64,
    expires_unix_ms: i64,
    uses_remaining: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// What presenting a token to its stored record decided.
#[derive(Debug)]
pub(crate) enum Consumed {
    /// Refused; the record stays as it is.
    Refused(TokenError),
    /// Refused, and the record is dead (expired or used up): delete it.
    Discard(TokenError),
    /// The last use was consumed: delete the record, then enroll.
    Last,
    /// A use was consumed: store the record with one use fewer, then enroll.
    Some,
}

impl TokenFile {
    /// Checks `presented` (the SHA-256 of the secret) before anything else about the
    /// record is revealed or changed (constant-time), then expiry and uses left, and takes
    /// one use. `location` names the record in a corruption error.
    pub(crate) fn consume(
        &mut self,
        presented: &[u8; 32],
        now_unix_ms: i64,
        location: &str,
    ) -> Consumed {
        let id = self.id.clone();
        let Some(stored) = decode_hash(&self.secret_sha256) else {
            return Consumed::Refused(TokenError::Corrupt {
                path: PathBuf::from(location),
                reason: "secret_sha256 is not 64 hex digits".into(),
            });
        };
        if !ct_eq(&stored, presented) {
            return Consumed::Refused(TokenError::WrongSecret { id });
        }
        if now_unix_ms >= self.expires_unix_ms {
            return Consumed::Discard(TokenError::Expired {
                id,
                expires_unix_ms: self.expires_unix_ms,
            });
        }
        if self.uses_remaining == 0 {
            return Consumed::Discard(TokenError::UsedUp { id });
        }
        self.uses_remaining -= 1;
        if self.uses_remaining == 0 {
            Consumed::Last
        } else {
            Consumed::Some
        }
    }

    pub(crate) fn record(&self) -> TokenRecord {
        TokenRecord {
            id_hex: self.id.clone(),
            created_unix_ms: self.created_unix_ms,
            expires_unix_ms: self.expires_unix_ms,
            uses_remaining: self.uses_remaining,
            labels: self.labels.clone(),
        }
    }
}

/// The token directory.
#[derive(Debug)]
pub struct TokenStore {
    dir: PathBuf,
    /// Serialises redeem's read-modify-write within this process, and remembers tokens whose
    /// last use this process consumed (id → secret hash), so a replay reports `UsedUp`
    /// rather than `UnknownToken` although the file is gone.
    redeem_lock: Mutex<HashMap<[u8; 8], [u8; 32]>>,
}

impl TokenStore {
    /// Opens the token directory, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<TokenStore, TokenError> {
        create_private_dir(dir).map_err(FileError::at("creating directory", dir))?;
        Ok(TokenStore {
            dir: dir.to_path_buf(),
            redeem_lock: Mutex::new(HashMap::new()),
        })
    }

    /// Mints a token: random id and secret from the OS RNG, bound to `ca_fingerprint` so a
    /// device can authenticate the controller before it reveals the secret.
    pub fn create(
        &self,
        spec: &TokenSpec,
        ca_fingerprint: [u8; 32],
    ) -> Result<(BootstrapToken, TokenRecord), TokenError> {
        let (token, file) = mint(spec, ca_fingerprint)?;
        self.write(&file)?;
        Ok((token, file.record()))
    }

    /// Checks and consumes one use of `token`.
    ///
    /// Unknown id, wrong secret (constant-time comparison of the SHA-256), wrong CA, expired
    /// and used up are distinct errors. The secret is checked before anything else about the
    /// file is revealed or changed. The file is deleted when its last use is consumed, and
    /// when it is found expired.
    pub fn redeem(
        &self,
        token: &BootstrapToken,
        ca_fingerprint: [u8; 32],
        now_unix_ms: i64,
    ) -> Result<TokenRecord, TokenError> {
        let id = token.id_hex();
        check_ca(token, ca_fingerprint)?;
        let presented: [u8; 32] = Sha256::digest(token.secret).into();
        // A poisoned lock only means another redeem panicked; the files are the truth.
        let mut used_up = self
            .redeem_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);

        let path = self.path_for(&id);
        let Some(mut file) = self.read(&path)? else {
            return match used_up.get(&token.id) {
                Some(stored) if ct_eq(stored, &presented) => Err(TokenError::UsedUp { id }),
                Some(_) => Err(TokenError::WrongSecret { id }),
                None => Err(TokenError::UnknownToken { id }),
            };
        };
        // Durable before success: a crash after this point costs the device a use, never
        // grants an extra one.
        match file.consume(&presented, now_unix_ms, &path.display().to_string()) {
            Consumed::Refused(e) => Err(e),
            Consumed::Discard(e) => {
                self.remove(&path)?;
                Err(e)
            }
            Consumed::Last => {
                self.remove(&path)?;
                used_up.insert(token.id, presented);
                Ok(file.record())
            }
            Consumed::Some => {
                self.write(&file)?;
                Ok(file.record())
            }
        }
    }

    /// All tokens on disk, oldest first, for operators. Unreadable or corrupt files are
    /// skipped with a warning so one bad file does not hide the rest. Expired tokens are
    /// listed too (their expiry says so); `redeem` deletes them when presented.
    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let entries = fs::read_dir(&self.dir).map_err(FileError::at("listing", &self.dir))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    tracing::warn!(dir = %self.dir.display(), %error, "skipping unreadable directory entry");
                    continue;
                }
            };
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            match self.read(&path) {
                Ok(Some(file)) => records.push(file.record()),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "skipping token file"),
            }
        }
        records.sort_by(|a, b| (a.created_unix_ms, &a.id_hex).cmp(&(b.created_unix_ms, &b.id_hex)));
        Ok(records)
    }

    fn path_for(&self, id_hex: &str) -> PathBuf {
        self.dir.join(format!("{id_hex}.json"))
    }

    /// `None` when the file does not exist.
    fn read(&self, path: &Path) -> Result<Option<TokenFile>, TokenError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TokenError::Io(FileError {
                    action: "reading",
                    path: path.to_path_buf(),
                    source,
                }));
            }
        };
        let corrupt = |reason: String| TokenError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file: TokenFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let expected_name = format!("{}.json", file.id);
        if path.file_name().is_none_or(|name| *name != *expected_name) {
            return Err(corrupt(format!("it holds token {}", file.id)));
        }
        Ok(Some(file))
    }

    fn write(&self, file: &TokenFile) -> Result<(), TokenError> {
        let path = self.path_for(&file.id);
        let corrupt = |reason: String| TokenError::Corrupt {
            path: path.clone(),
            reason,
        };
        let mut json = serde_json::to_vec_pretty(file).map_err(|e| corrupt(e.to_string()))?;
        json.push(b'\n');
        write_file_atomic(&path, &json, 0o600).map_err(|source| {
            TokenError::Io(FileError {
                action: "writing",
                path: path.clone(),
                source,
            })
        })
    }

    fn remove(&self, path: &Path) -> Result<(), TokenError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(TokenError::Io(FileError {
                action: "deleting",
                path: path.to_path_buf(),
                source,
            })),
        }
    }
}

/// A new token for `spec` and the record to store for it: random id and secret from the
/// OS RNG, bound to `ca_fingerprint` so a device can authenticate the controller before
/// it reveals the secret. Only the secret's hash is in the record.
pub(crate) fn mint(
    spec: &TokenSpec,
    ca_fingerprint: [u8; 32],
) -> Result<(BootstrapToken, TokenFile), TokenError> {
    if spec.uses == 0 {
        return Err(TokenError::InvalidSpec {
            field: "uses",
            value: spec.uses.to_string(),
            reason: "must be at least 1",
        });
    }
    if spec.ttl.is_zero() || spec.ttl > MAX_TTL {
        return Err(TokenError::InvalidSpec {
            field: "ttl",
            value: format!("{:?}", spec.ttl),
            reason: "must be positive and at most 365 days",
        });
    }
    let mut id = [0u8; 8];
    let mut secret = [0u8; 16];
    for buf in [&mut id[..], &mut secret[..]] {
        SysRng
            .try_fill_bytes(buf)
            .map_err(|e| TokenError::Random(e.to_string()))?;
    }
    let token = BootstrapToken {
        id,
        secret,
        ca_fingerprint,
    };
    let created_unix_ms = now_unix_ms();
    let ttl_ms = i64::try_from(spec.ttl.as_millis()).unwrap_or(i64::MAX);
    let file = TokenFile {
        id: token.id_hex(),
        secret_sha256: hex::encode(Sha256::digest(secret)),
        created_unix_ms,
        expires_unix_ms: created_unix_ms.saturating_add(ttl_ms),
        uses_remaining: spec.uses,
        labels: spec.labels.clone(),
    };
    Ok((token, file))
}

/// A token minted for another CA is refused before its secret is looked at.
pub(crate) fn check_ca(token: &BootstrapToken, ca_fingerprint: [u8; 32]) -> Result<(), TokenError> {
    if token.ca_fingerprint != ca_fingerprint {
        return Err(TokenError::WrongCa {
            id: token.id_hex(),
            token_ca: hex::encode(token.ca_fingerprint),
            our_ca: hex::encode(ca_fingerprint),
        });
    }
    Ok(())
}

/// Parses the human durations `--ttl` takes: one or more `<number><unit>` pairs with units
/// `s`, `m`, `h`, `d`, e.g. `90s`, `15m`, `24h`, `7d`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, TokenError> {
    let input = s.trim();
    let fail = |reason| TokenError::InvalidDuration {
        input: s.to_string(),
        reason,
    };
    if input.is_empty() {
        return Err(fail("it is empty"));
    }
    let mut total: u64 = 0;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(fail("expected a number"));
        }
        let (number, after) = rest.split_at(digits);
        let value: u64 = number.parse().map_err(|_| fail("number is too large"))?;
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "" => return Err(fail("every number needs a unit (s, m, h, d)")),
            _ => return Err(fail("unknown unit; use s, m, h or d")),
        };
        total = value
            .checked_mul(scale)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(|| fail("it is too long"))?;
        rest = after;
    }
    Ok(Duration::from_secs(total))
}

/// Compares without an early exit, so response timing does not reveal how many leading
/// bytes of a guessed secret's hash were right.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// Wall-clock now in Unix milliseconds, the unit token files use.
pub fn now_unix_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CA: [u8; 32] = [7; 32];

    fn store() -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("tokens")).unwrap();
        (dir, store)
    }

    fn spec(uses: u32) -> TokenSpec {
        TokenSpec {
            uses,
            labels: BTreeMap::from([("site".to_string(), "plant-3".to_string())]),
            ..TokenSpec::default()
        }
    }

    #[test]
    fn a_token_works_uses_times_then_is_used_up() {
        let (_dir, store) = store();
        let (token, record) = store.create(&spec(3), CA).unwrap();
        assert_eq!(record.uses_remaining, 3);
        let now = now_unix_ms();
        for left in [2, 1, 0] {
            let redeemed = store.redeem(&token, CA, now).unwrap();
            assert_eq!(redeemed.uses_remaining, left);
            assert_eq!(redeemed.labels["site"], "plant-3");
        }
        assert!(
            !store.path_for(&token.id_hex()).exists(),
            "file kept after the last use"
        );
        assert!(matches!(
            store.redeem(&token, CA, now),
            Err(TokenError::UsedUp { .. })
        ));
        // A reopened store no longer remembers it, and says so honestly.
        let reopened = TokenStore::open(&store.dir).unwrap();
        assert!(matches!(
            reopened.redeem(&token, CA, now),
            Err(TokenError::UnknownToken { .. })
        ));
    }

    #[test]
    fn the_token_string_round_trips_into_redeem() {
        let (_dir, store) = store();
        let (token, _) = store.create(&spec(1), CA).unwrap();
        let parsed: BootstrapToken = token.to_string().parse().unwrap();
        store.redeem(&parsed, CA, now_unix_ms()).unwrap();
    }

    #[test]
    fn expired_tokens_fail_and_are_deleted() {
        let (_dir, store) = store();
        let (token, record) = store.create(&spec(2), CA).unwrap();
        let err = store
            .redeem(&token, CA, record.expires_unix_ms)
            .unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err}");
        assert!(!store.path_for(&token.id_hex()).exists());
        assert!(matches!(
            store.redeem(&token, CA, record.created_unix_ms),
            Err(TokenError::UnknownToken { .. })
        ));
    }

    #[test]
    fn a_wrong_secret_fails_and_consumes_nothing() {
        let (_dir, store) = store();
        let (token, _) = store.create(&spec(1), CA).unwrap();
        let mut forged = token.clone();
        forged.secret[15] ^= 1;
        let now = now_unix_ms();
        assert!(matches!(
            store.redeem(&forged, CA, now),
            Err(TokenError::WrongSecret { .. })
        ));
        store.redeem(&token, CA, now).unwrap();
        // After the last use the wrong secret is still called wrong, not "used up".
        assert!(matches!(
            store.redeem(&forged, CA, now),
            Err(TokenError::WrongSecret { .. })
        ));
    }

    #[test]
    fn a_token_for_another_ca_fails() {
        let (_dir, store) = store();
        let (token, _) = store.create(&spec(1), CA).unwrap();
        let err = store.redeem(&token, [8; 32], now_unix_ms()).unwrap_err();
        assert!(matches!(err, TokenError::WrongCa { .. }), "{err}");
        // And the use was not consumed.
        store.redeem(&token, CA, now_unix_ms()).unwrap();
    }

    #[test]
    fn unknown_ids_fail() {
        let (_dir, store) = store();
        let token = BootstrapToken {
            id: [1; 8],
            secret: [2; 16],
            ca_fingerprint: CA,
        };
        assert!(matches!(
            store.redeem(&token, CA, now_unix_ms()),
            Err(TokenError::UnknownToken { .. })
        ));
    }

    #[test]
    fn the_stored_file_holds_a_hash_not_the_secret() {
        let (_dir, store) = store();
        let (token, _) = store.create(&spec(1), CA).unwrap();
        let path = store.path_for(&token.id_hex());
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(token.secret)));
        assert!(!text.contains(&token.to_string()));
        assert!(text.contains(&hex::encode(Sha256::digest(token.secret))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir_mode = fs::metadata(&store.dir).unwrap().permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let (_dir, store) = store();
        let err = store.create(&spec(0), CA).unwrap_err();
        assert!(
            matches!(err, TokenError::InvalidSpec { field: "uses", .. }),
            "{err}"
        );
        let zero_ttl = TokenSpec {
            ttl: Duration::ZERO,
            ..spec(1)
        };
        let err = store.create(&zero_ttl, CA).unwrap_err();
        assert!(
            matches!(err, TokenError::InvalidSpec { field: "ttl", .. }),
            "{err}"
        );
    }

    #[test]
    fn list_shows_tokens_and_skips_corrupt_files() {
        let (_dir, store) = store();
        let (a, _) = store.create(&spec(1), CA).unwrap();
        let (b, _) = store.create(&spec(2), CA).unwrap();
        fs::write(store.dir.join("0000000000000000.json"), "{ not json").unwrap();
        fs::write(store.dir.join("README"), "ignored").unwrap();
        let listed = store.list().unwrap();
        let mut ids: Vec<_> = listed.iter().map(|r| r.id_hex.clone()).collect();
        ids.sort();
        let mut expected = vec![a.id_hex(), b.id_hex()];
        expected.sort();
        assert_eq!(ids, expected);
    }

    #[test]
    fn a_corrupt_file_is_named_when_redeemed() {
        let (_dir, store) = store();
        let (token, _) = store.create(&spec(1), CA).unwrap();
        let path = store.path_for(&token.id_hex());
        fs::write(&path, "garbage").unwrap();
        let err = store.redeem(&token, CA, now_unix_ms()).unwrap_err();
        assert!(err.to_string().contains(&token.id_hex()), "{err}");
        assert!(matches!(err, TokenError::Corrupt { .. }));
    }

    #[test]
    fn concurrent_redeems_never_exceed_the_uses() {
        let (_dir, store) = store();
        let (token, _) = store.create(&spec(5), CA).unwrap();
        let now = now_unix_ms();
        let successes: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| scope.spawn(|| store.redeem(&token, CA, now).is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(successes, 5);
    }

    #[test]
    fn durations_parse() {
        let cases = [
            ("90s", 90),
            ("15m", 900),
            ("24h", 86_400),
            ("7d", 604_800),
            ("1h30m", 5_400),
            ("1d12h", 129_600),
            (" 5m ", 300),
            ("0s", 0),
        ];
        for (text, secs) in cases {
            assert_eq!(
                parse_duration(text).unwrap(),
                Duration::from_secs(secs),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_durations_say_why() {
        for bad in [
            "",
            "90",
            "h",
            "5x",
            "1.5h",
            "-5m",
            "1h30",
            "99999999999999999999s",
            "9999999999999999d",
        ] {
            match parse_duration(bad) {
                Err(TokenError::InvalidDuration { input, .. }) => assert_eq!(input, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
