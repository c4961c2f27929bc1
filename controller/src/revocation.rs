//! Revoked devices.
//!
//! A revocation names a device and a moment: every certificate of that device issued at or
//! before the moment is refused during the TLS handshake from then on, and a live session is
//! cut within seconds. A *blocked* device is also refused new certificates (no enrollment
//! or renewal under its name) until it is unblocked; unblocking keeps the old certificates
//! refused, so the device must enroll again with a fresh token.
//!
//! In standalone mode revocations are files under `<data-dir>/revocations/` (one JSON file
//! per device), written by `micromine-controller device revoke|unrevoke` while the
//! controller runs and picked up by it within a second, the same way tokens are shared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// One device's revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    /// Certificates whose validity starts at or before this are refused (Unix ms).
    pub revoked_at_unix_ms: i64,
    /// No new certificate for this name either.
    pub blocked: bool,
}

impl Revocation {
    /// Whether a certificate issued at `issued_unix_ms` is refused.
    pub fn refuses(&self, issued_unix_ms: i64) -> bool {
        self.blocked || issued_unix_ms <= self.revoked_at_unix_ms
    }
}

/// The revocations in force, shared by the TLS verifier and the gRPC services.
#[derive(Debug, Default)]
pub struct Revocations {
    by_device: RwLock<HashMap<String, Revocation>>,
}

impl Revocations {
    /// Replaces the whole set; returns the devices whose revocation is new or moved later,
    /// whose sessions must be cut.
    pub fn replace(&self, new: HashMap<String, Revocation>) -> Vec<String> {
        let mut current = self.by_device.write().unwrap_or_else(|p| p.into_inner());
        let mut cut: Vec<String> = new
            .iter()
            .filter(|(name, r)| {
                current.get(*name).is_none_or(|old| {
                    r.revoked_at_unix_ms > old.revoked_at_unix_ms || (r.blocked && !old.blocked)
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        cut.sort();
        *current = new;
        cut
    }

    /// Whether a certificate of `device` issued at `issued_unix_ms` is refused.
    pub fn refuses(&self, device: &str, issued_unix_ms: i64) -> bool {
        self.by_device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .is_some_and(|r| r.refuses(issued_unix_ms))
    }

    /// Whether `device` may not get new certificates.
    pub fn is_blocked(&self, device: &str) -> bool {
        self.by_device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .is_some_and(|r| r.blocked)
    }

    /// The revocation of `device`, if any.
    pub fn get(&self, device: &str) -> Option<Revocation> {
        self.by_device
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .copied()
    }
}

/// Why the revocation directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// Reading or writing failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a revocation.
    #[error("{path}: not a revocation record: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The device name is not one a certificate could carry.
    #[error("device name `{name}` {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The revocation directory of a standalone controller.
#[derive(Debug, Clone)]
pub struct RevocationStore {
    dir: PathBuf,
}

impl RevocationStore {
    /// Opens (creating) the directory.
    pub fn open(dir: &Path) -> Result<RevocationStore, RevocationError> {
        std::fs::create_dir_all(dir).map_err(|source| RevocationError::Io {
            action: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(RevocationStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, device: &str) -> Result<PathBuf, RevocationError> {
        if let Some(reason) = micromine_proto::names::dns_label_problem(device) {
            return Err(RevocationError::InvalidName {
                name: device.to_string(),
                reason,
            });
        }
        Ok(self.dir.join(format!("{device}.json")))
    }

    /// Revokes every certificate `device` holds now and blocks new ones.
    pub fn revoke(&self, device: &str, now_unix_ms: i64) -> Result<Revocation, RevocationError> {
        let revocation = Revocation {
            revoked_at_unix_ms: now_unix_ms,
            blocked: true,
        };
        self.write(device, &revocation)?;
        Ok(revocation)
    }

    /// Lets `device` enroll again; the certificates revoked earlier stay refused.
    pub fn unblock(&self, device: &str) -> Result<Option<Revocation>, RevocationError> {
        let path = self.path(device)?;
        let Some(mut revocation) = self.read_file(&path)? else {
            return Ok(None);
        };
        revocation.blocked = false;
        self.write(device, &revocation)?;
        Ok(Some(revocation))
    }

    fn write(&self, device: &str, revocation: &Revocation) -> Result<(), RevocationError> {
        let path = self.path(device)?;
        let text = serde_json::to_vec_pretty(revocation).map_err(|e| RevocationError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // Write then rename, so the controller never reads half a file.
        let temp = self.dir.join(format!(".{device}.json.tmp"));
        std::fs::write(&temp, text).map_err(|source| RevocationError::Io {
            action: "writing",
            path: temp.clone(),
            source,
        })?;
        std::fs::rename(&temp, &path).map_err(|source| RevocationError::Io {
            action: "renaming into place",
            path: path.clone(),
            source,
        })
    }

    fn read_file(&self, path: &Path) -> Result<Option<Revocation>, RevocationError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| RevocationError::Corrupt {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RevocationError::Io {
                action: "reading",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Every revocation in the directory. A corrupt file is reported and skipped, never
    /// read as "not revoked" silently: it comes back in the error list.
    pub fn load(&self) -> (HashMap<String, Revocation>, Vec<RevocationError>) {
        let mut found = HashMap::new();
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(source) => {
                errors.push(RevocationError::Io {
                    action: "listing",
                    path: self.dir.clone(),
                    source,
                });
                return (found, errors);
            }
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Some(device) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            match self.read_file(&path) {
                Ok(Some(revocation)) => {
                    found.insert(device.to_string(), revocation);
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        (found, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_refuses_old_certificates_and_blocks_new_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RevocationStore::open(dir.path()).expect("opens");
        store.revoke("gw-1", 1_000).expect("revokes");
        let (loaded, errors) = store.load();
        assert!(errors.is_empty());
        let revocations = Revocations::default();
        assert_eq!(revocations.replace(loaded), vec!["gw-1".to_string()]);
        assert!(revocations.refuses("gw-1", 500));
        assert!(
            revocations.refuses("gw-1", 5_000),
            "blocked: even newer certificates"
        );
        assert!(revocations.is_blocked("gw-1"));
        assert!(!revocations.refuses("gw-2", 500));

        store.unblock("gw-1").expect("unblocks");
        let (loaded, _) = store.load();
        assert!(
            revocations.replace(loaded).is_empty(),
            "unblocking cuts nobody"
        );
        assert!(
            revocations.refuses("gw-1", 1_000),
            "old certificates stay refused"
        );
        assert!(
            !revocations.refuses("gw-1", 1_001),
            "a fresh enrollment works"
        );
        assert!(!revocations.is_blocked("gw-1"));
        assert_eq!(store.unblock("never-revoked").expect("fine"), None);
    }

    #[test]
    fn bad_names_and_corrupt_files_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RevocationStore::open(dir.path()).expect("opens");
        assert!(matches!(
            store.revoke("../etc", 1),
            Err(RevocationError::InvalidName { .. })
        ));
        std::fs::write(dir.path().join("gw-9.json"), "{not json").expect("write");
        let (found, errors) = store.load();
        assert!(found.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("gw-9.json"), "{}", errors[0]);
    }
}
