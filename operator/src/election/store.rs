//! Where the leader Lease is read and written: the API server, or a fake in tests.

use std::future::Future;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// Why reading or writing the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another replica created or changed the Lease since this one read it (HTTP 409).
    #[error("the Lease was written by another replica meanwhile")]
    Conflict,
    /// The request did not finish in time.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Any other failure of the API.
    #[error(transparent)]
    Api(kube::Error),
}

impl From<kube::Error> for StoreError {
    fn from(err: kube::Error) -> Self {
        match &err {
            kube::Error::Api(status) if status.code == 409 => StoreError::Conflict,
            _ => StoreError::Api(err),
        }
    }
}

/// One named Lease: read it, create it, replace it with optimistic concurrency.
pub trait LeaseStore: Send + Sync {
    /// The Lease, or `None` when it does not exist.
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;

    /// Creates the Lease with `spec`; [`StoreError::Conflict`] when it already exists.
    fn create(&self, spec: LeaseSpec) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Replaces the Lease with `lease`, whose `metadata.resourceVersion` is the one read:
    /// [`StoreError::Conflict`] when the Lease changed since.
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Lease, StoreError>> + Send;
}

/// The Lease `name` in the API server.
#[derive(Clone)]
pub struct KubeLease {
    api: Api<Lease>,
    name: String,
}

impl KubeLease {
    /// The Lease `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        KubeLease {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
        }
    }
}

impl LeaseStore for KubeLease {
    async fn get(&self) -> Result<Option<Lease>, StoreError> {
        Ok(self.api.get_opt(&self.name).await?)
    }

    async fn create(&self, spec: LeaseSpec) -> Result<Lease, StoreError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        Ok(self.api.create(&PostParams::default(), &lease).await?)
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, StoreError> {
        Ok(self
            .api
            .replace(&self.name, &PostParams::default(), lease)
            .await?)
    }
}
