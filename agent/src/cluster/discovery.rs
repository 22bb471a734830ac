//! Server discovery through the EndpointSlices of the servers' Service.
//!
//! The agent watches the slices labelled `kubernetes.io/service-name=<service>` and keeps one
//! link to every endpoint address they list, ready or not: a server becomes ready only once
//! agents linked to it, which is why its Service publishes not-ready addresses. Endpoints that
//! say they are terminating are left out: a draining server takes no new links. An endpoint
//! that leaves the slices is no longer dialed; its link stays until the server closes it (a
//! rolling update drains the old servers).
//!
//! The port is the slice's only port, else its port named [`PORT_NAME`] (the operator's name
//! for the agents' port). `discovery.k8s.io/v1` is used where the API serves it, else
//! `v1beta1` (Kubernetes 1.20): both carry the fields read here.
//!
//! The set of endpoints changes only on what the API says. While the API cannot be reached the
//! watch retries with backoff and the last set stays; a re-list replaces the set only once it
//! is complete.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt as _;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::{ServerDiscovery, ServerEndpoint};
use crate::pool::{Pool, Running};
use crate::slots::Wants;

/// Name of the servers' port for agents on the operator's Service.
pub const PORT_NAME: &str = "agents";

/// The API group of EndpointSlices.
const GROUP: &str = "discovery.k8s.io";

/// Why a slice yields no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SliceError {
    /// The slice is not an EndpointSlice as the API serves them.
    #[error("not an EndpointSlice: {0}")]
    Malformed(String),
    /// The slice's addresses are host names.
    #[error("address type {0:?} is not supported, only IPv4 and IPv6")]
    AddressType(String),
    /// No port to dial.
    #[error("no port: the slice lists none")]
    NoPort,
    /// Several ports, none named [`PORT_NAME`].
    #[error("several ports ({0}) and none named {PORT_NAME:?}")]
    AmbiguousPort(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Slice {
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    ports: Option<Vec<Port>>,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<Conditions>,
}

#[derive(Debug, Default, Deserialize)]
struct Conditions {
    terminating: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Port {
    name: Option<String>,
    port: Option<i32>,
}

/// The port of a slice to dial.
fn port(ports: &[Port]) -> Result<u16, SliceError> {
    let number = |port: &Port| {
        port.port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or(SliceError::NoPort)
    };
    match ports {
        [] => Err(SliceError::NoPort),
        [only] => number(only),
        several => match several
            .iter()
            .find(|p| p.name.as_deref() == Some(PORT_NAME))
        {
            Some(named) => number(named),
            None => Err(SliceError::AmbiguousPort(
                several
                    .iter()
                    .map(|p| match (&p.name, p.port) {
                        (Some(name), Some(port)) => format!("{name}={port}"),
                        (None, Some(port)) => port.to_string(),
                        (name, None) => name.clone().unwrap_or_default(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            )),
        },
    }
}

/// The `ip:port` addresses to link to that a slice (its fields other than metadata) lists:
/// every endpoint not terminating, ready or not.
pub(crate) fn slice_addresses(data: &serde_json::Value) -> Result<Vec<SocketAddr>, SliceError> {
    let slice = Slice::deserialize(data).map_err(|e| SliceError::Malformed(e.to_string()))?;
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        other => return Err(SliceError::AddressType(other.to_owned())),
    };
    let endpoints = slice.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        // A slice without endpoints may also list no port: it is simply empty.
        return Ok(Vec::new());
    }
    let port = port(slice.ports.as_deref().unwrap_or_default())?;
    let mut addresses = Vec::new();
    for endpoint in endpoints {
        let conditions = endpoint.conditions.unwrap_or_default();
        if conditions.terminating == Some(true) {
            continue;
        }
        // An endpoint's addresses are fungible (the API says consumers may use the first
        // only): they all reach the same server, which takes one link from this agent.
        let Some(address) = endpoint.addresses.first() else {
            continue;
        };
        match address.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == ipv6 => addresses.push(SocketAddr::new(ip, port)),
            _ => tracing::debug!(address, "ignoring an address of the wrong type"),
        }
    }
    Ok(addresses)
}

/// The endpoints of every slice, and whether they were listed completely.
#[derive(Debug, Default)]
pub(crate) struct Slices {
    by_slice: BTreeMap<String, Vec<SocketAddr>>,
    /// The slices of a re-list in progress; they replace `by_slice` once complete.
    relisting: Option<BTreeMap<String, Vec<SocketAddr>>>,
    listed: bool,
}

impl Slices {
    /// Applies a watch event; the addresses to link to when they may have changed, `None`
    /// while the first complete list is not in.
    pub(crate) fn apply(
        &mut self,
        event: watcher::Event<DynamicObject>,
        service: &str,
    ) -> Option<BTreeSet<SocketAddr>> {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                return None;
            }
            watcher::Event::InitApply(slice) => {
                if let Some(relisting) = &mut self.relisting {
                    let (name, addresses) = read(&slice, service);
                    relisting.insert(name, addresses);
                }
                return None;
            }
            watcher::Event::InitDone => {
                if let Some(relisting) = self.relisting.take() {
                    self.by_slice = relisting;
                }
                self.listed = true;
            }
            watcher::Event::Apply(slice) => {
                let (name, addresses) = read(&slice, service);
                self.by_slice.insert(name, addresses);
            }
            watcher::Event::Delete(slice) => {
                self.by_slice
                    .remove(&slice.metadata.name.unwrap_or_default());
            }
        }
        self.addresses()
    }

    /// Every address listed, once the slices were listed completely.
    pub(crate) fn addresses(&self) -> Option<BTreeSet<SocketAddr>> {
        self.listed
            .then(|| self.by_slice.values().flatten().copied().collect())
    }
}

/// A slice's name and addresses; a slice that cannot be used is logged and counts as empty.
fn read(slice: &DynamicObject, service: &str) -> (String, Vec<SocketAddr>) {
    let name = slice.metadata.name.clone().unwrap_or_default();
    let addresses = slice_addresses(&slice.data).unwrap_or_else(|err| {
        tracing::warn!(service, slice = %name, %err, "ignoring an EndpointSlice");
        Vec::new()
    });
    (name, addresses)
}

/// The addresses being dialed, kept equal to the endpoints discovered.
struct Dialing {
    pool: Pool,
    discovery: ServerDiscovery,
    running: BTreeMap<SocketAddr, Running>,
}

impl Dialing {
    fn update(&mut self, wanted: &BTreeSet<SocketAddr>) {
        let service = self.discovery.qualified_name();
        let gone: Vec<SocketAddr> = self
            .running
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for address in gone {
            if let Some(running) = self.running.remove(&address) {
                tracing::info!(%service, %address, "server endpoint removed: no longer dialed");
                self.pool.stop(running);
            }
        }
        for address in wanted {
            if self.running.contains_key(address) {
                continue;
            }
            tracing::info!(%service, %address, "server endpoint added");
            let endpoint = ServerEndpoint {
                address: address.to_string(),
                server_name: self.discovery.server_name.clone(),
            };
            self.running
                .insert(*address, self.pool.start(endpoint, Wants::One));
        }
    }
}

/// How EndpointSlices are served: `discovery.k8s.io/v1` where available, else `v1beta1`.
async fn endpoint_slices(client: &kube::Client) -> Result<ApiResource, String> {
    let group = kube::discovery::group(client, GROUP)
        .await
        .map_err(|e| format!("API group {GROUP}: {e}"))?;
    group
        .recommended_kind("EndpointSlice")
        .map(|(resource, _)| resource)
        .ok_or_else(|| format!("API group {GROUP} serves no EndpointSlice"))
}

/// Watches the servers' EndpointSlices until shutdown, keeping one link task per endpoint.
pub(crate) async fn run(shared: std::sync::Arc<Shared>, pool: Pool, shutdown: CancellationToken) {
    let Some(discovery) = shared.config.discovery.clone() else {
        return;
    };
    let Some(api) = shared.kube.as_ref() else {
        return;
    };
    let service = discovery.qualified_name();
    let mut backoff = shared.config.backoff.start();
    // Finding the resource is retried like the watch: the API may not be reachable yet.
    let (client, resource) = loop {
        let found = match api.client().await {
            Ok(client) => endpoint_slices(&client)
                .await
                .map(|resource| (client, resource)),
            Err(err) => Err(err.to_string()),
        };
        match found {
            Ok(found) => break found,
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    %service,
                    %err,
                    delay = %humantime::format_duration(delay),
                    "cannot look up EndpointSlices; retrying after a pause"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(
        %service,
        api_version = %resource.api_version,
        "watching the servers' EndpointSlices"
    );
    let slices_api: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(client, &discovery.namespace, &resource);
    let selector = format!("kubernetes.io/service-name={}", discovery.service);
    let mut events = watcher::watcher(slices_api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut slices = Slices::default();
    let mut dialing = Dialing {
        pool,
        discovery,
        running: BTreeMap::new(),
    };
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                // The watcher retries forever; an end is not expected.
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        match event {
            Ok(event) => {
                if failing {
                    failing = false;
                    tracing::info!(%service, "EndpointSlice watch works again");
                }
                if let Some(wanted) = slices.apply(event, &service) {
                    dialing.update(&wanted);
                    shared.links.discovered();
                }
            }
            Err(err) => {
                failing = true;
                tracing::warn!(
                    %service,
                    %err,
                    endpoints = dialing.running.len(),
                    "EndpointSlice watch failed; keeping the endpoints known"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_endpoint_but_terminating_ones_is_linked_to() {
        let slice = json!({
            "addressType": "IPv4",
            "ports": [{ "name": "agents", "port": 8091, "protocol": "TCP" }],
            "endpoints": [
                { "addresses": ["10.0.0.1"], "conditions": { "ready": true } },
                { "addresses": ["10.0.0.2"], "conditions": { "ready": false } },
                { "addresses": ["10.0.0.3"] },
                { "addresses": ["10.0.0.4"],
                  "conditions": { "ready": false, "serving": true, "terminating": true } },
                { "addresses": ["10.0.0.5"], "conditions": { "terminating": false } },
            ],
        });
        assert_eq!(
            slice_addresses(&slice).unwrap(),
            [
                addr("10.0.0.1:8091"),
                addr("10.0.0.2:8091"),
                addr("10.0.0.3:8091"),
                addr("10.0.0.5:8091")
            ]
        );
    }

    #[test]
    fn ipv6_endpoints_are_dialed_in_brackets() {
        let slice = json!({
            "addressType": "IPv6",
            "ports": [{ "port": 8091 }],
            "endpoints": [{ "addresses": ["::1", "fd00::9"] }, { "addresses": ["fd00::5"] }],
        });
        let addresses: Vec<String> = slice_addresses(&slice)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["[::1]:8091", "[fd00::5]:8091"]);
    }

    #[test]
    fn the_port_is_the_only_one_or_the_one_named_agents() {
        let with_ports = |ports: serde_json::Value| {
            json!({
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": [{ "addresses": ["10.0.0.1"] }],
            })
        };
        let only = with_ports(json!([{ "name": "whatever", "port": 9000 }]));
        assert_eq!(slice_addresses(&only).unwrap(), [addr("10.0.0.1:9000")]);
        let named = with_ports(json!([
            { "name": "admin", "port": 8096 },
            { "name": "agents", "port": 8091 },
        ]));
        assert_eq!(slice_addresses(&named).unwrap(), [addr("10.0.0.1:8091")]);
        let ambiguous = with_ports(json!([
            { "name": "admin", "port": 8096 },
            { "name": "frontend", "port": 8090 },
        ]));
        let err = slice_addresses(&ambiguous).unwrap_err();
        assert_eq!(
            err,
            SliceError::AmbiguousPort("admin=8096,frontend=8090".into())
        );
        // A selector-less Service's mirrored slice may say "every port" with no number.
        let any = with_ports(json!([{ "name": "" }]));
        assert_eq!(slice_addresses(&any).unwrap_err(), SliceError::NoPort);
        assert_eq!(
            slice_addresses(&with_ports(json!([]))).unwrap_err(),
            SliceError::NoPort
        );
        assert_eq!(
            slice_addresses(&with_ports(serde_json::Value::Null)).unwrap_err(),
            SliceError::NoPort
        );
    }

    #[test]
    fn empty_and_host_name_slices() {
        let empty = json!({ "addressType": "IPv4", "endpoints": null, "ports": null });
        assert!(slice_addresses(&empty).unwrap().is_empty());
        let fqdn = json!({
            "addressType": "FQDN",
            "ports": [{ "port": 8091 }],
            "endpoints": [{ "addresses": ["server.example"] }],
        });
        assert_eq!(
            slice_addresses(&fqdn).unwrap_err(),
            SliceError::AddressType("FQDN".into())
        );
        let err = slice_addresses(&json!({ "endpoints": [] })).unwrap_err();
        assert!(matches!(err, SliceError::Malformed(_)), "{err}");
    }

    fn slice(name: &str, ips: &[&str]) -> DynamicObject {
        let mut object = DynamicObject::new(
            name,
            &ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                GROUP,
                "v1beta1",
                "EndpointSlice",
            )),
        );
        object.data = json!({
            "addressType": "IPv4",
            "ports": [{ "name": "agents", "port": 8091 }],
            "endpoints": ips.iter().map(|ip| json!({ "addresses": [ip] })).collect::<Vec<_>>(),
        });
        object
    }

    fn set(addresses: &[&str]) -> Option<BTreeSet<SocketAddr>> {
        Some(addresses.iter().map(|a| addr(a)).collect())
    }

    #[test]
    fn the_set_is_known_once_listed_and_replaced_only_by_a_complete_relist() {
        use watcher::Event;
        let mut slices = Slices::default();
        assert_eq!(slices.apply(Event::Init, "svc"), None);
        assert_eq!(
            slices.apply(Event::InitApply(slice("a", &["10.0.0.1"])), "svc"),
            None
        );
        assert_eq!(
            slices.apply(
                Event::InitApply(slice("b", &["10.0.0.2", "10.0.0.1"])),
                "svc"
            ),
            None
        );
        assert_eq!(
            slices.apply(Event::InitDone, "svc"),
            set(&["10.0.0.1:8091", "10.0.0.2:8091"])
        );
        assert_eq!(
            slices.apply(Event::Apply(slice("a", &["10.0.0.3"])), "svc"),
            set(&["10.0.0.1:8091", "10.0.0.2:8091", "10.0.0.3:8091"])
        );
        assert_eq!(
            slices.apply(Event::Delete(slice("b", &[])), "svc"),
            set(&["10.0.0.3:8091"])
        );

        // The watch broke and lists again: the set stays until the list is complete.
        assert_eq!(slices.apply(Event::Init, "svc"), None);
        assert_eq!(slices.addresses(), set(&["10.0.0.3:8091"]));
        assert_eq!(
            slices.apply(Event::InitApply(slice("c", &["10.0.0.4"])), "svc"),
            None
        );
        assert_eq!(slices.addresses(), set(&["10.0.0.3:8091"]));
        assert_eq!(
            slices.apply(Event::InitDone, "svc"),
            set(&["10.0.0.4:8091"])
        );

        let mut unusable = Slices::default();
        unusable.apply(Event::Init, "svc");
        let mut fqdn = slice("d", &[]);
        fqdn.data["addressType"] = json!("FQDN");
        unusable.apply(Event::InitApply(fqdn), "svc");
        assert_eq!(unusable.apply(Event::InitDone, "svc"), set(&[]));
    }
}
