//! The fleet's pool connections: one [`Upstream`] per MicroMiner with a `stratum` work
//! source, started, restarted (when its pools change) and stopped as the MicroMiners are
//! applied; their events drive the fleet state, and pool verdicts go to the ledger.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Fleet, lock, now_ms};
use micromine_resources::microminer::{MinerSet, StratumSource};
use micromine_store::ledger::AcceptedShare;
use micromine_store::ledger::pool::PoolVerdict;
use micromine_stratum::client::{
    PoolAnswer, Submission, Timeouts, Upstream, UpstreamConfig, UpstreamEvent, UpstreamSink,
};
use micromine_stratum::message::RejectReason;
use micromine_stratum::passwords::{FilePasswords, Passwords};
use micromine_work::worksource::WorkHeader;

/// A running upstream and the settings it was started with.
pub(super) struct Running {
    settings: StratumSource,
    upstream: Upstream,
}

/// The pool connections of a fleet.
pub(super) struct Upstreams {
    running: HashMap<String, Running>,
    passwords: Arc<dyn Passwords>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams {
            running: HashMap::new(),
            // Until a mode says otherwise: files relative to the working directory.
            passwords: Arc::new(FilePasswords::new(".")),
        }
    }
}

/// Reports an upstream's events to the fleet that owns it (if it still exists).
struct FleetSink(Weak<Fleet>);

impl UpstreamSink for FleetSink {
    fn event(&self, miner: &str, event: UpstreamEvent) {
        if let Some(fleet) = self.0.upgrade() {
            fleet.upstream_event(miner, event);
        }
    }

    fn answers(&self, miner: &str, answers: Vec<PoolAnswer>) {
        if let Some(fleet) = self.0.upgrade() {
            fleet.pool_answers(miner, answers);
        }
    }
}

impl Fleet {
    /// Where pool passwords come from (a file in standalone mode, a Secret in Kubernetes
    /// mode); set before the MicroMiners are applied.
    pub fn set_passwords(&self, passwords: Arc<dyn Passwords>) {
        lock(&self.upstreams).passwords = passwords;
    }

    /// Starts, restarts and stops pool connections to match `miners`.
    pub(super) fn reconcile_upstreams(&self, miners: &MinerSet) {
        let mut upstreams = lock(&self.upstreams);
        upstreams.running.retain(|key, running| {
            let keep = miners
                .get(key)
                .and_then(|m| m.spec.work_source.stratum.as_ref())
                .is_some_and(|s| *s == running.settings);
            if !keep {
                tracing::info!(miner = %key, "pool connection stopped");
            }
            keep
        });
        for (key, miner) in miners {
            let Some(settings) = &miner.spec.work_source.stratum else {
                continue;
            };
            if upstreams.running.contains_key(key) {
                continue;
            }
            let config = UpstreamConfig {
                miner: key.clone(),
                namespace: miner
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                pools: settings.pools(),
                failback: Duration::from_secs(u64::from(settings.failback_seconds)),
                timeouts: Timeouts::default(),
                resume: lock(&self.state).resume_hint(key),
            };
            let upstream = Upstream::spawn(
                config,
                Arc::clone(&upstreams.passwords),
                Arc::new(FleetSink(self.me.clone())),
            );
            upstreams.running.insert(
                key.clone(),
                Running {
                    settings: settings.clone(),
                    upstream,
                },
            );
        }
    }

    /// Applies a pool connection's event to the state.
    fn upstream_event(&self, miner: &str, event: UpstreamEvent) {
        let mut state = lock(&self.state);
        let fx = state.upstream_event(miner, event, now_ms());
        self.queue(fx);
    }

    /// Hands a recorded share that meets the pool's difficulty to the pool connection.
    pub(super) fn submit_upstream(&self, record: AcceptedShare, header: &WorkHeader) {
        let Some(work) = &header.upstream else {
            return;
        };
        let submission = Submission {
            key: record.key,
            device: record.device,
            session: work.session,
            job_id: work.job_id.clone(),
            extranonce2: hex::decode(&work.extranonce2).unwrap_or_default(),
            ntime: work.ntime,
            nonce: record.key.nonce,
            version_bits: work.version_bits,
            difficulty: work.difficulty,
        };
        let refused = {
            let upstreams = lock(&self.upstreams);
            match upstreams.running.get(&record.miner) {
                Some(running) => running
                    .upstream
                    .submit(submission)
                    .err()
                    .map(|s| (s, "too many shares waiting for the pool")),
                None => Some((submission, "the MicroMiner no longer mines for a pool")),
            }
        };
        if let Some((submission, why)) = refused {
            self.pool_answers(
                &record.miner,
                vec![PoolAnswer {
                    submission,
                    pool: String::new(),
                    verdict: Err(RejectReason::SessionLost),
                    message: why.to_string(),
                }],
            );
        }
    }

    /// Records pool verdicts durably, in the background (nothing waits on them).
    fn pool_answers(&self, miner: &str, answers: Vec<PoolAnswer>) {
        let verdicts: Vec<PoolVerdict> = answers
            .into_iter()
            .map(|a| PoolVerdict {
                key: a.submission.key,
                device: a.submission.device,
                miner: miner.to_string(),
                accepted: a.verdict.is_ok(),
                reason: a.verdict.err().map(RejectReason::as_str),
                difficulty: a.submission.difficulty,
            })
            .collect();
        let ledger = self.ledger.clone();
        tokio::spawn(async move {
            if let Err(e) = ledger.record_pool_verdicts(verdicts).await {
                tracing::error!(error = %e, "pool verdicts could not be recorded");
            }
        });
    }
}
