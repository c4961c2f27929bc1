//! The MicroMiner reconciler.
//!
//! Every reconcile makes the fleet serve exactly the valid MicroMiners it has seen, then
//! writes the one it was called for back with its status. A MicroMiner being deleted is
//! drained (its devices' work is cancelled) before the finalizer comes off. A spec that
//! passed admission but cannot be served (the checks the schema cannot express) is not
//! served: its status says why with `Ready=False`, a Warning event carries the problems,
//! and nothing is retried until the object changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::devices::{MINER_REFRESH_WRITES_PER_MINUTE, SharedBudget, WriteBudget};
use super::{FIELD_MANAGER, FINALIZER};
use crate::fleet::{Fleet, now_ms};
use micromine_fleet::conditions;
use micromine_resources::microminer::{API_VERSION, MicroMiner, MicroMinerStatus, MinerSet};

/// How often a served MicroMiner is looked at again when nothing else happens. Its status
/// is written when a condition, the device counts or the generation changed; the hash
/// rate and share counts move all the time and are refreshed at most every
/// [`REFRESH_INTERVAL_MS`], within the controller's write budget.
pub const STATUS_PERIOD: Duration = Duration::from_secs(30);
/// A MicroMiner's live figures are refreshed at most this often.
pub const REFRESH_INTERVAL_MS: i64 = 60_000;
/// The fleet view is computed at most this often for all reconciles together: with a
/// thousand MicroMiners, each recomputing it would cost more than the reconciles do.
const VIEW_MAX_AGE_MS: i64 = 1_000;
/// First retry after a failed reconcile; doubles per consecutive failure of that object.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Retries of one object never wait longer than this.
const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// What went wrong in one reconcile; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A call to the API server failed.
    #[error("writing {what} of MicroMiner {key}: {source}")]
    Api {
        /// What was being written, e.g. "status".
        what: &'static str,
        /// `namespace/name`.
        key: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer, or the step it guards, failed.
    #[error("finalizer of MicroMiner {key}: {source}")]
    Finalizer {
        /// `namespace/name`.
        key: String,
        /// What failed.
        #[source]
        source: Box<finalizer::Error<ReconcileError>>,
    },
}

/// Shared by every reconcile.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// The fleet the MicroMiners drive.
    pub fleet: Arc<Fleet>,
    /// Publishes Events on MicroMiners.
    pub recorder: Recorder,
    /// The valid MicroMiners being served, by `namespace/name`.
    served: Mutex<MinerSet>,
    /// Consecutive failures per `namespace/name`, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Which status writes are worth making.
    gate: StatusGate,
    /// The MicroMiner statuses of a recent fleet view, and when it was taken.
    view: Mutex<(i64, Arc<HashMap<String, MicroMinerStatus>>)>,
}

impl Context {
    /// A context serving nothing yet, refreshing at most
    /// [`MINER_REFRESH_WRITES_PER_MINUTE`] statuses a minute.
    pub fn new(client: kube::Client, fleet: Arc<Fleet>, recorder: Recorder) -> Context {
        let budget = Arc::new(Mutex::new(WriteBudget::new(
            MINER_REFRESH_WRITES_PER_MINUTE,
            now_ms(),
        )));
        Context {
            client,
            fleet,
            recorder,
            served: Mutex::default(),
            failures: Mutex::default(),
            gate: StatusGate::new(budget),
            view: Mutex::new((i64::MIN, Arc::default())),
        }
    }

    /// The status the fleet gives MicroMiner `key` now (a view at most
    /// [`VIEW_MAX_AGE_MS`] old).
    fn status_of(&self, key: &str, now_ms: i64) -> MicroMinerStatus {
        let cached = {
            let view = lock(&self.view);
            (view.0 > now_ms.saturating_sub(VIEW_MAX_AGE_MS)).then(|| view.1.clone())
        };
        let statuses = cached.unwrap_or_else(|| self.refresh_view(now_ms));
        statuses.get(key).cloned().unwrap_or_default()
    }

    /// Takes a new view of the fleet, for the reconciles that follow, and returns every
    /// served MicroMiner's status in it.
    pub fn refresh_view(&self, now_ms: i64) -> Arc<HashMap<String, MicroMinerStatus>> {
        let fresh: Arc<HashMap<String, MicroMinerStatus>> = Arc::new(
            self.fleet
                .view()
                .miners
                .into_iter()
                .map(|m| (m.key, m.status))
                .collect(),
        );
        *lock(&self.view) = (now_ms, fresh.clone());
        fresh
    }

    /// The keys of the MicroMiners being served.
    pub fn served(&self) -> Vec<String> {
        lock(&self.served).keys().cloned().collect()
    }

    fn serve(&self, miner: Option<MicroMiner>, key: &str) {
        let mut served = lock(&self.served);
        // Status writes and resource versions do not change what is served; the spec does.
        let changed = match miner {
            Some(miner) => {
                let same = served.get(key).is_some_and(|old| {
                    old.spec == miner.spec && old.metadata.generation == miner.metadata.generation
                });
                served.insert(key.to_string(), miner);
                !same
            }
            None => served.remove(key).is_some(),
        };
        if changed {
            self.fleet.apply_miners(&served);
            // The cached view predates the change.
            lock(&self.view).0 = i64::MIN;
        }
    }
}

/// Decides which MicroMiner status writes are worth making. Pure apart from its clock
/// argument, so the write-rate benchmark can drive it on a simulated clock.
pub struct StatusGate {
    budget: SharedBudget,
    /// When each MicroMiner's status was last written, Unix ms.
    written: Mutex<HashMap<String, i64>>,
}

impl StatusGate {
    /// A gate drawing refreshes from `budget`.
    pub fn new(budget: SharedBudget) -> StatusGate {
        StatusGate {
            budget,
            written: Mutex::default(),
        }
    }

    /// Whether `new` is worth a write over `old`, the status the object carries: always
    /// when something an operator acts on changed, otherwise a refresh of the figures at
    /// most every [`REFRESH_INTERVAL_MS`] and only while the budget lasts.
    pub fn worth_writing(
        &self,
        key: &str,
        old: Option<&MicroMinerStatus>,
        new: &MicroMinerStatus,
        now_ms: i64,
    ) -> bool {
        let Some(old) = old else {
            return true;
        };
        if significant(old) != significant(new) {
            return true;
        }
        let figures = |s: &MicroMinerStatus| {
            (
                s.hashrate.effective.round() as u64,
                s.hashrate.nominal.round() as u64,
                s.shares.clone(),
                s.blocks_found,
            )
        };
        if figures(old) == figures(new) {
            return false;
        }
        let last = lock(&self.written).get(key).copied().unwrap_or(i64::MIN);
        now_ms.saturating_sub(last) >= REFRESH_INTERVAL_MS && lock(&self.budget).try_take(now_ms)
    }

    /// Records a write of `key`'s status at `now_ms`.
    pub fn wrote(&self, key: &str, now_ms: i64) {
        lock(&self.written).insert(key.to_string(), now_ms);
    }

    /// Forgets a MicroMiner that is gone.
    pub fn forget(&self, key: &str) {
        lock(&self.written).remove(key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reconciles one MicroMiner.
#[tracing::instrument(name = "reconcile", skip_all, fields(miner = %miner.key()))]
pub async fn reconcile(
    miner: Arc<MicroMiner>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let key = miner.key();
    let api: Api<MicroMiner> = Api::namespaced(
        ctx.client.clone(),
        miner.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let result = finalizer::finalizer(&api, FINALIZER, miner, |event| async {
        match event {
            Finalizer::Apply(miner) => apply(&miner, &api, &ctx).await,
            Finalizer::Cleanup(miner) => cleanup(&miner, &ctx).await,
        }
    })
    .await
    .map_err(|source| ReconcileError::Finalizer {
        key: key.clone(),
        source: Box::new(source),
    });
    if result.is_ok() {
        lock(&ctx.failures).remove(&key);
    }
    if let Some(metrics) = ctx.fleet.metrics() {
        metrics.reconcile(result.is_ok(), started.elapsed());
    }
    result
}

/// After a failed reconcile: retry after 1 s, 2 s, 4 s ... at most 5 min, per object, and
/// tell the object's readers why with a Warning event carrying the error chain.
pub fn error_policy(miner: Arc<MicroMiner>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut failures = lock(&ctx.failures);
        let count = failures.entry(miner.key()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    let chain = error_chain(error);
    tracing::warn!(miner = %miner.key(), failures, error = %chain, "reconcile failed; will retry");
    let recorder = ctx.recorder.clone();
    let reference = miner.object_ref(&());
    tokio::spawn(async move {
        let event = Event {
            type_: EventType::Warning,
            reason: "ReconcileFailed".into(),
            note: Some(truncate(&chain, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, "publishing an event failed");
        }
    });
    Action::requeue(backoff(failures))
}

/// The wait before retry number `failures` (1-based).
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_CAP)
}

async fn apply(
    miner: &MicroMiner,
    api: &Api<MicroMiner>,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let key = miner.key();
    let previous_ready = ready_status(miner.status.as_ref());
    let now = now_ms();
    let (status, events, action) = match miner.validate() {
        Ok(()) => {
            ctx.serve(Some(miner.clone()), &key);
            let status = ctx.status_of(&key, now);
            let readiness = match (
                previous_ready.as_deref(),
                ready_status(Some(&status)).as_deref(),
            ) {
                (Some("True"), Some("True")) => None,
                (_, Some("True")) => {
                    Some((EventType::Normal, "Ready", "devices are mining".to_string()))
                }
                (Some("True"), _) => Some((
                    EventType::Normal,
                    "NotReady",
                    ready_message(&status).unwrap_or_default(),
                )),
                _ => None,
            };
            let profitability = profitability_event(miner.status.as_ref(), &status);
            let pool = pool_event(miner.status.as_ref(), &status);
            let events = readiness
                .into_iter()
                .chain(profitability)
                .chain(pool)
                .collect();
            (status, events, Action::requeue(STATUS_PERIOD))
        }
        Err(problems) => {
            ctx.serve(None, &key);
            let message = problems
                .iter()
                .map(|p| format!("{}: {}", p.field, p.problem))
                .collect::<Vec<_>>()
                .join("; ");
            let status = invalid_status(miner, &message);
            let events = vec![(EventType::Warning, "InvalidSpec", message)];
            // Nothing changes until the object does.
            (status, events, Action::await_change())
        }
    };
    if !ctx
        .gate
        .worth_writing(&key, miner.status.as_ref(), &status, now)
    {
        return Ok(action);
    }
    let patch = json!({
        "apiVersion": API_VERSION,
        "kind": "MicroMiner",
        "status": status,
    });
    api.patch_status(
        &miner.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| ReconcileError::Api {
        what: "status",
        key: key.clone(),
        source,
    })?;
    ctx.gate.wrote(&key, now);
    for (type_, reason, note) in events {
        publish(ctx, miner, type_, reason, note).await;
    }
    Ok(action)
}

async fn cleanup(miner: &MicroMiner, ctx: &Context) -> Result<Action, ReconcileError> {
    let key = miner.key();
    ctx.serve(None, &key);
    ctx.gate.forget(&key);
    tracing::info!(miner = %key, "MicroMiner deleted; its work was taken back from the devices");
    publish(
        ctx,
        miner,
        EventType::Normal,
        "Drained",
        "work taken back from every device".into(),
    )
    .await;
    Ok(Action::await_change())
}

/// Events are for people reading `kubectl describe`; failing to publish one is logged, not
/// retried, so it never holds up the reconcile.
async fn publish(ctx: &Context, miner: &MicroMiner, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &miner.object_ref(&())).await {
        tracing::debug!(error = %e, miner = %miner.key(), "publishing an event failed");
    }
}

/// The status of a MicroMiner that cannot be served: not ready, with the problems.
fn invalid_status(miner: &MicroMiner, message: &str) -> MicroMinerStatus {
    let generation = miner.metadata.generation;
    let mut conditions = miner
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let message = truncate(message, 32_000);
    let now = now_ms();
    conditions::set(
        &mut conditions,
        "Ready",
        false,
        "InvalidSpec",
        &message,
        generation,
        now,
    );
    conditions::set(
        &mut conditions,
        "Degraded",
        true,
        "InvalidSpec",
        &message,
        generation,
        now,
    );
    MicroMinerStatus {
        observed_generation: generation,
        conditions,
        ..MicroMinerStatus::default()
    }
}

/// Which MicroMiners' statuses changed in a way operators act on since the last call
/// (conditions, device counts, generation served), so they can be reconciled now rather
/// than at their next periodic look. The first sight of a MicroMiner counts as a change.
#[derive(Debug, Default)]
pub struct ChangeWatch {
    seen: HashMap<String, Significant>,
}

impl ChangeWatch {
    /// The keys among `statuses` (`namespace/name`, status) whose significant part moved.
    pub fn changed<'a>(
        &mut self,
        statuses: impl IntoIterator<Item = (&'a str, &'a MicroMinerStatus)>,
    ) -> Vec<String> {
        let mut changed = Vec::new();
        let mut present = std::collections::HashSet::new();
        for (key, status) in statuses {
            present.insert(key.to_string());
            let now = significant(status);
            if self.seen.get(key) != Some(&now) {
                self.seen.insert(key.to_string(), now);
                changed.push(key.to_string());
            }
        }
        self.seen.retain(|key, _| present.contains(key));
        changed
    }
}

type Significant = (Option<i64>, Vec<(String, String, String)>, String);

/// What must reach the API server at once: conditions (not their messages, which carry
/// figures), the generation served, the device counts, the first accepted share, blocks.
fn significant(status: &MicroMinerStatus) -> Significant {
    let conditions = status
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
        .collect();
    // The first accepted share ("is it working?") and every block found are news too, and
    // so are the pool in use and the first share it accepted.
    let pool = status
        .pool
        .as_ref()
        .map(|p| (p.state.as_str(), p.url.as_deref(), p.accepted > 0));
    (
        status.observed_generation,
        conditions,
        format!(
            "{:?};shares:{};blocks:{};pool:{pool:?}",
            status.devices,
            status.shares.accepted > 0,
            status.blocks_found
        ),
    )
}

/// An Event when the pool connection is lost, made, or moves to another pool (failover,
/// and back to the primary), so `kubectl describe mm` tells the story.
fn pool_event(
    before: Option<&MicroMinerStatus>,
    now: &MicroMinerStatus,
) -> Option<(EventType, &'static str, String)> {
    let pool = now.pool.as_ref()?;
    let was = before.and_then(|b| b.pool.as_ref());
    let was_connected = was.is_some_and(|p| p.state == "Connected");
    let url = pool.url.clone().unwrap_or_default();
    let moved = was.and_then(|p| p.url.as_deref()) != pool.url.as_deref();
    match (was_connected, pool.state == "Connected") {
        (true, false) => Some((
            EventType::Warning,
            "PoolUnreachable",
            pool.last_error
                .clone()
                .unwrap_or_else(|| format!("the connection to {url} ended")),
        )),
        (false, true) | (true, true) if pool.failover && (moved || !was_connected) => Some((
            EventType::Warning,
            "PoolFailover",
            format!("mining for failover pool {url}"),
        )),
        (true, true) if moved => Some((
            EventType::Normal,
            "PoolRestored",
            format!("back on the primary pool {url}"),
        )),
        (false, true) => Some((
            EventType::Normal,
            "PoolConnected",
            format!("mining for {url}"),
        )),
        _ => None,
    }
}

/// An Event when `Profitable` flips: a Warning when mining stops paying (saying whether
/// the work was taken back), a Normal one when it pays again.
fn profitability_event(
    before: Option<&MicroMinerStatus>,
    now: &MicroMinerStatus,
) -> Option<(EventType, &'static str, String)> {
    let condition = |status: &MicroMinerStatus, type_: &str| {
        status.conditions.iter().find(|c| c.type_ == type_).cloned()
    };
    let profitable = condition(now, "Profitable")?;
    let was = before.and_then(|b| condition(b, "Profitable"));
    if was.as_ref().map(|c| c.status.as_str()) == Some(profitable.status.as_str()) {
        return None;
    }
    if profitable.status == "True" {
        return Some((EventType::Normal, "Profitable", profitable.message));
    }
    let paused = condition(now, "Paused").is_some_and(|c| c.reason == "Unprofitable");
    let note = if paused {
        format!(
            "{}; work taken back (pauseWhenUnprofitable)",
            profitable.message
        )
    } else {
        profitable.message
    };
    Some((EventType::Warning, "Unprofitable", note))
}

fn ready_status(status: Option<&MicroMinerStatus>) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

fn ready_message(status: &MicroMinerStatus) -> Option<String> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use http::{Method, StatusCode};
    use serde_json::Value;

    use crate::kubernetes::testing::{Handle, Seen, answer, expect};

    use micromine_store::ledger::Ledger;
    use micromine_store::store::Store;

    fn with_conditions(conditions: &[(&str, &str, &str)]) -> MicroMinerStatus {
        let mut all = Vec::new();
        for (type_, status, reason) in conditions {
            conditions::set(
                &mut all,
                type_,
                *status == "True",
                reason,
                "at 1.000 MH/s and 5.0 W: ...",
                None,
                0,
            );
        }
        MicroMinerStatus {
            conditions: all,
            ..MicroMinerStatus::default()
        }
    }

    #[test]
    fn a_profitability_flip_is_an_event_saying_whether_work_was_taken_back() {
        let paying = with_conditions(&[("Profitable", "True", "RevenueCoversEnergy")]);
        let losing = with_conditions(&[("Profitable", "False", "EnergyCostsMore")]);
        let paused = with_conditions(&[
            ("Profitable", "False", "EnergyCostsMore"),
            ("Paused", "True", "Unprofitable"),
        ]);
        assert!(
            profitability_event(Some(&paying), &paying).is_none(),
            "no flip"
        );
        assert!(
            profitability_event(None, &MicroMinerStatus::default()).is_none(),
            "no economics"
        );
        let (type_, reason, note) = profitability_event(Some(&paying), &losing).expect("event");
        assert_eq!((type_, reason), (EventType::Warning, "Unprofitable"));
        assert!(!note.contains("taken back"), "{note}");
        let (_, _, note) = profitability_event(Some(&paying), &paused).expect("event");
        assert!(
            note.ends_with("work taken back (pauseWhenUnprofitable)"),
            "{note}"
        );
        let (type_, reason, _) = profitability_event(Some(&losing), &paying).expect("event");
        assert_eq!((type_, reason), (EventType::Normal, "Profitable"));
        // The first status with economics says how it stands.
        assert!(profitability_event(None, &losing).is_some());
    }

    #[test]
    fn pool_events_tell_connection_failover_and_return() {
        let status = |state: &str, url: &str, failover: bool| MicroMinerStatus {
            pool: Some(micromine_resources::microminer::PoolStatus {
                state: state.into(),
                url: Some(url.into()),
                failover,
                last_error: (state != "Connected").then(|| "connecting to a: refused".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let up = status("Connected", "a", false);
        let down = status("Disconnected", "a", false);
        let backup = status("Connected", "b", true);
        let event = pool_event;
        assert_eq!(
            event(None, &up),
            Some((EventType::Normal, "PoolConnected", "mining for a".into()))
        );
        assert_eq!(event(Some(&up), &up), None);
        assert_eq!(
            event(Some(&up), &down),
            Some((
                EventType::Warning,
                "PoolUnreachable",
                "connecting to a: refused".into()
            ))
        );
        assert_eq!(event(Some(&down), &down), None);
        assert_eq!(
            event(Some(&down), &backup),
            Some((
                EventType::Warning,
                "PoolFailover",
                "mining for failover pool b".into()
            ))
        );
        assert_eq!(
            event(Some(&backup), &up),
            Some((
                EventType::Normal,
                "PoolRestored",
                "back on the primary pool a".into()
            ))
        );
        assert_eq!(
            event(None, &MicroMinerStatus::default()),
            None,
            "builtin work"
        );
    }

    const PATH: &str = "/apis/micromine.dev/v1alpha1/namespaces/plant/microminers/night-shift";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/plant/events";

    struct Setup {
        ctx: Arc<Context>,
        api: Handle,
        _dir: tempfile::TempDir,
    }

    async fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let ledger = Ledger::open(store.clone()).unwrap();
        let fleet = Fleet::open(store, ledger).await.unwrap();
        let (client, api) = crate::kubernetes::testing::client("default");
        let recorder = Recorder::new(client.clone(), "micromine-controller".into());
        Setup {
            ctx: Arc::new(Context::new(client, fleet, recorder)),
            api,
            _dir: dir,
        }
    }

    fn miner(
        finalizers: &[&str],
        deleting: bool,
        spec: Value,
        status: Option<Value>,
    ) -> MicroMiner {
        let mut object = json!({
            "apiVersion": API_VERSION,
            "kind": "MicroMiner",
            "metadata": {
                "name": "night-shift",
                "namespace": "plant",
                "uid": "4a1e1b9c-0000-4000-8000-000000000001",
                "generation": 3,
                "resourceVersion": "41",
            },
            "spec": spec,
        });
        // As the API server sends it: no field at all when there are none.
        if !finalizers.is_empty() {
            object["metadata"]["finalizers"] = json!(finalizers);
        }
        if deleting {
            object["metadata"]["deletionTimestamp"] = json!("2026-11-26T04:00:00Z");
        }
        if let Some(status) = status {
            object["status"] = status;
        }
        serde_json::from_value(object).unwrap()
    }

    fn valid_spec() -> Value {
        json!({
            "selector": {"matchLabels": {"site": "plant-3"}},
            "workSource": {"builtin": {"networkDifficulty": 1.0e6}},
            "sharesPerMinute": 12,
            "assignmentSeconds": 30,
            "limits": {"dutyCycle": 0.5},
        })
    }

    /// The reconcile's result; a reconcile still running made a call the scenario does not
    /// answer, which is a failure, not a hang.
    async fn done(
        run: tokio::task::JoinHandle<Result<Action, ReconcileError>>,
    ) -> Result<Action, ReconcileError> {
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the reconcile made a request the scenario does not expect")
            .unwrap()
    }

    fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
    }

    #[tokio::test]
    async fn a_new_microminer_first_gets_the_finalizer() {
        let Setup { ctx, mut api, _dir } = setup().await;
        let object = miner(&[], false, valid_spec(), None);
        let echo = serde_json::to_value(&object).unwrap();
        let run = tokio::spawn(reconcile(Arc::new(object), ctx.clone()));

        let Seen {
            body,
            content_type,
            respond,
            ..
        } = expect(&mut api, Method::PATCH, PATH).await;
        assert_eq!(content_type, "application/json-patch+json");
        // The test op makes the add fail if anyone else touched the finalizers first.
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        answer(respond, StatusCode::OK, &echo);
        // Nothing else until the watch delivers the object with the finalizer.
        assert_eq!(done(run).await.unwrap(), Action::await_change());
        assert!(ctx.served().is_empty());
    }

    #[tokio::test]
    async fn a_served_microminer_gets_its_status_by_server_side_apply() {
        let Setup { ctx, mut api, _dir } = setup().await;
        let object = miner(&[FINALIZER], false, valid_spec(), None);
        let echo = serde_json::to_value(&object).unwrap();
        let run = tokio::spawn(reconcile(Arc::new(object), ctx.clone()));

        let Seen {
            query,
            body,
            content_type,
            respond,
            ..
        } = expect(&mut api, Method::PATCH, &format!("{PATH}/status")).await;
        assert_eq!(content_type, "application/apply-patch+yaml");
        assert!(
            query.contains("fieldManager=micromine-controller"),
            "{query}"
        );
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(body["apiVersion"], API_VERSION);
        assert_eq!(body["kind"], "MicroMiner");
        let status = &body["status"];
        assert_eq!(status["observedGeneration"], 3);
        let ready = condition(status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "NoDevices");
        assert_eq!(ready["observedGeneration"], 3);
        assert_eq!(condition(status, "Paused")["status"], "False");
        answer(respond, StatusCode::OK, &echo);

        assert_eq!(done(run).await.unwrap(), Action::requeue(STATUS_PERIOD));
        assert_eq!(ctx.served(), ["plant/night-shift"]);
        assert!(
            ctx.fleet
                .view()
                .miners
                .iter()
                .any(|m| m.key == "plant/night-shift")
        );

        // The periodic look with nothing changed: the status the object now carries is
        // what the fleet says, so the API server hears nothing (an unexpected request
        // would go unanswered and fail `done`).
        let written = miner(&[FINALIZER], false, valid_spec(), Some(status.clone()));
        let run = tokio::spawn(reconcile(Arc::new(written), ctx.clone()));
        assert_eq!(done(run).await.unwrap(), Action::requeue(STATUS_PERIOD));
    }

    #[test]
    fn only_operator_facing_changes_skip_the_refresh_budget() {
        let status = |ready: &str, accepted: u64| MicroMinerStatus {
            observed_generation: Some(3),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: "Mining".into(),
                message: format!("{accepted} accepted"),
                observed_generation: Some(3),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
            }],
            shares: micromine_resources::microminer::ShareCounts {
                accepted,
                ..Default::default()
            },
            ..MicroMinerStatus::default()
        };
        let gate = StatusGate::new(Arc::new(Mutex::new(WriteBudget::new(1, 0))));
        let key = "plant/night-shift";
        let t = 10_000_000;
        assert!(gate.worth_writing(key, None, &status("True", 1), t));
        assert!(!gate.worth_writing(key, Some(&status("True", 1)), &status("True", 1), t));
        assert!(gate.worth_writing(key, Some(&status("True", 1)), &status("False", 1), t));
        gate.wrote(key, t);
        assert!(
            !gate.worth_writing(
                key,
                Some(&status("True", 1)),
                &status("True", 9),
                t + 59_999
            ),
            "figures wait out the refresh interval"
        );
        assert!(gate.worth_writing(
            key,
            Some(&status("True", 1)),
            &status("True", 9),
            t + 60_000
        ));
        assert!(
            !gate.worth_writing(
                "plant/other",
                Some(&status("True", 1)),
                &status("True", 9),
                t + 60_000
            ),
            "and the budget"
        );
    }

    #[tokio::test]
    async fn losing_readiness_is_published_as_an_event() {
        let Setup { ctx, mut api, _dir } = setup().await;
        let was_ready = json!({"conditions": [{
            "type": "Ready", "status": "True", "reason": "Mining", "message": "1 of 1 matched devices mining",
            "lastTransitionTime": "2026-11-26T03:00:00Z", "observedGeneration": 3,
        }]});
        let object = miner(&[FINALIZER], false, valid_spec(), Some(was_ready));
        let echo = serde_json::to_value(&object).unwrap();
        let run = tokio::spawn(reconcile(Arc::new(object), ctx.clone()));

        let Seen { body, respond, .. } =
            expect(&mut api, Method::PATCH, &format!("{PATH}/status")).await;
        assert_eq!(condition(&body["status"], "Ready")["status"], "False");
        answer(respond, StatusCode::OK, &echo);
        let Seen {
            body: event,
            respond,
            ..
        } = expect(&mut api, Method::POST, EVENTS).await;
        assert_eq!(event["reason"], "NotReady");
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["regarding"]["kind"], "MicroMiner");
        assert_eq!(event["regarding"]["name"], "night-shift");
        assert_eq!(event["reportingController"], "micromine-controller");
        answer(respond, StatusCode::CREATED, &event);
        done(run).await.unwrap();
    }

    #[tokio::test]
    async fn a_conflicting_status_write_is_retried_with_growing_backoff_and_a_warning() {
        let Setup { ctx, mut api, _dir } = setup().await;
        let object = Arc::new(miner(&[FINALIZER], false, valid_spec(), None));
        let conflict =
            crate::kubernetes::testing::failure(409, "Conflict", "the object has been modified");
        let mut event_name = None;
        for (attempt, wait) in [(1, 1), (2, 2), (3, 4)] {
            let run = tokio::spawn(reconcile(object.clone(), ctx.clone()));
            let Seen { respond, .. } =
                expect(&mut api, Method::PATCH, &format!("{PATH}/status")).await;
            answer(respond, StatusCode::CONFLICT, &conflict);
            let error = done(run).await.unwrap_err();
            let action = error_policy(object.clone(), &error, ctx.clone());
            assert_eq!(
                action,
                Action::requeue(Duration::from_secs(wait)),
                "attempt {attempt}"
            );
            // The first failure creates the Warning; repeats of it bump its series.
            let seen = match &event_name {
                None => expect(&mut api, Method::POST, EVENTS).await,
                Some(name) => expect(&mut api, Method::PATCH, &format!("{EVENTS}/{name}")).await,
            };
            if event_name.is_none() {
                let event = &seen.body;
                assert_eq!(event["type"], "Warning");
                assert_eq!(event["reason"], "ReconcileFailed");
                let note = event["note"].as_str().unwrap();
                assert!(
                    note.contains("status of MicroMiner plant/night-shift"),
                    "{note}"
                );
                assert!(
                    note.contains("the object has been modified"),
                    "the chain down to the API's words: {note}"
                );
                event_name = event["metadata"]["name"].as_str().map(str::to_string);
                assert!(event_name.is_some(), "{event}");
            }
            let echo = seen.body.clone();
            seen.answer(StatusCode::OK, &echo);
        }
        // A success resets the count: the next failure waits 1 s again.
        let run = tokio::spawn(reconcile(object.clone(), ctx.clone()));
        let Seen { respond, .. } = expect(&mut api, Method::PATCH, &format!("{PATH}/status")).await;
        answer(
            respond,
            StatusCode::OK,
            &serde_json::to_value(object.as_ref()).unwrap(),
        );
        done(run).await.unwrap();
        let failed = ReconcileError::Api {
            what: "status",
            key: object.key(),
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        };
        assert_eq!(
            error_policy(object.clone(), &failed, ctx.clone()),
            Action::requeue(Duration::from_secs(1))
        );
        // Still the same Warning to a reader of `kubectl describe`: its series grows.
        let name = event_name.unwrap();
        let _ = expect(&mut api, Method::PATCH, &format!("{EVENTS}/{name}")).await;
    }

    #[test]
    fn fleet_changes_operators_act_on_are_noticed_once() {
        let mut watch = ChangeWatch::default();
        let mut mining = MicroMinerStatus::default();
        mining.devices.matched = 1;
        let idle = MicroMinerStatus::default();
        assert_eq!(
            watch.changed([("a/x", &idle), ("a/y", &idle)]),
            ["a/x", "a/y"]
        );
        assert!(watch.changed([("a/x", &idle), ("a/y", &idle)]).is_empty());
        let mut working = idle.clone();
        working.shares.accepted = 1;
        assert_eq!(
            watch.changed([("a/x", &working)]),
            ["a/x"],
            "the first share is news"
        );
        let mut busier = idle.clone();
        busier.shares.accepted = 99;
        assert!(
            watch.changed([("a/x", &busier)]).is_empty(),
            "figures alone wait"
        );
        assert_eq!(watch.changed([("a/x", &mining)]), ["a/x"]);
        // a/y went away and comes back: a change again.
        assert_eq!(watch.changed([("a/x", &mining), ("a/y", &idle)]), ["a/y"]);
    }

    #[test]
    fn backoff_doubles_to_a_five_minute_cap() {
        let waits: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX).as_secs(), 300);
    }

    #[tokio::test]
    async fn a_spec_that_cannot_be_served_is_reported_not_served_and_not_retried() {
        let Setup { ctx, mut api, _dir } = setup().await;
        let mut spec = valid_spec();
        // Admission lets this through (no CEL rule knows selector operators); serving can't.
        spec["selector"] = json!({"matchExpressions": [
            {"key": "class", "operator": "Within", "values": ["gateway"]},
        ]});
        let object = miner(&[FINALIZER], false, spec, None);
        let echo = serde_json::to_value(&object).unwrap();
        let run = tokio::spawn(reconcile(Arc::new(object), ctx.clone()));

        let Seen { body, respond, .. } =
            expect(&mut api, Method::PATCH, &format!("{PATH}/status")).await;
        let ready = condition(&body["status"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "InvalidSpec");
        let message = ready["message"].as_str().unwrap();
        assert!(
            message.contains("spec.selector.matchExpressions[0].operator"),
            "{message}"
        );
        assert_eq!(condition(&body["status"], "Degraded")["status"], "True");
        answer(respond, StatusCode::OK, &echo);
        let Seen {
            body: event,
            respond,
            ..
        } = expect(&mut api, Method::POST, EVENTS).await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "InvalidSpec");
        assert!(
            event["note"]
                .as_str()
                .unwrap()
                .contains("unknown operator `Within`")
        );
        answer(respond, StatusCode::CREATED, &event);

        assert_eq!(done(run).await.unwrap(), Action::await_change());
        assert!(ctx.served().is_empty(), "not served");
    }

    #[tokio::test]
    async fn deleting_drains_the_work_then_releases_the_finalizer() {
        let Setup { ctx, mut api, _dir } = setup().await;
        // Served first.
        let served = miner(&[FINALIZER], false, valid_spec(), None);
        let echo = serde_json::to_value(&served).unwrap();
        let run = tokio::spawn(reconcile(Arc::new(served), ctx.clone()));
        let Seen { respond, .. } = expect(&mut api, Method::PATCH, &format!("{PATH}/status")).await;
        answer(respond, StatusCode::OK, &echo);
        done(run).await.unwrap();
        assert_eq!(ctx.served().len(), 1);

        let deleting = miner(&[FINALIZER], true, valid_spec(), None);
        let run = tokio::spawn(reconcile(Arc::new(deleting), ctx.clone()));
        let Seen {
            body: event,
            respond,
            ..
        } = expect(&mut api, Method::POST, EVENTS).await;
        assert_eq!(event["reason"], "Drained");
        // The drain happened before anyone was told, and before the finalizer comes off.
        assert!(ctx.served().is_empty());
        assert!(ctx.fleet.view().miners.is_empty());
        answer(respond, StatusCode::CREATED, &event);
        let Seen {
            body,
            content_type,
            respond,
            ..
        } = expect(&mut api, Method::PATCH, PATH).await;
        assert_eq!(content_type, "application/json-patch+json");
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
        answer(respond, StatusCode::OK, &echo);
        done(run).await.unwrap();
    }

    #[tokio::test]
    async fn conflicts_are_retried_with_a_growing_capped_backoff() {
        let Setup { ctx, mut api, _dir } = setup().await;
        let object = Arc::new(miner(&[], false, valid_spec(), None));
        let conflict = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
            "message": "Operation cannot be fulfilled on microminers.micromine.dev \"night-shift\": the object has been modified",
        });
        let mut first_event_name: Option<String> = None;
        for attempt in 1..=2u32 {
            let run = tokio::spawn(reconcile(object.clone(), ctx.clone()));
            let Seen { respond, .. } = expect(&mut api, Method::PATCH, PATH).await;
            answer(respond, StatusCode::CONFLICT, &conflict);
            let error = done(run).await.expect_err("a conflict fails the reconcile");
            let action = error_policy(object.clone(), &error, ctx.clone());
            assert_eq!(action, Action::requeue(backoff(attempt)));
            // The Warning event carries the whole error chain; the repeat is recorded as a
            // series on the same event.
            let (method, path) = if attempt == 1 {
                (Method::POST, EVENTS.to_string())
            } else {
                (
                    Method::PATCH,
                    format!("{EVENTS}/{}", first_event_name.as_deref().unwrap()),
                )
            };
            let Seen {
                body: event,
                respond,
                ..
            } = expect(&mut api, method, &path).await;
            if attempt == 1 {
                first_event_name = event["metadata"]["name"].as_str().map(String::from);
            } else {
                assert_eq!(event["series"]["count"], 2);
            }
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "ReconcileFailed");
            let note = event["note"].as_str().unwrap();
            assert!(
                note.contains("finalizer") && note.contains("the object has been modified"),
                "{note}"
            );
            answer(respond, StatusCode::CREATED, &event);
        }
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }
}
