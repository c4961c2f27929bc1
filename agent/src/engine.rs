//! The agent's side of the hashing engines (`micromine-engine`): preparing assignments for
//! them and choosing one from the command line.

use micromine_proto::work::{HEADER_PREFIX_LEN, Target};

pub use micromine_engine::{EngineKind, UnknownEngine, Work};

/// Prepares a header prefix and share target for scanning.
pub fn prepare(prefix: &[u8; HEADER_PREFIX_LEN], target: Target) -> Work {
    Work::new(prefix, &target.to_le_bytes())
}

/// The engine the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineRequest {
    /// The fastest this CPU runs, as timed at start (the `calibrate` module).
    Auto,
    /// This engine, which the CPU runs.
    Named(EngineKind),
}

impl EngineRequest {
    /// The engine without measuring: a named one, or the first the CPU runs in the crate's
    /// order (for simulated devices, whose rate is set rather than measured).
    pub fn without_measuring(self) -> EngineKind {
        match self {
            EngineRequest::Auto => EngineKind::detect(),
            EngineRequest::Named(kind) => kind,
        }
    }
}

/// An engine choice from the command line: `auto` or a named engine that must be available.
pub fn select(requested: Option<&str>) -> Result<EngineRequest, EngineSelectError> {
    match requested {
        None | Some("auto") => Ok(EngineRequest::Auto),
        Some(name) => {
            let kind: EngineKind = name.parse()?;
            if kind.is_available() {
                Ok(EngineRequest::Named(kind))
            } else {
                Err(EngineSelectError::Unavailable {
                    kind,
                    available: EngineKind::available()
                        .map(EngineKind::name)
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        }
    }
}

/// Why an `--engine` choice cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum EngineSelectError {
    /// The name is not an engine of this build.
    #[error("--engine: {0}")]
    Unknown(#[from] UnknownEngine),
    /// The engine exists but this CPU lacks the instructions it needs.
    #[error(
        "--engine: `{kind}` needs CPU features this machine does not have; it runs: {available}"
    )]
    Unavailable {
        /// The engine asked for.
        kind: EngineKind,
        /// The engines this CPU runs, fastest first.
        available: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use micromine_proto::work::{header_with_nonce, sha256d};

    #[test]
    fn select_names_the_problem() {
        assert_eq!(select(None).ok(), Some(EngineRequest::Auto));
        assert_eq!(select(Some("auto")).ok(), Some(EngineRequest::Auto));
        assert_eq!(
            select(Some("portable")).ok(),
            Some(EngineRequest::Named(EngineKind::Portable))
        );
        let err = select(Some("avx9")).expect_err("unknown");
        assert!(
            err.to_string()
                .starts_with("--engine: unknown engine `avx9`"),
            "{err}"
        );
        if let Some(missing) = EngineKind::ALL.into_iter().find(|k| !k.is_available()) {
            let err = select(Some(missing.name())).expect_err("unavailable");
            assert!(err.to_string().contains("it runs: "), "{err}");
            assert!(err.to_string().contains("portable"), "{err}");
        }
    }

    /// The agent's targets and the engine's byte order agree: a share the engine reports is
    /// one the protocol's own comparison accepts.
    #[test]
    fn prepared_work_agrees_with_the_protocol_target() {
        let prefix = [3u8; 76];
        // About one share per 4,096 nonces.
        let target = Target::from_difficulty(1.0 / 1_048_576.0).expect("valid");
        let work = prepare(&prefix, target);
        let mut found = Vec::new();
        EngineKind::detect().scan(&work, 0, 20_000, &mut |n| found.push(n));
        let expected: Vec<u32> = (0..20_000)
            .filter(|&n| target.is_met_by(&sha256d(&header_with_nonce(&prefix, n))))
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(found, expected);
    }
}
