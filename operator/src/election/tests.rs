//! The election's rules on a fake Lease store with real `resourceVersion` semantics, under
//! tokio's paused clock: who leads, when a follower may take over, what a leader does when
//! renewals fail, and that two replicas never lead at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ObjectMeta;
use kube::client::Body;

use super::*;

const NAME: &str = "cplink-operator";

/// The Lease as the API server would keep it: one record and its version.
#[derive(Default)]
struct Stored {
    lease: Option<Lease>,
    version: u64,
}

impl Stored {
    fn put(&mut self, mut spec: LeaseSpec) -> Lease {
        self.version += 1;
        spec.holder_identity = spec.holder_identity.filter(|h| !h.is_empty());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                resource_version: Some(self.version.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        self.lease = Some(lease.clone());
        lease
    }
}

/// One replica's view of a shared fake Lease: the record is shared, the replica's network
/// (down, hung) is its own.
#[derive(Clone, Default)]
struct FakeLease {
    stored: Arc<Mutex<Stored>>,
    down: Arc<AtomicBool>,
    hung: Arc<AtomicBool>,
    /// A holder that writes the Lease between this replica's read and its next write.
    race: Arc<Mutex<Option<String>>>,
}

impl FakeLease {
    /// Another replica on the same Lease, with a network of its own.
    fn replica(&self) -> Self {
        FakeLease {
            stored: self.stored.clone(),
            ..FakeLease::default()
        }
    }

    fn spec(&self) -> LeaseSpec {
        let stored = self.stored.lock().unwrap();
        stored
            .lease
            .as_ref()
            .and_then(|l| l.spec.clone())
            .expect("a Lease exists")
    }

    fn holder(&self) -> Option<String> {
        self.spec().holder_identity
    }

    /// Writes the Lease as a replica that is not under test would: `holder` renewed now.
    fn write_holder(&self, holder: &str) {
        let mut stored = self.stored.lock().unwrap();
        let mut spec = stored
            .lease
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        spec.holder_identity = Some(holder.into());
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(15);
        stored.put(spec);
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    async fn network(&self) -> Result<(), StoreError> {
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Api(kube::Error::Service(
                "connection refused".into(),
            )));
        }
        Ok(())
    }
}

impl LeaseStore for FakeLease {
    async fn get(&self) -> Result<Option<Lease>, StoreError> {
        self.network().await?;
        Ok(self.stored.lock().unwrap().lease.clone())
    }

    async fn create(&self, spec: LeaseSpec) -> Result<Lease, StoreError> {
        self.network().await?;
        let mut stored = self.stored.lock().unwrap();
        if stored.lease.is_some() {
            return Err(StoreError::Conflict);
        }
        Ok(stored.put(spec))
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, StoreError> {
        self.network().await?;
        if let Some(holder) = self.race.lock().unwrap().take() {
            self.write_holder(&holder);
        }
        let mut stored = self.stored.lock().unwrap();
        if lease.metadata.resource_version != Some(stored.version.to_string()) {
            return Err(StoreError::Conflict);
        }
        Ok(stored.put(lease.spec.clone().unwrap_or_default()))
    }
}

fn elector(store: &FakeLease, identity: &str) -> Elector<FakeLease> {
    Elector::new(
        store.clone(),
        identity.into(),
        Timing::DEFAULT,
        Arc::new(Metrics::default()),
    )
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn controller_runtime_defaults_are_valid() {
    assert_eq!(Timing::DEFAULT.validate(), Ok(()));
    assert_eq!(Timing::DEFAULT.lease_duration, secs(15));
    assert_eq!(Timing::DEFAULT.renew_deadline, secs(10));
    assert_eq!(Timing::DEFAULT.retry_period, secs(2));
}

#[test]
fn timings_that_cannot_work_are_refused_with_the_reason() {
    let with = |lease: Duration, renew: Duration, retry: Duration| {
        Timing {
            lease_duration: lease,
            renew_deadline: renew,
            retry_period: retry,
        }
        .validate()
    };
    let half = Duration::from_millis(500);
    assert_eq!(
        with(
            Duration::from_millis(1500),
            half,
            Duration::from_millis(100)
        ),
        Err(TimingError::LeaseSeconds(Duration::from_millis(1500)))
    );
    assert!(matches!(
        with(Duration::ZERO, half, half),
        Err(TimingError::LeaseSeconds(_))
    ));
    assert!(matches!(
        with(secs(10), secs(10), secs(2)),
        Err(TimingError::RenewDeadline { .. })
    ));
    assert!(matches!(
        with(secs(15), secs(10), Duration::ZERO),
        Err(TimingError::RetryPeriod { .. })
    ));
    // 9 s stretched by the jitter reaches past a 10 s deadline.
    let err = with(secs(15), secs(10), secs(9)).unwrap_err();
    assert!(err.to_string().contains("retry period (9s)"), "{err}");
    assert_eq!(with(secs(4), secs(3), half), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn the_first_replica_creates_the_lease_and_holds_it() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    assert_eq!(a.status().borrow().role, Role::Candidate);
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    let spec = store.spec();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.lease_transitions, Some(0));
    assert!(spec.acquire_time.is_some());
    assert_eq!(spec.acquire_time, spec.renew_time);
}

#[tokio::test(start_paused = true)]
async fn renewals_move_renew_time_only() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    a.try_acquire_or_renew().await.unwrap();
    let first = store.spec();
    tokio::time::advance(secs(2)).await;
    // The wall clock must move for renewTime to change.
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    let renewed = store.spec();
    assert_eq!(renewed.acquire_time, first.acquire_time);
    assert_eq!(renewed.lease_transitions, Some(0));
    assert!(renewed.renew_time > first.renew_time);
}

#[tokio::test(start_paused = true)]
async fn a_follower_takes_over_only_once_the_record_stood_still_for_the_lease_duration() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    let mut b = elector(&store.replica(), "op-b");
    a.try_acquire_or_renew().await.unwrap();
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-a".into())
    );
    // The leader renews 10 s in: the follower's 15 s start again from when it saw that.
    tokio::time::advance(secs(10)).await;
    a.try_acquire_or_renew().await.unwrap();
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-a".into())
    );
    // The leader dies. 14.9 s later the record has not stood long enough.
    tokio::time::advance(Duration::from_millis(14_900)).await;
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-a".into())
    );
    assert_eq!(store.holder().as_deref(), Some("op-a"));
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    let spec = store.spec();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(spec.acquire_time, spec.renew_time);
    // The deposed leader finds out at its next attempt.
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-b".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_just_started_waits_a_whole_lease_duration() {
    let store = FakeLease::default();
    store.write_holder("op-gone");
    let mut b = elector(&store, "op-b");
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-gone".into())
    );
    tokio::time::advance(secs(14)).await;
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-gone".into())
    );
    tokio::time::advance(secs(1)).await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
}

#[tokio::test(start_paused = true)]
async fn of_two_replicas_racing_for_one_record_the_later_write_conflicts() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    a.try_acquire_or_renew().await.unwrap();
    a.release().await.unwrap();
    let b_store = store.replica();
    let mut b = elector(&b_store, "op-b");
    // op-c writes between op-b's read and op-b's write.
    *b_store.race.lock().unwrap() = Some("op-c".into());
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Conflict);
    assert_eq!(store.holder().as_deref(), Some("op-c"));
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-c".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once_and_counts_a_transition() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    let mut b = elector(&store.replica(), "op-b");
    a.try_acquire_or_renew().await.unwrap();
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-a".into())
    );
    assert!(a.release().await.unwrap());
    let released = store.spec();
    assert_eq!(released.holder_identity, None);
    assert_eq!(released.lease_transitions, Some(0));
    assert_eq!(a.status().borrow().role, Role::Follower { holder: None });
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
    assert_eq!(store.spec().lease_transitions, Some(1));
}

#[tokio::test(start_paused = true)]
async fn releasing_leaves_another_replicas_lease_alone() {
    let store = FakeLease::default();
    store.write_holder("op-b");
    let mut a = elector(&store, "op-a");
    assert!(!a.release().await.unwrap());
    assert_eq!(store.holder().as_deref(), Some("op-b"));
}

#[tokio::test(start_paused = true)]
async fn acquire_follows_until_the_holder_releases() {
    let store = FakeLease::default();
    store.write_holder("op-a");
    let b_store = store.replica();
    let metrics = Arc::new(Metrics::default());
    let mut b = Elector::new(b_store, "op-b".into(), Timing::DEFAULT, metrics.clone());
    let mut status = b.status();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let acquiring = tokio::spawn(async move {
        let led = b.acquire(&shutdown).await;
        (led, b)
    });
    status
        .wait_for(|s| {
            s.role
                == Role::Follower {
                    holder: Some("op-a".into()),
                }
        })
        .await
        .unwrap();
    assert_eq!(metrics.leader.get(), 0);
    // op-a keeps renewing for 20 s, then releases.
    for _ in 0..10 {
        tokio::time::sleep(secs(2)).await;
        store.write_holder("op-a");
    }
    let mut spec = store.spec();
    spec.holder_identity = None;
    store.stored.lock().unwrap().put(spec);
    let released = Instant::now();
    let (led, b) = acquiring.await.unwrap();
    assert!(led);
    assert!(released - started >= secs(20));
    // Taken at the follower's next retry: at most the retry period stretched by the jitter.
    assert!(Instant::now() - released <= Timing::DEFAULT.retry_period.mul_f64(JITTER));
    assert_eq!(store.holder().as_deref(), Some("op-b"));
    assert_eq!(b.status().borrow().role, Role::Leader);
    assert_eq!(metrics.leader.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn acquire_gives_up_on_shutdown_and_reports_api_errors() {
    let store = FakeLease::default();
    store.set_down(true);
    let mut b = elector(&store, "op-b");
    let mut status = b.status();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let acquiring = tokio::spawn(async move { b.acquire(&stop).await });
    let seen = status
        .wait_for(|s| s.last_error.is_some())
        .await
        .unwrap()
        .clone();
    assert_eq!(seen.role, Role::Candidate);
    assert!(
        seen.last_error.unwrap().contains("connection refused"),
        "the error is reported"
    );
    shutdown.cancel();
    assert!(!acquiring.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_leader_cut_off_from_the_api_stops_before_anyone_may_take_over() {
    let store = FakeLease::default();
    let metrics = Arc::new(Metrics::default());
    let mut a = Elector::new(
        store.clone(),
        "op-a".into(),
        Timing::DEFAULT,
        metrics.clone(),
    );
    let mut b = elector(&store.replica(), "op-b");
    assert!(a.acquire(&CancellationToken::new()).await);
    let acquired = Instant::now();
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-a".into())
    );
    store.set_down(true);
    let outcome = a.renew(&CancellationToken::new()).await;
    let stopped = Instant::now() - acquired;
    assert_eq!(
        outcome,
        Renewal::Lost(LostLeadership::RenewDeadline(secs(10)))
    );
    assert_eq!(stopped, secs(10));
    assert_eq!(metrics.leader.get(), 0);
    // op-b may take over only later, 15 s after it saw op-a's last renewal.
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Attempt::HeldBy("op-a".into())
    );
    tokio::time::advance(secs(15) - stopped).await;
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Leading);
}

#[tokio::test(start_paused = true)]
async fn a_hung_api_cannot_keep_a_leader_past_the_renew_deadline() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    assert!(a.acquire(&CancellationToken::new()).await);
    let acquired = Instant::now();
    store.hung.store(true, Ordering::SeqCst);
    let outcome = a.renew(&CancellationToken::new()).await;
    assert_eq!(
        outcome,
        Renewal::Lost(LostLeadership::RenewDeadline(secs(10)))
    );
    assert_eq!(Instant::now() - acquired, secs(10));
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_lease_was_taken_stops_at_its_next_renewal() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    assert!(a.acquire(&CancellationToken::new()).await);
    let acquired = Instant::now();
    store.write_holder("op-c");
    let outcome = a.renew(&CancellationToken::new()).await;
    assert_eq!(
        outcome,
        Renewal::Lost(LostLeadership::TakenBy("op-c".into()))
    );
    assert_eq!(Instant::now() - acquired, Timing::DEFAULT.retry_period);
    assert_eq!(
        a.status().borrow().role,
        Role::Follower {
            holder: Some("op-c".into())
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_loses_the_lease_drops_the_links_it_reported() {
    let store = FakeLease::default();
    let metrics = Arc::new(Metrics::default());
    let mut a = Elector::new(
        store.clone(),
        "op-a".into(),
        Timing::DEFAULT,
        metrics.clone(),
    );
    assert!(a.acquire(&CancellationToken::new()).await);
    metrics.record_certificates("tunnels", "edge", &[("ca", 2_000_000_000)]);
    store.write_holder("op-c");
    assert!(matches!(
        a.renew(&CancellationToken::new()).await,
        Renewal::Lost(_)
    ));
    let text = metrics.encode().expect("encodes");
    assert!(
        !text.contains("link=\"edge\""),
        "the new leader reports it: {text}"
    );
    assert!(text.contains("cplink_operator_leader 0\n"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_leader_rides_out_failures_shorter_than_the_renew_deadline() {
    let store = FakeLease::default();
    let mut a = elector(&store, "op-a");
    assert!(a.acquire(&CancellationToken::new()).await);
    let stop = CancellationToken::new();
    let outage = {
        let store = store.clone();
        let stop = stop.clone();
        async move {
            store.set_down(true);
            tokio::time::sleep(secs(7)).await;
            store.set_down(false);
            tokio::time::sleep(secs(30)).await;
            stop.cancel();
        }
    };
    let (outcome, ()) = tokio::join!(a.renew(&stop), outage);
    assert_eq!(outcome, Renewal::Stopped);
    assert_eq!(store.holder().as_deref(), Some("op-a"));
    assert_eq!(a.status().borrow().role, Role::Leader);
    assert!(a.release().await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn the_lease_transitions_are_exported() {
    let store = FakeLease::default();
    let metrics = Arc::new(Metrics::default());
    let mut a = Elector::new(
        store.clone(),
        "op-a".into(),
        Timing::DEFAULT,
        metrics.clone(),
    );
    let mut b = elector(&store.replica(), "op-b");
    a.try_acquire_or_renew().await.unwrap();
    a.release().await.unwrap();
    b.try_acquire_or_renew().await.unwrap();
    b.release().await.unwrap();
    assert_eq!(metrics.leader_transitions.get(), 0);
    a.try_acquire_or_renew().await.unwrap();
    assert_eq!(metrics.leader_transitions.get(), 2);
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("cplink_operator_leader_transitions 2\n"),
        "{text}"
    );
}

/// Who led, from when until when.
type Term = (&'static str, Instant, Instant);

/// Two replicas electing for an hour while their networks fail at random: the intervals in
/// which each believes it leads never overlap, and leadership does change hands.
#[tokio::test(start_paused = true)]
async fn two_replicas_never_lead_at_once() {
    let store = FakeLease::default();
    let leading: Arc<Mutex<Vec<Term>>> = Arc::default();
    let done = CancellationToken::new();
    let mut replicas = Vec::new();
    for name in ["op-a", "op-b"] {
        let replica = store.replica();
        let leading = leading.clone();
        let done = done.clone();
        replicas.push(tokio::spawn(async move {
            let mut elector = elector(&replica, name);
            let flaky = {
                let replica = replica.clone();
                async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(rand::random_range(
                            1_000..40_000,
                        )))
                        .await;
                        let down = !replica.down.load(Ordering::SeqCst);
                        replica.set_down(down);
                    }
                }
            };
            let elect = async {
                while elector.acquire(&done).await {
                    let from = Instant::now();
                    let outcome = elector.renew(&done).await;
                    leading.lock().unwrap().push((name, from, Instant::now()));
                    if outcome == Renewal::Stopped {
                        break;
                    }
                }
            };
            tokio::select! {
                () = elect => {}
                () = flaky => {}
            }
        }));
    }
    tokio::time::sleep(secs(3600)).await;
    done.cancel();
    for replica in replicas {
        replica.await.unwrap();
    }
    let mut leading = leading.lock().unwrap().clone();
    leading.sort_by_key(|(_, from, _)| *from);
    assert!(
        leading.iter().any(|(name, ..)| *name == "op-a")
            && leading.iter().any(|(name, ..)| *name == "op-b"),
        "both replicas led at some point: {leading:?}"
    );
    for pair in leading.windows(2) {
        let (_, _, until) = pair[0];
        let (_, from, _) = pair[1];
        assert!(until <= from, "overlapping leaders: {pair:?}");
    }
}

/// The API server's Lease: a 404 reads as no Lease, and a 409 on replace as a conflict.
#[tokio::test]
async fn the_api_servers_answers_map_to_store_results() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let store = KubeLease::new(client, "cplink-system", NAME);
    let path = "/apis/coordination.k8s.io/v1/namespaces/cplink-system/leases/cplink-operator";
    let server = tokio::spawn(async move {
        for (method, status) in [
            (Method::GET, StatusCode::NOT_FOUND),
            (Method::PUT, StatusCode::CONFLICT),
        ] {
            let (request, respond) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), method);
            assert_eq!(request.uri().path(), path);
            let reason = if status == StatusCode::CONFLICT {
                "Conflict"
            } else {
                "NotFound"
            };
            let body = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": status.as_u16(), "message": reason,
            });
            respond.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    assert!(store.get().await.unwrap().is_none());
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec::default()),
    };
    assert!(matches!(
        store.replace(&lease).await,
        Err(StoreError::Conflict)
    ));
    server.await.unwrap();
}
