//! A MicroMiner's work source at run time: the builtin synthetic one, or a pool's jobs.

use micromine_work::scheduler::HeaderId;
use micromine_work::worksource::{BuiltinSource, WorkHeader};

use micromine_stratum::work::StratumWork;

/// A MicroMiner's work source at run time.
#[derive(Debug, Clone)]
pub enum Source {
    /// Synthetic templates.
    Builtin(BuiltinSource),
    /// A pool's jobs.
    Stratum(StratumWork),
}

impl Source {
    /// The current job: headers of other jobs are stale.
    pub fn job(&self) -> u64 {
        match self {
            Source::Builtin(b) => b.job(),
            Source::Stratum(s) => s.job(),
        }
    }

    /// The next header of the current job, if the source has work now.
    pub fn next_header(&mut self, id: HeaderId) -> Option<WorkHeader> {
        match self {
            Source::Builtin(b) => Some(b.next_header(id)),
            Source::Stratum(s) => s.next_header(id),
        }
    }

    /// The highest share difficulty worth giving a device: above it a share would be
    /// worth more than the work it is for (a block, or a pool share) and be missed.
    pub fn share_cap(&self) -> f64 {
        match self {
            Source::Builtin(b) => b.network_target().difficulty(),
            Source::Stratum(s) => s.difficulty(),
        }
    }

    /// The network difficulty the work is for (0 while a pool has sent no job).
    pub fn network_difficulty(&self) -> f64 {
        match self {
            Source::Builtin(b) => b.network_target().difficulty(),
            Source::Stratum(s) => s.network_difficulty().unwrap_or(0.0),
        }
    }

    /// The builtin source, if it is one.
    pub fn builtin_mut(&mut self) -> Option<&mut BuiltinSource> {
        match self {
            Source::Builtin(b) => Some(b),
            Source::Stratum(_) => None,
        }
    }

    /// The pool work, if it is one.
    pub fn stratum(&self) -> Option<&StratumWork> {
        match self {
            Source::Stratum(s) => Some(s),
            Source::Builtin(_) => None,
        }
    }

    /// The pool work, if it is one.
    pub fn stratum_mut(&mut self) -> Option<&mut StratumWork> {
        match self {
            Source::Stratum(s) => Some(s),
            Source::Builtin(_) => None,
        }
    }
}
