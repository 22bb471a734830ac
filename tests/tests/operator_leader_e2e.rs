//! Leader election among `cplink-operator` processes against a real control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler from `scripts/kube.sh`): when the
//! leader is killed the standby takes the Lease once it expires and reconciles a change made
//! meanwhile; a leader stopped with SIGTERM releases the Lease so the standby takes over at
//! once; a leader whose Lease is taken exits.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cplink_e2e::binaries::Operator;
use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::harness::{self, Steps};
use cplink_e2e::{stack, wait, workspace};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::Api;

const NAMESPACE: &str = "cplink-system";
/// The Lease, as the operator names it by default.
const LEASE: &str = "cplink-operator";
const IMAGE: &str = "cplink:e2e";
/// How long one wait for the operator may take.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long a whole test may take: each takes 20 to 60 s.
const TEST_DEADLINE: Duration = Duration::from_secs(300);
/// How much a follower stretches its retry period at most (the operator's jitter).
const JITTER: f64 = 1.2;

/// The Lease's timing of one test.
struct Timing {
    lease: Duration,
    renew: Duration,
    retry: Duration,
}

impl Timing {
    fn flags(&self) -> Vec<String> {
        vec![
            format!("--leader-elect-lease-duration={}s", self.lease.as_secs()),
            format!("--leader-elect-renew-deadline={}ms", self.renew.as_millis()),
            format!("--leader-elect-retry-period={}ms", self.retry.as_millis()),
        ]
    }
}

/// Starts an operator process electing as `identity`, logging to `<identity>.log`.
fn elect(plane: &ControlPlane, identity: &str, timing: &Timing) -> anyhow::Result<Operator> {
    let mut args = vec![
        "--leader-elect".to_owned(),
        format!("--leader-elect-identity={identity}"),
        format!("--leader-elect-resource-namespace={NAMESPACE}"),
    ];
    args.extend(timing.flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Operator::start_with(plane, IMAGE, &format!("{identity}.log"), &args)
}

async fn lease(leases: &Api<Lease>) -> Option<LeaseSpec> {
    leases.get_opt(LEASE).await.ok().flatten()?.spec
}

fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref()
}

/// Waits until `identity` holds the Lease and returns the Lease.
async fn wait_holder(
    leases: &Api<Lease>,
    identity: &str,
    deadline: Duration,
) -> anyhow::Result<LeaseSpec> {
    let seen = Mutex::new(None);
    wait::until_async(
        &format!("{identity} to hold the Lease"),
        deadline,
        || async {
            let spec = lease(leases).await;
            let held = spec.as_ref().and_then(holder) == Some(identity);
            *seen.lock().expect("lock") = spec;
            held
        },
    )
    .await
    .map_err(|e| e.context(format!("last Lease: {:?}", seen.lock().expect("lock"))))?;
    Ok(seen.into_inner()?.unwrap_or_default())
}

/// Waits until the operator logging to `<identity>.log` has read the Lease as a standby.
async fn wait_standby(plane: &ControlPlane, identity: &str) -> anyhow::Result<()> {
    let log = plane.dir().join(format!("{identity}.log"));
    wait::until(&format!("{identity} to follow"), DEADLINE, || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("following the leader"))
    })
    .await
    .map_err(|e| e.context(plane.log_tail(&format!("{identity}.log"))))
}

fn log(plane: &ControlPlane, identity: &str) -> String {
    std::fs::read_to_string(plane.dir().join(format!("{identity}.log"))).unwrap_or_default()
}

fn server_replicas(deployment: &Option<Deployment>) -> Option<i32> {
    deployment.as_ref()?.spec.as_ref()?.replicas
}

/// The control plane with the CRD and the namespace of the Lease and the link.
async fn control_plane() -> anyhow::Result<ControlPlane> {
    let plane = ControlPlane::start(Options::default()).await?;
    stack::install_crd(&plane).await?;
    plane.kubectl_ok(&["create", "namespace", NAMESPACE])?;
    Ok(plane)
}

#[test]
fn a_killed_leaders_standby_takes_over_when_the_lease_expires_and_reconciles() -> anyhow::Result<()>
{
    harness::run(
        "a_killed_leaders_standby_takes_over_when_the_lease_expires_and_reconciles",
        TEST_DEADLINE,
        kill_the_leader,
    )
}

async fn kill_the_leader(steps: Steps) -> anyhow::Result<()> {
    // Short, valid timing (the operator checks it) so that the test waits seconds, not 15 s.
    let timing = Timing {
        lease: Duration::from_secs(4),
        renew: Duration::from_secs(3),
        retry: Duration::from_millis(500),
    };
    steps.enter("starting the control plane");
    let plane = control_plane().await?;
    let client = plane.client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let deployments: Api<Deployment> = Api::namespaced(client, NAMESPACE);

    steps.enter("op-a leading, op-b standing by");
    let mut a = elect(&plane, "op-a", &timing)?;
    let first = wait_holder(&leases, "op-a", DEADLINE).await?;
    assert_eq!(first.lease_duration_seconds, Some(4));
    let b = elect(&plane, "op-b", &timing)?;
    wait_standby(&plane, "op-b").await?;

    steps.enter("op-a rolling out the example link");
    let example = workspace::root().join("crds/examples/controlplanelink.yaml");
    plane.kubectl_ok(&["apply", "-f", &example.display().to_string()])?;
    wait::until_async("the servers' Deployment", DEADLINE, || async {
        server_replicas(&deployments.get_opt("edge-server").await.ok().flatten()) == Some(2)
    })
    .await?;
    assert!(log(&plane, "op-a").contains("reconciling"));
    let standby = log(&plane, "op-b");
    assert!(
        !standby.contains("reconciling") && !standby.contains("watches synced"),
        "the standby runs no controller:\n{standby}"
    );

    steps.enter("killing op-a and changing the link meanwhile");
    let before = lease(&leases).await.unwrap_or_default();
    assert_eq!(holder(&before), Some("op-a"));
    let killed = Instant::now();
    a.kill();
    plane.kubectl_ok(&[
        "patch",
        "-n",
        NAMESPACE,
        "cpl/edge",
        "--type=merge",
        "-p",
        r#"{"spec":{"server":{"replicas":3}}}"#,
    ])?;

    // op-b saw op-a's last renewal within a retry period of its write and takes over within a
    // retry period of that record's expiry; one more second for requests and polling.
    steps.enter("op-b taking the Lease");
    let bound = timing.lease + timing.retry.mul_f64(2.0 * JITTER) + Duration::from_secs(1);
    let taken = Mutex::new(None);
    wait::until_async("op-b to hold the Lease", DEADLINE, || async {
        // The Deployment first, then the Lease: a change seen in the Deployment was made by
        // a leader that held the Lease before this read of it.
        let replicas = server_replicas(&deployments.get_opt("edge-server").await.ok().flatten());
        let spec = lease(&leases).await.unwrap_or_default();
        assert!(
            replicas != Some(3) || holder(&spec) == Some("op-b"),
            "the change was applied while op-b did not lead: {spec:?}"
        );
        let done = holder(&spec) == Some("op-b");
        if done {
            *taken.lock().expect("lock") = Some((killed.elapsed(), spec));
        }
        done
    })
    .await?;
    let (takeover, after) = taken.into_inner()?.unwrap_or_default();
    eprintln!("op-b took the Lease {takeover:?} after op-a was killed (lease 4 s, retry 500 ms)");
    assert!(
        takeover <= bound,
        "took {takeover:?}, more than {bound:?} after the kill"
    );
    // Never before the lease expired: op-b claimed it at least a lease duration after op-a's
    // last renewal (one clock, this host's).
    let renewed = before.renew_time.as_ref().map(|t| t.0).unwrap_or_default();
    let acquired = after.acquire_time.as_ref().map(|t| t.0).unwrap_or_default();
    let waited = acquired.duration_since(renewed);
    assert!(
        waited >= k8s_openapi::jiff::SignedDuration::try_from(timing.lease)?,
        "op-b took the Lease {waited:?} after op-a's last renewal"
    );
    assert_eq!(
        after.lease_transitions,
        before.lease_transitions.map(|n| n + 1)
    );

    steps.enter("op-b reconciling the change made while nobody led");
    wait::until_async("three server replicas", DEADLINE, || async {
        server_replicas(&deployments.get_opt("edge-server").await.ok().flatten()) == Some(3)
    })
    .await
    .map_err(|e| e.context(plane.log_tail("op-b.log")))?;
    eprintln!(
        "the change made after the kill was reconciled {:?} after it",
        killed.elapsed()
    );
    steps.enter("stopping");
    drop((b, a, plane));
    Ok(())
}

#[test]
fn a_leader_stopped_with_sigterm_hands_over_at_once_and_a_deposed_one_exits() -> anyhow::Result<()>
{
    harness::run(
        "a_leader_stopped_with_sigterm_hands_over_at_once_and_a_deposed_one_exits",
        TEST_DEADLINE,
        terminate_the_leader,
    )
}

async fn terminate_the_leader(steps: Steps) -> anyhow::Result<()> {
    // The defaults: a 15 s lease, a 2 s retry period.
    let timing = Timing {
        lease: Duration::from_secs(15),
        renew: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };
    steps.enter("starting the control plane");
    let plane = control_plane().await?;
    let leases: Api<Lease> = Api::namespaced(plane.client().await?, NAMESPACE);

    steps.enter("op-a leading, op-b standing by");
    let mut a = elect(&plane, "op-a", &timing)?;
    let before = wait_holder(&leases, "op-a", DEADLINE).await?;
    let mut b = elect(&plane, "op-b", &timing)?;
    wait_standby(&plane, "op-b").await?;

    steps.enter("SIGTERM to op-a");
    let stopped = Instant::now();
    a.terminate()?;
    let after = wait_holder(&leases, "op-b", timing.lease).await?;
    let takeover = stopped.elapsed();
    eprintln!("op-b took the released Lease {takeover:?} after op-a's SIGTERM (lease 15 s)");
    // The standby's next retry, not the lease's expiry; two seconds for requests and a busy
    // machine.
    let bound = timing.retry.mul_f64(JITTER) + Duration::from_secs(2);
    assert!(bound < timing.lease / 3);
    assert!(takeover <= bound, "took {takeover:?}, more than {bound:?}");
    assert_eq!(
        after.lease_transitions,
        before.lease_transitions.map(|n| n + 1)
    );
    let mut status = None;
    wait::until("op-a to exit", DEADLINE, || {
        status = a.exited();
        status.is_some()
    })
    .await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "op-a exits cleanly: {status:?}"
    );
    assert!(
        log(&plane, "op-a").contains("released the leader Lease"),
        "{}",
        log(&plane, "op-a")
    );

    // Another writer takes the Lease (as a replica would after a partition): op-b finds out at
    // its next renewal and exits rather than reconcile beside the new holder.
    steps.enter("the Lease taken from op-b");
    let mut taken = leases.get(LEASE).await?;
    let spec = taken.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some("op-c".into());
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    leases
        .replace(LEASE, &kube::api::PostParams::default(), &taken)
        .await?;
    let deposed = Instant::now();
    let mut status = None;
    wait::until("op-b to exit", DEADLINE, || {
        status = b.exited();
        status.is_some()
    })
    .await?;
    let exited = deposed.elapsed();
    eprintln!("op-b exited {exited:?} after its Lease was taken (retry 2 s)");
    assert!(
        status.is_some_and(|s| !s.success()),
        "op-b exits with a failure: {status:?}"
    );
    let bound = timing.retry + Duration::from_secs(2);
    assert!(
        exited <= bound,
        "op-b exited {exited:?} after, over {bound:?}"
    );
    assert!(
        log(&plane, "op-b").contains("lost leadership"),
        "{}",
        log(&plane, "op-b")
    );
    steps.enter("stopping");
    drop((b, a, plane));
    Ok(())
}
