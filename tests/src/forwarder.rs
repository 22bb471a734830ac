//! A TCP forwarder to the ready endpoints of Services: the role a cloud load balancer plays
//! for a `LoadBalancer` Service, on a loopback port, since nothing here runs kube-proxy.
//!
//! Endpoints come from the Services' EndpointSlices (`discovery.k8s.io/v1beta1`, as
//! Kubernetes 1.20 serves them), watched as they change. Connections are spread round-robin
//! over the ready endpoints. Like cloud load balancers, it fails open: while no endpoint is
//! ready, every endpoint takes connections (so a client meets the backend's own answer, not
//! a closed connection). A connection that finds no endpoint at all is closed at once.
//!
//! It follows readiness as the watch reports it (no polling): a server marked not ready in its
//! Service's slices, or removed from them as it starts terminating, takes no new connection
//! from then on. While the watch lists the slices again (after kube-apiserver restarted), the
//! endpoints known before keep taking connections.
//! Connections already forwarded stay piped until either end closes; a backend that closes or
//! resets its side closes the client's too, so a client never waits on a dead backend.
//! Tests read [`Forwarder::history`] and [`Forwarder::connections`] to check both.
//!
//! The endpoints are pods of real nodes, out of the host's reach: it connects to them from the
//! nodes' network (the edge namespace, [`crate::node::Network::edge`]), as a load balancer in
//! that network would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::netns::Netns;

/// An endpoint and whether it is ready.
type Endpoint = (SocketAddr, bool);

/// Where one Service's traffic goes.
#[derive(Default)]
struct Backends {
    /// Endpoints by EndpointSlice name.
    by_slice: HashMap<String, Vec<Endpoint>>,
    /// The slices of a list in progress (the watch's start, or its restart after the API
    /// server went away), taking over from [`Backends::by_slice`] once complete: until then
    /// the endpoints known before keep taking connections, as a load balancer keeps its
    /// backends while its control plane is away.
    relisting: Option<HashMap<String, Vec<Endpoint>>>,
    next: usize,
    /// Every change of [`Backends::all`], with when the watch reported it.
    history: Vec<(Instant, Vec<SocketAddr>)>,
    /// Every forwarded connection: when, and to which endpoint.
    opened: Vec<(Instant, SocketAddr)>,
}

impl Backends {
    /// The ready endpoints, or every endpoint while none is ready.
    fn all(&self) -> Vec<SocketAddr> {
        let endpoints = || self.by_slice.values().flatten();
        let any_ready = endpoints().any(|(_, ready)| *ready);
        let mut all: Vec<SocketAddr> = endpoints()
            .filter(|(_, ready)| *ready || !any_ready)
            .map(|(address, _)| *address)
            .collect();
        all.sort_unstable();
        all
    }

    /// Follows one event of the watch of the Service's slices.
    fn follow(&mut self, event: watcher::Event<DynamicObject>) {
        let name = |slice: &DynamicObject| slice.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => self.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(slice) => {
                self.relisting
                    .get_or_insert_with(HashMap::new)
                    .insert(name(&slice), endpoints(&slice.data));
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    self.by_slice = listed;
                }
            }
            watcher::Event::Apply(slice) => {
                self.by_slice.insert(name(&slice), endpoints(&slice.data));
            }
            watcher::Event::Delete(slice) => {
                self.by_slice.remove(&name(&slice));
            }
        }
        self.note_change();
    }

    /// Records the endpoints taking connections if they changed.
    fn note_change(&mut self) {
        let now = self.all();
        if self.history.last().is_none_or(|(_, last)| *last != now) {
            self.history.push((Instant::now(), now));
        }
    }

    /// The endpoints in the order to try them, starting at the next in turn.
    fn rotation(&mut self) -> Vec<SocketAddr> {
        let mut all = self.all();
        if !all.is_empty() {
            let len = all.len();
            all.rotate_left(self.next % len);
            self.next = self.next.wrapping_add(1);
        }
        all
    }
}

/// Forwarders for Services of one namespace, each on its own `127.0.0.1` port; stopped when
/// dropped.
pub struct Forwarder {
    addresses: HashMap<String, SocketAddr>,
    backends: HashMap<String, Arc<Mutex<Backends>>>,
    shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Forwarder {
    /// Starts forwarding for `services` in `namespace`, watching their EndpointSlices with
    /// the credentials of `kubeconfig` and connecting to the endpoints from inside `edge`.
    /// Services may not exist yet.
    pub async fn start(
        kubeconfig: &Path,
        namespace: &str,
        services: &[&str],
        edge: Netns,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cplink-forwarder")
            .enable_all()
            .build()?;
        let shutdown = CancellationToken::new();
        let mut addresses = HashMap::new();
        let mut backends = HashMap::new();
        for service in services {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.set_nonblocking(true)?;
            addresses.insert((*service).to_owned(), listener.local_addr()?);
            let table = Arc::new(Mutex::new(Backends::default()));
            backends.insert((*service).to_owned(), Arc::clone(&table));
            let kubeconfig = kubeconfig.to_owned();
            let namespace = namespace.to_owned();
            let service = (*service).to_owned();
            let shutdown = shutdown.clone();
            let edge = edge.clone();
            runtime
                .spawn(async move {
                    let client = crate::cluster::client_for(&kubeconfig).await?;
                    let listener = TcpListener::from_std(listener)?;
                    tokio::spawn(watch_slices(
                        client,
                        namespace,
                        service,
                        Arc::clone(&table),
                        shutdown.clone(),
                    ));
                    tokio::spawn(accept(listener, table, edge, shutdown));
                    anyhow::Ok(())
                })
                .await
                .context("forwarder start panicked")??;
        }
        Ok(Forwarder {
            addresses,
            backends,
            shutdown,
            runtime: Some(runtime),
        })
    }

    /// The loopback address forwarding to `service`.
    pub fn address(&self, service: &str) -> SocketAddr {
        self.addresses[service]
    }

    /// The endpoints of `service` that take connections right now.
    pub fn backends(&self, service: &str) -> Vec<SocketAddr> {
        self.backends[service].lock().expect("backends").all()
    }

    /// Every change of the endpoints of `service` that take connections, with when the
    /// EndpointSlice watch reported it.
    pub fn history(&self, service: &str) -> Vec<(Instant, Vec<SocketAddr>)> {
        self.backends[service]
            .lock()
            .expect("backends")
            .history
            .clone()
    }

    /// When `endpoint` last stopped taking connections for `service`, if it did and has not
    /// taken them again since.
    pub fn dropped_at(&self, service: &str, endpoint: SocketAddr) -> Option<Instant> {
        let history = self.history(service);
        let mut dropped = None;
        let mut present = false;
        for (at, endpoints) in &history {
            let now_present = endpoints.contains(&endpoint);
            if present && !now_present {
                dropped = Some(*at);
            } else if now_present {
                dropped = None;
            }
            present = now_present;
        }
        dropped
    }

    /// Every connection forwarded for `service`: when it was opened, and to which endpoint.
    pub fn connections(&self, service: &str) -> Vec<(Instant, SocketAddr)> {
        self.backends[service]
            .lock()
            .expect("backends")
            .opened
            .clone()
    }
}

fn endpoint_slices() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
        "endpointslices",
    )
}

/// Keeps `table` equal to the endpoints of the Service's slices.
async fn watch_slices(
    client: kube::Client,
    namespace: String,
    service: String,
    table: Arc<Mutex<Backends>>,
    shutdown: CancellationToken,
) {
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &endpoint_slices());
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut events = watcher::watcher(api, config)
        .default_backoff()
        .take_until(shutdown.cancelled_owned())
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => table.lock().expect("backends").follow(event),
            Err(err) => tracing::debug!(%service, %err, "EndpointSlice watch failed"),
        }
    }
}

/// The `address:port` pairs of an EndpointSlice (its only port), with their readiness
/// (unknown counts as ready, as the API says).
fn endpoints(slice: &serde_json::Value) -> Vec<Endpoint> {
    let Some(port) = slice["ports"]
        .as_array()
        .and_then(|ports| ports.first())
        .and_then(|p| p["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| {
            let ready = e["conditions"]["ready"].as_bool().unwrap_or(true);
            let addresses = e["addresses"].as_array().cloned().unwrap_or_default();
            addresses.into_iter().map(move |a| (a, ready))
        })
        .filter_map(|(a, ready)| Some((SocketAddr::new(a.as_str()?.parse().ok()?, port), ready)))
        .collect()
}

/// The pause after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

async fn accept(
    listener: TcpListener,
    table: Arc<Mutex<Backends>>,
    edge: Netns,
    shutdown: CancellationToken,
) {
    loop {
        let (client, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "forwarder accept failed");
                    // Out of descriptors, most likely: a pause lets connections close instead
                    // of spinning on the same error.
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
            },
            () = shutdown.cancelled() => return,
        };
        let candidates = table.lock().expect("backends").rotation();
        let shutdown = shutdown.clone();
        let table = Arc::clone(&table);
        let edge = edge.clone();
        tokio::spawn(async move {
            for backend in candidates {
                let connect = tokio::time::timeout(Duration::from_secs(5), edge.connect(backend));
                if let Ok(Ok(upstream)) = connect.await {
                    table
                        .lock()
                        .expect("backends")
                        .opened
                        .push((Instant::now(), backend));
                    tokio::select! {
                        _ = pipe(client, upstream) => {}
                        () = shutdown.cancelled() => {}
                    }
                    return;
                }
            }
            tracing::debug!("no reachable endpoint; connection closed");
        });
    }
}

async fn pipe(mut client: TcpStream, mut upstream: TcpStream) -> std::io::Result<()> {
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ready_endpoints_are_used_and_all_of_them_while_none_is_ready() {
        let slice = json!({
            "ports": [{ "name": "agents", "port": 8091 }],
            "endpoints": [
                { "addresses": ["127.9.1.2"], "conditions": { "ready": true } },
                { "addresses": ["127.9.2.2"], "conditions": { "ready": false } },
                { "addresses": ["127.9.3.2"], "conditions": {} },
            ],
        });
        let mut backends = Backends::default();
        backends.by_slice.insert("a".into(), endpoints(&slice));
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            backends.all(),
            [addr("127.9.1.2:8091"), addr("127.9.3.2:8091")]
        );

        let unready = json!({
            "ports": [{ "port": 8090 }],
            "endpoints": [{ "addresses": ["127.9.4.2"], "conditions": { "ready": false } }],
        });
        backends.by_slice.clear();
        backends.by_slice.insert("b".into(), endpoints(&unready));
        assert_eq!(backends.all(), [addr("127.9.4.2:8090")]);
        assert!(endpoints(&json!({ "endpoints": [] })).is_empty());
    }

    #[test]
    fn changes_of_the_ready_endpoints_are_recorded_once_each() {
        let a: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:1".parse().unwrap();
        let mut backends = Backends::default();
        backends
            .by_slice
            .insert("one".into(), vec![(a, true), (b, true)]);
        backends.note_change();
        backends.note_change();
        backends
            .by_slice
            .insert("one".into(), vec![(a, true), (b, false)]);
        backends.note_change();
        let history: Vec<Vec<SocketAddr>> =
            backends.history.iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(history, [vec![a, b], vec![a]]);
    }

    #[test]
    fn the_endpoints_known_keep_taking_connections_while_the_watch_lists_again() {
        let slice = |name: &str, address: &str| {
            let mut slice = DynamicObject::new(name, &endpoint_slices());
            slice.data = json!({
                "ports": [{ "port": 8090 }],
                "endpoints": [{ "addresses": [address], "conditions": { "ready": true } }],
            });
            slice
        };
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut backends = Backends::default();
        backends.follow(watcher::Event::Init);
        backends.follow(watcher::Event::InitApply(slice("a", "127.9.1.2")));
        assert!(
            backends.all().is_empty(),
            "a first list takes over once complete"
        );
        backends.follow(watcher::Event::InitDone);
        assert_eq!(backends.all(), [addr("127.9.1.2:8090")]);

        // The API server restarted: the watch lists again, slowly.
        backends.follow(watcher::Event::Init);
        assert_eq!(backends.all(), [addr("127.9.1.2:8090")]);
        backends.follow(watcher::Event::InitApply(slice("b", "127.9.2.2")));
        assert_eq!(backends.all(), [addr("127.9.1.2:8090")]);
        // Slice a went away meanwhile: the new list replaces the old one whole.
        backends.follow(watcher::Event::InitDone);
        assert_eq!(backends.all(), [addr("127.9.2.2:8090")]);

        backends.follow(watcher::Event::Apply(slice("c", "127.9.3.2")));
        backends.follow(watcher::Event::Delete(slice("b", "127.9.2.2")));
        assert_eq!(backends.all(), [addr("127.9.3.2:8090")]);
    }

    /// A connection to a server that goes away: the client sees its end promptly, whether the
    /// server closes (drain over) or resets (killed).
    #[tokio::test]
    async fn a_backend_that_closes_or_resets_ends_the_client_connection_too() {
        for reset in [false, true] {
            let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let backend_address = backend.local_addr().unwrap();
            let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let front_address = front.local_addr().unwrap();
            tokio::spawn(async move {
                let (client, _) = front.accept().await.unwrap();
                let upstream = TcpStream::connect(backend_address).await.unwrap();
                let _ = pipe(client, upstream).await;
            });
            let mut client = TcpStream::connect(front_address).await.unwrap();
            let (server_side, _) = backend.accept().await.unwrap();
            if reset {
                server_side.set_zero_linger().unwrap();
            }
            drop(server_side);
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read(&mut client, &mut buf),
            )
            .await
            .expect("the client learns of the backend's end, it does not hang");
            assert!(
                matches!(read, Ok(0) | Err(_)),
                "reset={reset}: end of stream or an error, got {read:?}"
            );
        }
    }

    #[test]
    fn connections_rotate_over_every_slice() {
        let mut backends = Backends::default();
        let a: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:1".parse().unwrap();
        backends.by_slice.insert("one".into(), vec![(a, true)]);
        backends.by_slice.insert("two".into(), vec![(b, true)]);
        assert_eq!(backends.rotation(), [a, b]);
        assert_eq!(backends.rotation(), [b, a]);
        assert_eq!(backends.rotation(), [a, b]);
        assert!(Backends::default().rotation().is_empty());
    }
}
