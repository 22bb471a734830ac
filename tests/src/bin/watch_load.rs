//! `cplink-watch-load`: what agents finding their servers cost kube-apiserver.
//!
//! In the cluster every agent watches the EndpointSlices of the servers' Service (label
//! `kubernetes.io/service-name`), each over its own connection. This starts a real
//! kube-apiserver and etcd (`scripts/kube.sh`), publishes such a Service and EndpointSlice, and
//! opens `--watchers` watches the way an agent does (kube-runtime's watcher, one client and one
//! connection each). It measures kube-apiserver's own memory and CPU (from `/proc`):
//!
//! 1. before any watch, then with every watch open: memory per watch, CPU per watch opened, and
//!    CPU while they idle for `--idle-for`;
//! 2. `--changes` changes of the EndpointSlice (as a server rollout makes), each delivered to
//!    every watcher before the next: kube-apiserver's CPU per change and per event delivered,
//!    and how long the last watcher waited for it.
//!
//! ```text
//! make bench-scale
//! cargo run --release -p cplink-e2e --bin cplink-watch-load -- --watchers 5000
//! ```
//!
//! It prints figures and asserts nothing but that every watcher saw every change.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::{procfs, wait};
use futures_util::StreamExt as _;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::task::JoinSet;

/// Watches of the servers' EndpointSlices, as that many agents hold, against kube-apiserver.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// How many watches to open, one client and connection each.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    watchers: u32,
    /// How many changes of the EndpointSlice to deliver to every watcher.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    changes: u32,
    /// How long to measure kube-apiserver's CPU with no watch, then with every watch open.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle_for: Duration,
    /// How many watches are being opened at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    opening: u32,
}

/// The namespace and Service the watchers follow.
const NAMESPACE: &str = "default";
const SERVICE: &str = "cplink-edge-server";
/// The annotation of the EndpointSlice each change sets to its number.
const CHANGE: &str = "watch-load.cplink.dev/change";
/// How long any one step may take before the run fails, naming it.
const STEP: Duration = Duration::from_secs(600);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    procfs::raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(run(&cli));
    // The watch tasks end with their connections; do not wait on them.
    runtime.shutdown_timeout(Duration::from_secs(5));
    outcome
}

fn progress(what: &str) {
    eprintln!("cplink-watch-load: {what}");
}

/// kube-apiserver's CPU time and resident memory.
fn sample(pid: u32) -> anyhow::Result<(Duration, u64)> {
    Ok((procfs::cpu(pid)?, procfs::rss_kib(pid)?))
}

/// kube-apiserver's CPU over `window`, as a share of a core.
async fn idle_share(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = procfs::cpu(pid)?;
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(window).await;
    Ok((procfs::cpu(pid)? - before).as_secs_f64() / window.as_secs_f64())
}

/// The EndpointSlice resource the cluster serves (`v1` from 1.21, `v1beta1` before).
async fn endpoint_slices(client: &kube::Client) -> anyhow::Result<ApiResource> {
    let group = kube::discovery::group(client, "discovery.k8s.io").await?;
    let (resource, _) = group
        .recommended_kind("EndpointSlice")
        .context("kube-apiserver serves no EndpointSlice")?;
    Ok(resource)
}

/// The servers' EndpointSlice: two ready endpoints, marked with change `change`.
fn slice(resource: &ApiResource, change: u32) -> anyhow::Result<DynamicObject> {
    let endpoints = [1, 2].map(|host| {
        serde_json::json!({
            "addresses": [format!("198.18.0.{host}")],
            "conditions": { "ready": true },
        })
    });
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{SERVICE}-watch-load"),
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": SERVICE,
                "endpointslice.kubernetes.io/managed-by": "watch-load.cplink.dev",
            },
            "annotations": { CHANGE: change.to_string() },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "agents", "port": 8091, "protocol": "TCP" }],
    }))?)
}

/// What the watchers have seen: per watcher, the last change; per change, how many saw it.
struct Seen {
    last: Vec<AtomicU32>,
    listed: AtomicUsize,
    saw: Vec<AtomicUsize>,
}

impl Seen {
    fn record(&self, watcher: usize, object: &DynamicObject) {
        let Some(change) = object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CHANGE))
            .and_then(|c| c.parse::<u32>().ok())
        else {
            return;
        };
        // Each change is counted once per watcher, however often it is delivered again.
        let before = self.last[watcher].fetch_max(change, Ordering::Relaxed);
        for seen in (before + 1)..=change {
            if let Some(counter) = self.saw.get(seen as usize) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One agent's watch: its own client (and so its own connection), the agent's selector.
async fn watch(
    config: kube::Config,
    resource: ApiResource,
    index: usize,
    seen: Arc<Seen>,
) -> anyhow::Result<()> {
    let client = kube::Client::try_from(config)?;
    let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(client, NAMESPACE, &resource);
    let selector = format!("kubernetes.io/service-name={SERVICE}");
    let mut events = watcher::watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitApply(object) | watcher::Event::Apply(object)) => {
                seen.record(index, &object);
            }
            Ok(watcher::Event::InitDone) => {
                seen.listed.fetch_add(1, Ordering::Relaxed);
            }
            // A failed watch is retried by the watcher, after its backoff.
            Ok(_) | Err(_) => {}
        }
    }
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let watchers = cli.watchers as usize;
    progress("starting etcd and kube-apiserver");
    let plane = ControlPlane::start(Options::default()).await?;
    let pid = plane
        .pid("kube-apiserver")
        .context("kube-apiserver is not running")?;
    let admin = plane.client().await?;
    let resource = endpoint_slices(&admin).await?;
    let services: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(admin.clone(), NAMESPACE);
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": SERVICE },
                "spec": { "ports": [{ "name": "agents", "port": 8091 }] },
            }))?,
        )
        .await?;
    let slices: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(admin.clone(), NAMESPACE, &resource);
    slices
        .create(&PostParams::default(), &slice(&resource, 0)?)
        .await?;

    progress(&format!(
        "kube-apiserver with no watch, for {}",
        humantime::format_duration(cli.idle_for)
    ));
    let idle_before = idle_share(pid, cli.idle_for).await?;
    let (_, rss_before) = sample(pid)?;

    progress(&format!("opening {watchers} watches"));
    let kubeconfig = kube::config::Kubeconfig::read_from(&plane.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let seen = Arc::new(Seen {
        last: (0..watchers).map(|_| AtomicU32::new(0)).collect(),
        listed: AtomicUsize::new(0),
        saw: (0..=cli.changes).map(|_| AtomicUsize::new(0)).collect(),
    });
    let (cpu_opening, _) = sample(pid)?;
    let opened = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..watchers {
        // At most `opening` watches are being listed at once, as agents starting over minutes
        // would be; a burst of thousands at once only measures kube-apiserver's queueing.
        let in_flight = index - seen.listed.load(Ordering::Relaxed).min(index);
        if in_flight >= cli.opening as usize {
            let target = index + 1 - cli.opening as usize;
            let seen = Arc::clone(&seen);
            wait::until("watches to list", STEP, move || {
                seen.listed.load(Ordering::Relaxed) >= target
            })
            .await?;
        }
        tasks.spawn(watch(
            config.clone(),
            resource.clone(),
            index,
            Arc::clone(&seen),
        ));
    }
    {
        let seen = Arc::clone(&seen);
        wait::until("every watch to list", STEP, move || {
            seen.listed.load(Ordering::Relaxed) >= watchers
        })
        .await?;
    }
    let open_time = opened.elapsed();
    let (cpu_opened, _) = sample(pid)?;
    progress(&format!(
        "{watchers} watches open; kube-apiserver with them, for {}",
        humantime::format_duration(cli.idle_for)
    ));
    let idle_with = idle_share(pid, cli.idle_for).await?;
    let (_, rss_with) = sample(pid)?;

    progress(&format!("{} changes of the EndpointSlice", cli.changes));
    let (cpu_changing, _) = sample(pid)?;
    let changing = Instant::now();
    let mut delivery = Vec::with_capacity(cli.changes as usize);
    for change in 1..=cli.changes {
        let patch =
            serde_json::json!({ "metadata": { "annotations": { CHANGE: change.to_string() } } });
        let at = Instant::now();
        slices
            .patch(
                &format!("{SERVICE}-watch-load"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let seen = Arc::clone(&seen);
        wait::until(
            &format!("change {change} at every watcher"),
            STEP,
            move || seen.saw[change as usize].load(Ordering::Relaxed) >= watchers,
        )
        .await?;
        delivery.push(at.elapsed());
    }
    let changes_time = changing.elapsed();
    let (cpu_changed, _) = sample(pid)?;
    tasks.abort_all();

    // CPU of the changes, less what kube-apiserver spends idle with every watch open.
    let change_cpu =
        (cpu_changed - cpu_changing).as_secs_f64() - idle_with * changes_time.as_secs_f64();
    let per_change = change_cpu.max(0.0) / f64::from(cli.changes);
    let open_cpu = (cpu_opened - cpu_opening).as_secs_f64() - idle_before * open_time.as_secs_f64();
    delivery.sort();
    let at = |q: f64| {
        let index = ((delivery.len() as f64 - 1.0) * q).round() as usize;
        delivery[index].as_secs_f64() * 1e3
    };
    let watches = watchers as f64;
    let rows = [
        ("kube-apiserver RSS, no watch".to_owned(), mib(rss_before)),
        (
            format!("kube-apiserver RSS, {watchers} watches"),
            format!(
                "{}: {:.1} KiB per watch",
                mib(rss_with),
                rss_with.saturating_sub(rss_before) as f64 / watches
            ),
        ),
        (
            format!("{watchers} watches opened in"),
            format!(
                "{:.1} s, {:.2} ms of kube-apiserver CPU each (TLS handshake, list, watch)",
                open_time.as_secs_f64(),
                open_cpu.max(0.0) / watches * 1e3
            ),
        ),
        (
            "kube-apiserver CPU, idle".to_owned(),
            format!(
                "{:.1} % of a core with no watch, {:.1} % with {watchers}",
                idle_before * 100.0,
                idle_with * 100.0
            ),
        ),
        (
            format!("kube-apiserver CPU per EndpointSlice change, {watchers} watches"),
            format!(
                "{:.1} ms: {:.1} µs per watcher told",
                per_change * 1e3,
                per_change / watches * 1e6
            ),
        ),
        (
            "change seen by every watcher after".to_owned(),
            format!(
                "p50 {:.0} ms, max {:.0} ms ({} changes)",
                at(0.5),
                at(1.0),
                cli.changes
            ),
        ),
    ];
    println!();
    for (label, figure) in &rows {
        println!("{label:<62} {figure}");
    }
    progress("stopping");
    drop(plane);
    Ok(())
}
