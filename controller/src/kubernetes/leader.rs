//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several controller
//! replicas exactly one schedules work and writes the ledger.
//!
//! The rules are client-go's: the holder renews every [`RENEW_PERIOD`]; a Lease whose
//! `renewTime` is older than its `leaseDurationSeconds` may be taken over, which bumps
//! `leaseTransitions`; every write carries the `resourceVersion` it read, so of two
//! replicas racing for one Lease the API server lets one win and answers the other with a
//! conflict. A leader that has not managed to renew for [`RENEW_DEADLINE`] stops leading
//! on its own, before its Lease can expire and a standby take over: two leaders never
//! overlap as long as clocks agree to within the difference.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// How long a Lease stays valid after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and a standby checks.
pub const RENEW_PERIOD: Duration = Duration::from_secs(2);
/// A leader that could not renew for this long steps down.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// What one election round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// We hold the Lease (just created, renewed or taken over).
    Leader,
    /// Someone else holds a valid Lease (their identity, when the Lease names one).
    Follower(Option<String>),
}

/// Campaigns for one Lease under one identity.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl LeaderElector {
    /// Campaigns for Lease `name` in the namespace of `api` as `identity` (the pod name,
    /// unique per replica).
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> LeaderElector {
        LeaderElector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    /// One round at time `now`: create the Lease if there is none, renew it if it is
    /// ours, take it over if its holder let it lapse, otherwise follow. A conflict means
    /// another replica wrote first: follow it.
    pub async fn round(&self, now: jiff::Timestamp) -> Result<Role, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return self
                .write(self.api.create(&PostParams::default(), &lease))
                .await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        if holder.as_deref() == Some(self.identity.as_str()) {
            let acquired = spec.acquire_time.map_or(now, |t| t.0);
            return self
                .replace(lease, self.spec(acquired, now, transitions))
                .await;
        }
        if holder.is_some() && !expired(&spec, now) {
            return Ok(Role::Follower(holder));
        }
        match &holder {
            Some(previous) => {
                tracing::info!(%previous, "the leader's lease lapsed; taking over");
            }
            None => tracing::info!("the lease was released; taking over"),
        }
        self.replace(lease, self.spec(now, now, transitions.saturating_add(1)))
            .await
    }

    async fn replace(&self, mut lease: Lease, spec: LeaseSpec) -> Result<Role, kube::Error> {
        // The resourceVersion read stays in the metadata: the write fails with a conflict
        // if anyone wrote in between.
        lease.spec = Some(spec);
        self.write(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await
    }

    async fn write(
        &self,
        call: impl Future<Output = Result<Lease, kube::Error>>,
    ) -> Result<Role, kube::Error> {
        match call.await {
            Ok(_) => Ok(Role::Leader),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let holder = self
                    .api
                    .get_opt(&self.name)
                    .await?
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity);
                Ok(Role::Follower(holder))
            }
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: jiff::Timestamp, now: jiff::Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Campaigns until `stop`, publishing whether we lead on `leading`. Never returns an
    /// error: failed rounds are logged and, past [`RENEW_DEADLINE`] without a successful
    /// renewal, end our leadership.
    pub async fn run(
        self,
        leading: watch::Sender<bool>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        let mut every = crate::periodic::Every::new(RENEW_PERIOD, stop);
        while every.tick().await {
            let lead = match self.round(jiff::Timestamp::now()).await {
                Ok(Role::Leader) => {
                    last_renewal = Some(tokio::time::Instant::now());
                    true
                }
                Ok(Role::Follower(_)) => {
                    last_renewal = None;
                    false
                }
                Err(e) => {
                    let within_deadline =
                        last_renewal.is_some_and(|at| at.elapsed() < RENEW_DEADLINE);
                    tracing::warn!(error = %e, still_leading = within_deadline, "leader election round failed");
                    within_deadline
                }
            };
            leading.send_if_modified(|current| {
                let changed = *current != lead;
                if changed {
                    tracing::info!(identity = %self.identity, leading = lead, "leadership changed");
                }
                *current = lead;
                changed
            });
        }
        // Stop leading first, then hand over at once instead of making a standby wait out
        // the lease: never two leaders, not even for the length of one request.
        if leading.send_replace(false)
            && let Err(e) = self.release().await
        {
            tracing::warn!(error = %e, "releasing the lease failed; a standby takes over when it lapses");
        }
    }

    /// Gives the Lease up (clears the holder), so a standby takes over on its next round.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

/// Whether a Lease's holder let it lapse by `now`. A Lease without a renewal time or a
/// duration has lapsed.
fn expired(spec: &LeaseSpec, now: jiff::Timestamp) -> bool {
    let (Some(renewed), Some(seconds)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds)
    else {
        return true;
    };
    let until = renewed
        .0
        .checked_add(jiff::SignedDuration::from_secs(i64::from(seconds.max(0))))
        .unwrap_or(jiff::Timestamp::MAX);
    now >= until
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use http::{Method, StatusCode};
    use serde_json::{Value, json};

    use crate::kubernetes::testing::{self, Handle, exchange};

    const PATH: &str =
        "/apis/coordination.k8s.io/v1/namespaces/micromine/leases/micromine-controller";
    const COLLECTION: &str = "/apis/coordination.k8s.io/v1/namespaces/micromine/leases";

    fn elector(identity: &str) -> (LeaderElector, Handle) {
        let (client, handle) = testing::client("micromine");
        let api = Api::namespaced(client, "micromine");
        (
            LeaderElector::new(api, "micromine-controller", identity),
            handle,
        )
    }

    fn now() -> jiff::Timestamp {
        "2026-11-26T04:00:00Z".parse().unwrap()
    }

    fn at(seconds_before_now: i64) -> String {
        now()
            .checked_sub(jiff::SignedDuration::from_secs(seconds_before_now))
            .unwrap()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    }

    fn lease(holder: &str, renewed_seconds_ago: i64, transitions: i32, version: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "micromine-controller", "namespace": "micromine", "resourceVersion": version},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 15,
                "acquireTime": at(600),
                "renewTime": at(renewed_seconds_ago),
                "leaseTransitions": transitions,
            }
        })
    }

    /// The round reads the Lease and finds `lease`.
    async fn read_lease(api: &mut Handle, lease: Value) {
        exchange(api, Method::GET, PATH, StatusCode::OK, lease).await;
    }

    fn not_found() -> Value {
        testing::failure(404, "NotFound", "leases \"micromine-controller\" not found")
    }

    fn conflict() -> Value {
        testing::failure(409, "Conflict", "the object has been modified")
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_lease_and_leads() {
        let (elector, mut api) = elector("pod-a");
        let round = tokio::spawn(async move { elector.round(now()).await });
        exchange(
            &mut api,
            Method::GET,
            PATH,
            StatusCode::NOT_FOUND,
            not_found(),
        )
        .await;
        let created = exchange(
            &mut api,
            Method::POST,
            COLLECTION,
            StatusCode::CREATED,
            lease("pod-a", 0, 0, "1"),
        )
        .await;
        assert_eq!(created["metadata"]["name"], "micromine-controller");
        assert_eq!(created["spec"]["holderIdentity"], "pod-a");
        assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(created["spec"]["leaseTransitions"], 0);
        assert!(
            created["spec"]["renewTime"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-26T04:00:00")
        );
        assert_eq!(round.await.unwrap().unwrap(), Role::Leader);
    }

    #[tokio::test]
    async fn a_valid_lease_of_another_replica_is_followed_without_a_write() {
        let (elector, mut api) = elector("pod-b");
        let round = tokio::spawn(async move { elector.round(now()).await });
        read_lease(&mut api, lease("pod-a", 14, 0, "5")).await;
        assert_eq!(
            round.await.unwrap().unwrap(),
            Role::Follower(Some("pod-a".into()))
        );
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_taken_over_with_the_version_read() {
        let (elector, mut api) = elector("pod-b");
        let round = tokio::spawn(async move { elector.round(now()).await });
        read_lease(&mut api, lease("pod-a", 15, 2, "7")).await;
        let replaced = exchange(
            &mut api,
            Method::PUT,
            PATH,
            StatusCode::OK,
            lease("pod-b", 0, 3, "8"),
        )
        .await;
        assert_eq!(
            replaced["metadata"]["resourceVersion"], "7",
            "optimistic concurrency"
        );
        assert_eq!(replaced["spec"]["holderIdentity"], "pod-b");
        assert_eq!(replaced["spec"]["leaseTransitions"], 3);
        assert!(
            replaced["spec"]["acquireTime"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-26T04:00:00")
        );
        assert_eq!(round.await.unwrap().unwrap(), Role::Leader);
    }

    #[tokio::test]
    async fn the_holder_renews_keeping_its_acquire_time() {
        let (elector, mut api) = elector("pod-a");
        let round = tokio::spawn(async move { elector.round(now()).await });
        read_lease(&mut api, lease("pod-a", 2, 4, "9")).await;
        let renewed = exchange(
            &mut api,
            Method::PUT,
            PATH,
            StatusCode::OK,
            lease("pod-a", 0, 4, "10"),
        )
        .await;
        assert_eq!(renewed["metadata"]["resourceVersion"], "9");
        assert_eq!(
            renewed["spec"]["leaseTransitions"], 4,
            "a renewal is not a transition"
        );
        assert_eq!(renewed["spec"]["acquireTime"].as_str().unwrap(), at(600));
        assert!(
            renewed["spec"]["renewTime"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-26T04:00:00")
        );
        assert_eq!(round.await.unwrap().unwrap(), Role::Leader);
    }

    #[tokio::test]
    async fn losing_a_takeover_race_means_following_the_winner() {
        let (elector, mut api) = elector("pod-b");
        let round = tokio::spawn(async move { elector.round(now()).await });
        read_lease(&mut api, lease("pod-a", 60, 1, "11")).await;
        exchange(
            &mut api,
            Method::PUT,
            PATH,
            StatusCode::CONFLICT,
            conflict(),
        )
        .await;
        read_lease(&mut api, lease("pod-c", 0, 2, "12")).await;
        assert_eq!(
            round.await.unwrap().unwrap(),
            Role::Follower(Some("pod-c".into()))
        );
    }

    /// A campaign by `pod-a` that found no Lease, created one and leads.
    async fn elected_campaign() -> (
        Handle,
        watch::Receiver<bool>,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (elector, mut api) = elector("pod-a");
        let (leading_tx, mut leading) = watch::channel(false);
        let stop = tokio_util::sync::CancellationToken::new();
        let campaign = tokio::spawn(elector.run(leading_tx, stop.clone()));
        exchange(
            &mut api,
            Method::GET,
            PATH,
            StatusCode::NOT_FOUND,
            not_found(),
        )
        .await;
        exchange(
            &mut api,
            Method::POST,
            COLLECTION,
            StatusCode::CREATED,
            lease("pod-a", 0, 0, "1"),
        )
        .await;
        leading.changed().await.unwrap();
        assert!(*leading.borrow());
        (api, leading, stop, campaign)
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_before_its_lease_lapses() {
        let (mut api, leading, stop, campaign) = elected_campaign().await;
        let elected = tokio::time::Instant::now();

        // The API server stops answering properly.
        let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "etcd unavailable"});
        let mut failed_rounds = 0;
        while *leading.borrow() {
            exchange(
                &mut api,
                Method::GET,
                PATH,
                StatusCode::SERVICE_UNAVAILABLE,
                unavailable.clone(),
            )
            .await;
            failed_rounds += 1;
            tokio::task::yield_now().await;
        }
        let stepped_down_after = elected.elapsed();
        assert!(
            stepped_down_after >= RENEW_DEADLINE,
            "{stepped_down_after:?}"
        );
        assert!(
            stepped_down_after < LEASE_DURATION,
            "before a standby may take over: {stepped_down_after:?}"
        );
        assert!(failed_rounds >= 4, "{failed_rounds}");
        stop.cancel();
        // Not leading, so nothing to release: the campaign ends without another request.
        tokio::time::timeout(Duration::from_secs(5), campaign)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_stops_hands_the_lease_over_at_once() {
        let (mut api, leading, stop, campaign) = elected_campaign().await;

        stop.cancel();
        read_lease(&mut api, lease("pod-a", 0, 0, "2")).await;
        let released = exchange(
            &mut api,
            Method::PUT,
            PATH,
            StatusCode::OK,
            lease("", 0, 0, "3"),
        )
        .await;
        assert_eq!(released["metadata"]["resourceVersion"], "2");
        assert!(
            released["spec"]
                .get("holderIdentity")
                .is_none_or(Value::is_null),
            "{released}"
        );
        tokio::time::timeout(Duration::from_secs(5), campaign)
            .await
            .unwrap()
            .unwrap();
        assert!(!*leading.borrow());
    }

    #[test]
    fn a_lease_lapses_exactly_at_renewal_plus_duration() {
        let spec = |renewed: i64| LeaseSpec {
            renew_time: Some(MicroTime(
                now()
                    .checked_sub(jiff::SignedDuration::from_secs(renewed))
                    .unwrap(),
            )),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec(14), now()));
        assert!(expired(&spec(15), now()));
        assert!(
            expired(&LeaseSpec::default(), now()),
            "no renewal time: lapsed"
        );
    }
}
