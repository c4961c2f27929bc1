//! Standalone mode's MicroMiners: the manifests directory, re-read when it changes. A
//! broken file keeps its last good version in effect and is reported until fixed; a
//! MicroMiner defined twice is an error for the later file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use micromine_fleet::status::ManifestStatus;
use micromine_resources::microminer::{self, ManifestError, MicroMiner, MinerSet};

/// Puts what a scan found where the status API reads it.
pub fn report_manifests(scan: &ManifestScan, status: &Mutex<ManifestStatus>) {
    let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
    status.miners = scan.miners.len();
    status.errors = scan.errors.iter().map(ToString::to_string).collect();
}

/// The result of reading the manifests directory.
#[derive(Debug, Clone, Default)]
pub struct ManifestScan {
    /// Whether anything differs from the previous scan.
    pub changed: bool,
    /// MicroMiners in effect: each file's last good version.
    pub miners: MinerSet,
    /// Current problems.
    pub errors: Vec<ManifestError>,
}

#[derive(Debug)]
struct FileState {
    digest: [u8; 32],
    /// The file's last good content; kept while a later edit is broken.
    miners: Vec<MicroMiner>,
    error: Option<ManifestError>,
}

/// Watches a directory of YAML files by content. A file that stops parsing keeps its last
/// good MicroMiners in effect, so a typo never stops the miners already running.
#[derive(Debug)]
pub struct ManifestWatcher {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    first: bool,
}

impl ManifestWatcher {
    /// A watcher on `dir` that has read nothing yet.
    pub fn new(dir: &Path) -> ManifestWatcher {
        ManifestWatcher {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            first: true,
        }
    }

    /// Reads the directory again.
    pub fn scan(&mut self) -> ManifestScan {
        let mut changed = std::mem::take(&mut self.first);
        let mut listing_error = None;
        let mut present: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_manifest(p))
                .collect(),
            Err(e) => {
                listing_error = Some(ManifestError::Unreadable {
                    file: self.dir.display().to_string(),
                    reason: e.to_string(),
                });
                self.files.keys().cloned().collect()
            }
        };
        present.sort();
        let before = self.files.len();
        self.files.retain(|path, _| present.contains(path));
        changed |= self.files.len() != before;
        for path in &present {
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    let error = ManifestError::Unreadable {
                        file: path.display().to_string(),
                        reason: e.to_string(),
                    };
                    if let Some(state) = self.files.get_mut(path) {
                        changed |= state.error.as_ref() != Some(&error);
                        state.error = Some(error);
                    }
                    continue;
                }
            };
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            if self.files.get(path).is_some_and(|s| s.digest == digest) {
                continue;
            }
            changed = true;
            let text = String::from_utf8_lossy(&bytes);
            let parsed = microminer::parse_str(&path.display().to_string(), &text);
            match parsed {
                Ok(miners) => {
                    tracing::info!(file = %path.display(), miners = miners.len(), "manifest loaded");
                    self.files.insert(
                        path.clone(),
                        FileState {
                            digest,
                            miners,
                            error: None,
                        },
                    );
                }
                Err(error) => {
                    tracing::error!(%error, "manifest rejected; its previous version stays in effect");
                    let miners = self
                        .files
                        .get(path)
                        .map(|s| s.miners.clone())
                        .unwrap_or_default();
                    self.files.insert(
                        path.clone(),
                        FileState {
                            digest,
                            miners,
                            error: Some(error),
                        },
                    );
                }
            }
        }
        let mut miners = MinerSet::new();
        let mut errors: Vec<ManifestError> = listing_error.into_iter().collect();
        let mut origin: BTreeMap<String, PathBuf> = BTreeMap::new();
        for (path, state) in &self.files {
            if let Some(error) = &state.error {
                errors.push(error.clone());
            }
            for (index, miner) in state.miners.iter().enumerate() {
                let key = miner.key();
                if let Some(first) = origin.get(&key) {
                    errors.push(ManifestError::Invalid {
                        file: path.display().to_string(),
                        document: index + 1,
                        name: Some(key.clone()),
                        field: "metadata.name".into(),
                        problem: format!(
                            "MicroMiner {key} is already defined in {}",
                            first.display()
                        ),
                    });
                    continue;
                }
                origin.insert(key.clone(), path.clone());
                miners.insert(key, miner.clone());
            }
        }
        ManifestScan {
            changed,
            miners,
            errors,
        }
    }
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && path.is_file()
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINER: &str = "apiVersion: micromine.dev/v1alpha1\nkind: MicroMiner\nmetadata: {name: NAME}\nspec:\n  selector: {}\n  workSource: {builtin: {networkDifficulty: 1}}\n  sharesPerMinute: SPM\n";

    fn miner(name: &str, spm: &str) -> String {
        MINER.replace("NAME", name).replace("SPM", spm)
    }

    #[test]
    fn keeps_the_last_good_version_of_a_broken_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, miner("a", "12")).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let mut w = ManifestWatcher::new(dir.path());
        let first = w.scan();
        assert!(first.changed);
        assert_eq!(first.miners.len(), 1);
        assert!(first.errors.is_empty());
        assert!(!w.scan().changed, "nothing changed");

        std::fs::write(&file, miner("a", "-1")).expect("write");
        let broken = w.scan();
        assert!(broken.changed);
        assert_eq!(
            broken.miners["default/a"].spec.shares_per_minute, 12.0,
            "old version kept"
        );
        assert_eq!(broken.errors.len(), 1);
        assert!(
            broken.errors[0]
                .to_string()
                .contains("spec.sharesPerMinute"),
            "{}",
            broken.errors[0]
        );

        std::fs::write(&file, miner("a", "30")).expect("write");
        let fixed = w.scan();
        assert_eq!(fixed.miners["default/a"].spec.shares_per_minute, 30.0);
        assert!(fixed.errors.is_empty());

        std::fs::remove_file(&file).expect("remove");
        let gone = w.scan();
        assert!(gone.changed);
        assert!(gone.miners.is_empty());
    }

    #[test]
    fn a_name_defined_twice_is_an_error_for_the_later_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), miner("x", "12")).expect("write");
        std::fs::write(dir.path().join("b.yml"), miner("x", "24")).expect("write");
        let scan = ManifestWatcher::new(dir.path()).scan();
        assert_eq!(scan.miners["default/x"].spec.shares_per_minute, 12.0);
        assert_eq!(scan.errors.len(), 1);
        let text = scan.errors[0].to_string();
        assert!(
            text.contains("b.yml") && text.contains("already defined"),
            "{text}"
        );
    }
}
