//! Server Leases as konnectivity-server publishes them (its `--enable-lease-controller`), so
//! that upstream agents run with `--count-server-leases` (v0.31 and later) learn how many
//! servers there are and link to every one.
//!
//! One `coordination.k8s.io/v1` Lease per server, named `konnectivity-proxy-server-<id>`,
//! labelled (`k8s-app=konnectivity-server` by default), held by the server id, renewed well
//! within its duration (15 s of 30 s by default). Such an agent counts the Leases with the
//! label whose `renewTime` plus `leaseDurationSeconds` is still ahead. The Lease is written by
//! server-side apply, which creates it or takes it over, and deleted when the server shuts down,
//! so that agents stop counting it at once rather than when it expires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cplink_runtime::kubeapi::{ClientError, KubeApi};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ResultLabels};

/// What upstream agents prefix the server id with.
pub const NAME_PREFIX: &str = "konnectivity-proxy-server-";
/// The field manager of the server's Lease writes.
const FIELD_MANAGER: &str = "cplink.dev/server";
/// How long the deletion at shutdown may take.
const DELETE_BUDGET: Duration = Duration::from_secs(5);
/// First wait after a failed renewal; it doubles up to the renewal interval.
const RETRY_FIRST: Duration = Duration::from_millis(500);

/// The Lease a server publishes.
#[derive(Clone)]
pub struct LeaseConfig {
    /// The Kubernetes API.
    pub api: Arc<KubeApi>,
    /// Namespace of the Lease.
    pub namespace: String,
    /// `konnectivity-proxy-server-<server id>`.
    pub name: String,
    /// The server id.
    pub holder: String,
    /// Labels agents select the Leases by.
    pub labels: BTreeMap<String, String>,
    /// How long the Lease counts after a renewal.
    pub duration: Duration,
    /// How often it is renewed.
    pub renew_interval: Duration,
}

impl std::fmt::Debug for LeaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseConfig")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("duration", &self.duration)
            .field("renew_interval", &self.renew_interval)
            .finish_non_exhaustive()
    }
}

/// Why a Lease could not be written or deleted.
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Api(#[from] kube::Error),
}

/// Renews the Lease until `stop` is cancelled, then deletes it.
pub(crate) async fn run(config: LeaseConfig, metrics: &Metrics, stop: CancellationToken) {
    let acquired = Timestamp::now();
    let mut retry = RETRY_FIRST;
    tracing::info!(
        namespace = %config.namespace,
        name = %config.name,
        "publishing the server Lease"
    );
    loop {
        let wait = match renew(&config, acquired).await {
            Ok(()) => {
                count(metrics, "ok");
                retry = RETRY_FIRST;
                config.renew_interval
            }
            Err(err) => {
                count(metrics, "error");
                tracing::warn!(
                    %err,
                    namespace = %config.namespace,
                    name = %config.name,
                    "server Lease not renewed; retrying"
                );
                let wait = retry.min(config.renew_interval);
                retry = (retry * 2).min(config.renew_interval);
                wait
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    match tokio::time::timeout(DELETE_BUDGET, delete(&config)).await {
        Ok(Ok(())) => tracing::info!(name = %config.name, "server Lease deleted"),
        Ok(Err(err)) => {
            tracing::warn!(%err, name = %config.name, "server Lease not deleted; it expires");
        }
        Err(_) => tracing::warn!(
            name = %config.name,
            "server Lease deletion timed out; it expires"
        ),
    }
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .lease_renewals
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// The Lease as this server holds it, renewed now.
fn lease(config: &LeaseConfig, acquired: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(config.labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.holder.clone()),
            // At most i32::MAX seconds: checked with the flags.
            lease_duration_seconds: Some(
                i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    }
}

async fn renew(config: &LeaseConfig, acquired: Timestamp) -> Result<(), LeaseError> {
    let leases: Api<Lease> = Api::namespaced(config.api.client().await?, &config.namespace);
    leases
        .patch(
            &config.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(lease(config, acquired)),
        )
        .await?;
    Ok(())
}

async fn delete(config: &LeaseConfig) -> Result<(), LeaseError> {
    let leases: Api<Lease> = Api::namespaced(config.api.client().await?, &config.namespace);
    match leases.delete(&config.name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Parses `--lease-label`: `key=value` pairs separated by commas, as upstream's flag.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        if !valid_label_key(key) {
            return Err(format!("{key:?} is not a label key"));
        }
        if !valid_label_value(value) {
            return Err(format!("{value:?} is not a label value"));
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("{key:?} is given twice"));
        }
    }
    if labels.is_empty() {
        return Err("at least one key=value is needed: agents select the Leases by it".into());
    }
    Ok(labels)
}

/// A label name: at most 63 characters, alphanumerics with `-`, `_` and `.` inside.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => valid_subdomain(prefix) && valid_name(name),
        None => valid_name(key),
    }
}

fn valid_label_value(value: &str) -> bool {
    value.is_empty() || valid_name(value)
}

/// A DNS-1123 subdomain, what an object name such as a Lease's must be.
pub fn valid_subdomain(name: &str) -> bool {
    name.len() <= 253
        && !name.is_empty()
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 63
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
        && !name.bytes().any(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_as_upstreams_flag_and_bad_ones_are_refused() {
        assert_eq!(
            parse_labels("k8s-app=konnectivity-server").unwrap(),
            BTreeMap::from([("k8s-app".into(), "konnectivity-server".into())])
        );
        assert_eq!(
            parse_labels("a=1, example.com/b=two").unwrap().len(),
            2,
            "prefixed keys and spaces after commas"
        );
        for bad in [
            "",
            "novalue",
            "a=1,a=2",
            "-a=1",
            "a=b c",
            "Bad_Prefix.COM/x=1",
        ] {
            assert!(parse_labels(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lease_names_must_be_subdomains() {
        assert!(valid_subdomain(
            "konnectivity-proxy-server-cplink-server-7d9f-abcde"
        ));
        assert!(valid_subdomain("konnectivity-proxy-server-node.example"));
        for bad in [
            "konnectivity-proxy-server-Server0",
            "konnectivity-proxy-server-a_b",
            "konnectivity-proxy-server-",
            "",
        ] {
            assert!(!valid_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_lease_names_its_holder_duration_and_times() {
        let config = LeaseConfig {
            api: Arc::new(KubeApi::new(cplink_runtime::kubeapi::ApiSource::InCluster(
                Box::new(kube::Config::new(http::Uri::from_static(
                    "https://127.0.0.1:1",
                ))),
            ))),
            namespace: "kube-system".into(),
            name: "konnectivity-proxy-server-s1".into(),
            holder: "s1".into(),
            labels: BTreeMap::from([("k8s-app".into(), "konnectivity-server".into())]),
            duration: Duration::from_secs(30),
            renew_interval: Duration::from_secs(15),
        };
        let acquired = Timestamp::now();
        let lease = lease(&config, acquired);
        let value = serde_json::to_value(&lease).unwrap();
        assert_eq!(value["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(value["kind"], "Lease");
        assert_eq!(
            value["metadata"]["labels"]["k8s-app"],
            "konnectivity-server"
        );
        assert_eq!(value["spec"]["holderIdentity"], "s1");
        assert_eq!(value["spec"]["leaseDurationSeconds"], 30);
        let spec = lease.spec.unwrap();
        assert_eq!(spec.acquire_time, Some(MicroTime(acquired)));
        assert!(spec.renew_time.unwrap().0 >= acquired);
    }
}
