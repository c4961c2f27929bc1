//! Where pool passwords come from: a file in standalone mode, a Secret in Kubernetes mode.
//! They are read at every connection attempt, so a rotated password is picked up without
//! a restart, and they are never logged.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use micromine_resources::microminer::StratumPool;

/// The password used when a pool names no password source; most pools ignore it.
pub const DEFAULT_PASSWORD: &str = "x";

/// A pending password lookup.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// Looks up pool passwords. The error says which source failed and why.
pub trait Passwords: Send + Sync {
    /// The password for `pool` of a MicroMiner in `namespace`.
    fn password<'a>(&'a self, namespace: &'a str, pool: &'a StratumPool) -> Lookup<'a>;
}

/// Standalone mode: `passwordFile`, relative to the manifests directory.
#[derive(Debug, Clone)]
pub struct FilePasswords {
    base: PathBuf,
}

impl FilePasswords {
    /// Resolves relative paths against `base` (the manifests directory).
    pub fn new(base: impl Into<PathBuf>) -> FilePasswords {
        FilePasswords { base: base.into() }
    }
}

impl Passwords for FilePasswords {
    fn password<'a>(&'a self, _namespace: &'a str, pool: &'a StratumPool) -> Lookup<'a> {
        Box::pin(async move {
            if pool.password_secret_ref.is_some() {
                return Err(
                    "passwordSecretRef needs Kubernetes mode; in standalone mode use passwordFile"
                        .to_string(),
                );
            }
            let Some(file) = &pool.password_file else {
                return Ok(DEFAULT_PASSWORD.to_string());
            };
            let path = self.base.join(file);
            let text = tokio::fs::read_to_string(&path)
                .await
                .map_err(|e| format!("passwordFile {}: {e}", path.display()))?;
            Ok(text.trim_end_matches(['\r', '\n']).to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(file: Option<&str>) -> StratumPool {
        StratumPool {
            url: "stratum+tcp://pool:3333".into(),
            user: "u.w".into(),
            password_secret_ref: None,
            password_file: file.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn files_are_read_relative_to_the_manifests_and_trimmed() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pool.pass"), "s3cret\n").expect("write");
        let passwords = FilePasswords::new(dir.path());
        assert_eq!(
            passwords
                .password("default", &pool(Some("pool.pass")))
                .await,
            Ok("s3cret".to_string())
        );
        assert_eq!(
            passwords.password("default", &pool(None)).await,
            Ok(DEFAULT_PASSWORD.to_string())
        );
        let missing = passwords
            .password("default", &pool(Some("nope")))
            .await
            .expect_err("missing file");
        assert!(missing.starts_with("passwordFile "), "{missing}");
        let mut secret = pool(None);
        secret.password_secret_ref = Some(micromine_resources::microminer::SecretKeyRef {
            name: "s".into(),
            key: "k".into(),
        });
        assert!(passwords.password("default", &secret).await.is_err());
    }
}
