//! The Kubernetes API client, made on first use: token reviews, and the Pods and Nodes that
//! back agents' identities.

use std::path::PathBuf;

use tokio::sync::OnceCell;

/// Where the Kubernetes API is.
#[derive(Clone)]
pub enum ApiSource {
    /// The pod's own service account and the in-cluster address.
    InCluster,
    /// A kubeconfig file, already read.
    Kubeconfig(PathBuf, Box<kube::config::Kubeconfig>),
}

impl std::fmt::Debug for ApiSource {
    // The kubeconfig holds credentials: only its path is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiSource::InCluster => f.write_str("InCluster"),
            ApiSource::Kubeconfig(path, _) => f.debug_tuple("Kubeconfig").field(path).finish(),
        }
    }
}

impl ApiSource {
    /// `--kubeconfig` read now, so that a wrong file fails the start; in-cluster without it.
    pub fn from_flag(kubeconfig: Option<&PathBuf>) -> Result<Self, String> {
        match kubeconfig {
            Some(path) => kube::config::Kubeconfig::read_from(path)
                .map(|k| ApiSource::Kubeconfig(path.clone(), Box::new(k)))
                .map_err(|e| format!("{}: {e}", path.display())),
            None => Ok(ApiSource::InCluster),
        }
    }
}

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the Kubernetes API: {0}")]
pub struct ClientError(String);

/// Where the API is and, once made, the client for it.
pub(crate) struct KubeApi {
    source: ApiSource,
    client: OnceCell<kube::Client>,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("source", &self.source)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

impl KubeApi {
    pub(crate) fn new(source: ApiSource) -> Self {
        KubeApi {
            source,
            client: OnceCell::new(),
        }
    }

    /// The client, made now if it was not yet.
    pub(crate) async fn client(&self) -> Result<kube::Client, ClientError> {
        self.client
            .get_or_try_init(|| async {
                let config = match &self.source {
                    ApiSource::InCluster => kube::Config::incluster()
                        .map_err(|e| ClientError(format!("in-cluster config: {e}")))?,
                    ApiSource::Kubeconfig(path, kubeconfig) => {
                        kube::Config::from_custom_kubeconfig(
                            (**kubeconfig).clone(),
                            &kube::config::KubeConfigOptions::default(),
                        )
                        .await
                        .map_err(|e| ClientError(format!("{}: {e}", path.display())))?
                    }
                };
                kube::Client::try_from(config).map_err(|e| ClientError(e.to_string()))
            })
            .await
            .cloned()
    }
}
