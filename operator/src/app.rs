//! Command-line configuration and the operator's top-level `run`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{ArgAction, Parser};
use cplink_runtime::admin::{self, Readiness};
use cplink_runtime::args::LogArgs;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::election::{
    Elector, KubeLease, LostLeadership, Renewal, Role, Status, Timing, TimingError,
};
use crate::metrics::Metrics;
use crate::reconciler::{self, Context};

/// Flags of `cplink-operator`; each also reads the `CPLINK_...` environment variable shown.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cplink-operator",
    version,
    about = "Runs cplink ControlPlaneLinks"
)]
pub struct Config {
    /// Image of servers and agents when a link names none (normally the operator's own image,
    /// which carries all three binaries).
    #[arg(long, env = "CPLINK_DEFAULT_IMAGE")]
    pub default_image: String,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "CPLINK_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub admin_address: SocketAddr,
    /// Leader election among replicas.
    #[command(flatten)]
    pub leader_election: LeaderElectionArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Leader election: of several replicas, only the one holding a `coordination.k8s.io` Lease
/// runs the controller; the others stand by to take over.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaderElectionArgs {
    /// Elect a leader through a Lease before reconciling. Without it the operator reconciles at
    /// once and must run as a single replica.
    #[arg(
        long = "leader-elect",
        env = "CPLINK_LEADER_ELECT",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true"
    )]
    pub enabled: bool,
    /// Name of the Lease.
    #[arg(
        long = "leader-elect-resource-name",
        env = "CPLINK_LEADER_ELECT_RESOURCE_NAME",
        default_value = "cplink-operator"
    )]
    pub lease_name: String,
    /// Namespace of the Lease [default: the namespace of the pod's ServiceAccount, or of the
    /// kubeconfig's context].
    #[arg(
        long = "leader-elect-resource-namespace",
        env = "CPLINK_LEADER_ELECT_RESOURCE_NAMESPACE"
    )]
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease (`holderIdentity`), unique among the replicas: the
    /// pod's name [default: the host name and a random suffix].
    #[arg(long = "leader-elect-identity", env = "CPLINK_LEADER_ELECT_IDENTITY")]
    pub identity: Option<String>,
    /// How long a Lease holds without renewal before another replica may take it (whole
    /// seconds).
    #[arg(
        long = "leader-elect-lease-duration",
        env = "CPLINK_LEADER_ELECT_LEASE_DURATION",
        default_value = "15s",
        value_parser = humantime::parse_duration
    )]
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew the Lease before it stops leading (and exits);
    /// shorter than the lease duration.
    #[arg(
        long = "leader-elect-renew-deadline",
        env = "CPLINK_LEADER_ELECT_RENEW_DEADLINE",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub renew_deadline: Duration,
    /// How often each replica tries to acquire or renew the Lease.
    #[arg(
        long = "leader-elect-retry-period",
        env = "CPLINK_LEADER_ELECT_RETRY_PERIOD",
        default_value = "2s",
        value_parser = humantime::parse_duration
    )]
    pub retry_period: Duration,
}

impl LeaderElectionArgs {
    /// The election's timing, as given.
    pub fn timing(&self) -> Timing {
        Timing {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        }
    }

    /// The identity given, else the host name (a pod's name) with a random suffix, so that two
    /// processes on one host never share an identity.
    fn identity(&self) -> Result<String, RunError> {
        if let Some(identity) = self.identity.as_deref().map(str::trim) {
            return if identity.is_empty() {
                Err(RunError::NoIdentity)
            } else {
                Ok(identity.to_owned())
            };
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|_| RunError::NoIdentity)?;
        let host = host.trim();
        if host.is_empty() {
            return Err(RunError::NoIdentity);
        }
        Ok(format!("{host}_{:08x}", rand::random::<u32>()))
    }
}

/// Why the operator could not run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("connecting to Kubernetes: {0}")]
    Client(#[from] kube::Error),
    /// The admin server task panicked.
    #[error("admin server task: {0}")]
    AdminTask(#[from] tokio::task::JoinError),
    /// The leader election flags cannot work together.
    #[error("leader election: {0}")]
    Timing(#[from] TimingError),
    /// No identity for the Lease was given and the host name cannot be read.
    #[error(
        "leader election needs this replica's identity: set --leader-elect-identity (the pod's \
         name)"
    )]
    NoIdentity,
    /// This replica led and lost the Lease: it stopped reconciling and exits, to rejoin the
    /// election as a new process.
    #[error("lost leadership: {0}")]
    LostLeadership(#[from] LostLeadership),
}

/// How long running reconciles may take to finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How long a leader shutting down tries to release the Lease. Bounded: should it fail, the
/// Lease expires on its own after the lease duration.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Completes `SHUTDOWN_GRACE` after shutdown is requested, or at once if the watches never
/// synced: then no reconcile can be running, and kube-runtime would keep waiting for the sync.
async fn shutdown_deadline(shutdown: &CancellationToken, ready: &AtomicBool) {
    shutdown.cancelled().await;
    if ready.load(Ordering::Acquire) {
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    }
}

/// Runs the admin server on `admin` and the controller until `shutdown` is cancelled; returns
/// once in-flight reconciles have finished. With leader election the controller runs only
/// while this replica leads; losing the Lease ends `run` with [`RunError::LostLeadership`].
pub async fn run(
    config: Config,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let election = &config.leader_election;
    let timing = election.timing();
    if election.enabled {
        timing.validate()?;
    }
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        config.default_image.clone(),
    ));
    tracing::info!(admin = %config.admin_address, "starting cplink-operator");
    if !election.enabled {
        metrics.leader.set(1);
        // Ready once the controller's watches have synced.
        let readiness = admin::ready_when_set(ready.clone(), "controller not started");
        let admin_task = serve_admin(admin, &metrics, readiness, &shutdown);
        reconcile_until_shutdown(ctx, ready, &shutdown).await;
        // The controller may also stop on its own (its watch streams ended): take the admin
        // server down with it so the pod restarts rather than lingering half-alive.
        shutdown.cancel();
        admin_task.await?;
        return Ok(());
    }
    let namespace = election
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let store = KubeLease::new(client, &namespace, &election.lease_name);
    let mut elector = Elector::new(store, election.identity()?, timing, metrics.clone());
    let readiness = election_readiness(elector.status(), ready.clone());
    let admin_task = serve_admin(admin, &metrics, readiness, &shutdown);
    tracing::info!(
        identity = elector.identity(),
        lease = %format_args!("{namespace}/{}", election.lease_name),
        "waiting to lead"
    );
    let result = lead(&mut elector, ctx, ready, &shutdown).await;
    shutdown.cancel();
    admin_task.await?;
    result
}

fn serve_admin(
    admin: TcpListener,
    metrics: &Metrics,
    readiness: impl Readiness,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(admin::serve(
        admin,
        metrics.registry(),
        Arc::new(readiness),
        shutdown.clone(),
    ))
}

/// Runs the controller until `shutdown`, then lets running reconciles finish for at most
/// [`SHUTDOWN_GRACE`].
async fn reconcile_until_shutdown(
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    shutdown: &CancellationToken,
) {
    let controller = reconciler::run(ctx, ready.clone(), shutdown.clone().cancelled_owned());
    tokio::select! {
        () = controller => {}
        () = shutdown_deadline(shutdown, &ready) => {
            if ready.load(Ordering::Acquire) {
                tracing::warn!("reconciles did not finish in time; exiting anyway");
            } else {
                tracing::info!("watches never synced; nothing to wait for");
            }
        }
    }
}

/// Waits to lead, then runs the controller while renewing the Lease. On shutdown the
/// controller drains first (still renewing), then the Lease is released so that a standby
/// replica takes over at once. Losing the Lease drops the controller where it stands.
async fn lead(
    elector: &mut Elector<KubeLease>,
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    if !elector.acquire(shutdown).await {
        return Ok(());
    }
    let outcome = {
        let controller = reconcile_until_shutdown(ctx, ready, shutdown);
        let keep_renewing = CancellationToken::new();
        let renewing = elector.renew(&keep_renewing);
        tokio::pin!(controller, renewing);
        tokio::select! {
            renewal = &mut renewing => renewal,
            () = &mut controller => Renewal::Stopped,
        }
    };
    match outcome {
        Renewal::Lost(why) => Err(why.into()),
        Renewal::Stopped => {
            // Bounded: past the renew deadline the Lease expires on its own anyway.
            match tokio::time::timeout(RELEASE_TIMEOUT, elector.release()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => tracing::info!("the leader Lease was no longer held"),
                Ok(Err(err)) => tracing::warn!(
                    error = %err,
                    "cannot release the leader Lease; another replica takes over when it expires"
                ),
                Err(_) => tracing::warn!(
                    "releasing the leader Lease timed out; another replica takes over when it \
                     expires"
                ),
            }
            Ok(())
        }
    }
}

/// Readiness with leader election. Nothing routes traffic to the operator, so readiness only
/// paces rollouts: a standby replica is ready once it has read the Lease (the API server is
/// reachable and the Lease permitted), and stays ready while it can; the leader is ready once
/// its watches have synced.
fn election_readiness(status: watch::Receiver<Status>, synced: Arc<AtomicBool>) -> impl Readiness {
    move || {
        let status = status.borrow();
        match (&status.role, &status.last_error) {
            (Role::Leader, _) if synced.load(Ordering::Acquire) => Ok(()),
            (Role::Leader, _) => Err("leading; the controller's watches have not synced".into()),
            (Role::Follower { .. }, None) => Ok(()),
            (_, Some(err)) => Err(format!("cannot read the leader Lease: {err}")),
            (Role::Candidate, None) => Err("has not read the leader Lease yet".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use cplink_runtime::telemetry::LogFormat;

    use super::*;

    #[test]
    fn flags_have_documented_defaults() {
        let config = Config::try_parse_from(["cplink-operator", "--default-image", "img:1"])
            .expect("parses");
        assert_eq!(config.default_image, "img:1");
        assert_eq!(config.admin_address, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(config.log.log_format, LogFormat::Text);
        assert_eq!(config.log.log_level, "info");
    }

    #[test]
    fn the_log_format_accepts_json() {
        let config = Config::try_parse_from([
            "cplink-operator",
            "--default-image=img",
            "--log-format=json",
        ])
        .expect("parses");
        assert_eq!(config.log.log_format, LogFormat::Json);
    }

    #[test]
    fn leader_election_is_off_by_default_with_controller_runtimes_timing() {
        let config =
            Config::try_parse_from(["cplink-operator", "--default-image=img"]).expect("parses");
        let election = config.leader_election;
        assert!(!election.enabled);
        assert_eq!(election.timing(), Timing::DEFAULT);
        assert_eq!(election.lease_name, "cplink-operator");
        assert_eq!(election.lease_namespace, None);
        assert_eq!(election.identity, None);
    }

    #[test]
    fn leader_election_flags_parse() {
        let parse = |args: &[&str]| {
            let mut all = vec!["cplink-operator", "--default-image=img"];
            all.extend(args);
            Config::try_parse_from(all).map(|c| c.leader_election)
        };
        assert!(parse(&["--leader-elect"]).expect("parses").enabled);
        assert!(parse(&["--leader-elect=true"]).expect("parses").enabled);
        assert!(!parse(&["--leader-elect=false"]).expect("parses").enabled);
        let election = parse(&[
            "--leader-elect",
            "--leader-elect-resource-name=ops",
            "--leader-elect-resource-namespace=tunnels",
            "--leader-elect-identity=op-a",
            "--leader-elect-lease-duration=4s",
            "--leader-elect-renew-deadline=3s",
            "--leader-elect-retry-period=500ms",
        ])
        .expect("parses");
        assert_eq!(election.lease_name, "ops");
        assert_eq!(election.lease_namespace.as_deref(), Some("tunnels"));
        assert_eq!(election.identity().expect("identity"), "op-a");
        assert_eq!(
            election.timing(),
            Timing {
                lease_duration: Duration::from_secs(4),
                renew_deadline: Duration::from_secs(3),
                retry_period: Duration::from_millis(500),
            }
        );
        let err = parse(&["--leader-elect-retry-period=often"]).expect_err("refused");
        assert!(
            err.to_string().contains("--leader-elect-retry-period"),
            "{err}"
        );
    }

    #[test]
    fn without_a_given_identity_the_host_name_gets_a_random_suffix() {
        let config =
            Config::try_parse_from(["cplink-operator", "--default-image=img"]).expect("parses");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("host name");
        let first = config.leader_election.identity().expect("identity");
        let second = config.leader_election.identity().expect("identity");
        assert!(first.starts_with(&format!("{}_", host.trim())), "{first}");
        assert_ne!(first, second);
        let blank = Config::try_parse_from([
            "cplink-operator",
            "--default-image=img",
            "--leader-elect-identity= ",
        ])
        .expect("parses");
        assert!(matches!(
            blank.leader_election.identity(),
            Err(RunError::NoIdentity)
        ));
    }

    #[test]
    fn standby_replicas_are_ready_once_they_read_the_lease_and_the_leader_once_synced() {
        let (status, receiver) = watch::channel(Status {
            role: Role::Candidate,
            last_error: None,
        });
        let synced = Arc::new(AtomicBool::new(false));
        let readiness = election_readiness(receiver, synced.clone());
        let set = |role: Role, last_error: Option<&str>| {
            status.send_replace(Status {
                role,
                last_error: last_error.map(str::to_owned),
            });
        };
        assert!(readiness.check().is_err(), "a candidate is not ready");
        set(Role::Candidate, Some("forbidden"));
        let reason = readiness.check().expect_err("not ready");
        assert!(reason.contains("forbidden"), "{reason}");
        set(
            Role::Follower {
                holder: Some("op-a".into()),
            },
            None,
        );
        assert_eq!(readiness.check(), Ok(()));
        set(Role::Follower { holder: None }, Some("connection refused"));
        assert!(readiness.check().is_err(), "a standby cut off is not ready");
        set(Role::Leader, None);
        assert!(readiness.check().is_err(), "leading, not yet synced");
        synced.store(true, Ordering::Release);
        assert_eq!(readiness.check(), Ok(()));
    }
}
