//! Shares: checking each against its lease and target before the ledger, and what
//! follows once the ledger has recorded them.

use super::*;

impl FleetState {
    /// Looks up what each share claims. Hashing happens afterwards, outside any lock.
    pub fn check_shares(&self, name: &str, shares: &[pb::Share]) -> Vec<ShareCheck> {
        shares
            .iter()
            .map(|share| self.check_share(name, share))
            .collect()
    }

    pub(super) fn check_share(&self, name: &str, share: &pb::Share) -> ShareCheck {
        let reject = |reason, miner: Option<&str>| ShareCheck::Reject {
            share: *share,
            reason,
            miner: miner.map(str::to_string),
            foreign: false,
        };
        // Work another device holds (or held): this device is acting for someone else.
        let foreign = ShareCheck::Reject {
            share: *share,
            reason: RejectReason::UnknownAssignment,
            miner: None,
            foreign: true,
        };
        let (lease, meta, header) = match self.scheduler.lease(share.assignment_id) {
            Some(lease) => {
                if lease.device != name {
                    return foreign;
                }
                let (Some(meta), Some(header)) = (
                    self.lease_meta.get(&share.assignment_id),
                    self.headers.get(&lease.header),
                ) else {
                    return reject(RejectReason::Stale, None);
                };
                (lease.clone(), meta.clone(), header.clone())
            }
            None => match self.ended.get(&share.assignment_id) {
                Some(ended) if ended.lease.device == name => (
                    ended.lease.clone(),
                    ended.meta.clone(),
                    ended.header.clone(),
                ),
                Some(_) => return foreign,
                None if share.assignment_id < self.scheduler.next_id() => {
                    // Issued once, long gone: a device catching up after a long outage.
                    return reject(RejectReason::Stale, None);
                }
                None => return reject(RejectReason::UnknownAssignment, None),
            },
        };
        let source = self.miners.get(&meta.miner).map(|m| &m.source);
        if source.map(Source::job) != Some(header.job) {
            return reject(RejectReason::Stale, Some(&meta.miner));
        }
        let pool_target = match (source.and_then(Source::stratum), &header.upstream) {
            (Some(work), Some(upstream)) => Some(work.submit_target(upstream.difficulty)),
            _ => None,
        };
        ShareCheck::Verify {
            share: *share,
            header,
            range: (lease.start, lease.end),
            target: meta.target,
            difficulty: meta.difficulty,
            miner: meta.miner,
            pool_target,
        }
    }

    /// Bookkeeping after shares were durably recorded: vardiff, rates, found blocks.
    pub fn shares_recorded(
        &mut self,
        name: &str,
        recorded: &[RecordedShare],
        now_ms: i64,
    ) -> Effects {
        let mut fx = Effects::default();
        let mut blocks: Vec<(String, [u8; 32], u64)> = Vec::new();
        for share in recorded {
            // A share proves its range scanned up to its nonce even before the device's
            // next progress report says so (shares go out within 100 ms, reports every
            // few seconds). Were the lease to end now (the device crashed or restarted),
            // its remainder starts after the share, so the device given it never finds
            // the same share again and has it refused as a duplicate. Nonces below it not
            // yet scanned are given up: lost work, never work done twice.
            self.scheduler
                .progress(share.assignment_id, u64::from(share.nonce) + 1);
            if let Some(device) = self.devices.get_mut(name) {
                device.effective.add(now_ms, share.difficulty);
                device.honesty.share(share.difficulty);
                if let Some(v) = device.vardiff.as_mut() {
                    v.record_share(share.difficulty);
                }
                device.record.last_seen_unix_ms = now_ms;
            }
            if let Some(miner) = self.miners.get_mut(&share.miner) {
                miner.effective.add(now_ms, share.difficulty);
            }
            if let Some(hash) = share.block_hash {
                blocks.push((share.miner.clone(), hash, share.header.job));
            }
        }
        for (miner, hash, job) in blocks {
            let Some(runtime) = self.miners.get(&miner) else {
                continue;
            };
            if runtime.source.stratum().is_some() {
                // The pool builds on it and says so with its next (clean) job.
                tracing::info!(miner = %miner, device = name,
                    hash = %micromine_proto::work::hash_display_hex(&hash), "block found for the pool");
                continue;
            }
            if runtime.source.job() != job {
                // A second block on the same job in the same batch: the chain already moved.
                continue;
            }
            let new_job = self.ids.take_job();
            if let Some(runtime) = self.miners.get_mut(&miner)
                && let Some(builtin) = runtime.source.builtin_mut()
            {
                builtin.block_found(hash, new_job, now_unix_seconds(now_ms));
                tracing::info!(miner = %miner, device = name, height = builtin.tip().height - 1,
                    hash = %micromine_proto::work::hash_display_hex(&hash), "block found");
                fx.persist
                    .push(PersistOp::Tip(miner.clone(), builtin.tip().clone()));
                runtime.current_header = None;
            }
            fx.persist.push(PersistOp::Ids(self.ids.clone()));
            self.retire_stale_headers(&miner, "block found: new chain tip", &mut fx);
            for device in self.devices_of(&miner) {
                self.top_up(&device, now_ms, &mut fx);
            }
        }
        fx
    }
}
