//! The Kubernetes API client, made on first use and shared by discovery and the Node lookup.

use tokio::sync::OnceCell;

use crate::config::ApiSource;

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The kubeconfig cannot be turned into a client configuration.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: String,
        /// What is wrong with it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The client cannot be built.
    #[error("cannot make a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Where the API is and, once made, the client for it.
pub(crate) struct KubeApi {
    source: ApiSource,
    client: OnceCell<kube::Client>,
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
                    ApiSource::InCluster(config) => (**config).clone(),
                    ApiSource::Kubeconfig(path, kubeconfig) => {
                        kube::Config::from_custom_kubeconfig(
                            (**kubeconfig).clone(),
                            &kube::config::KubeConfigOptions::default(),
                        )
                        .await
                        .map_err(|source| ClientError::Kubeconfig {
                            path: path.display().to_string(),
                            source,
                        })?
                    }
                };
                kube::Client::try_from(config).map_err(ClientError::Client)
            })
            .await
            .cloned()
    }

    /// A client for tests, in place of a configured source.
    #[cfg(test)]
    pub(crate) fn with_client(client: kube::Client) -> Self {
        KubeApi {
            source: ApiSource::InCluster(Box::new(kube::Config::new(
                "http://127.0.0.1:1".parse().expect("a valid URL"),
            ))),
            client: OnceCell::new_with(Some(client)),
        }
    }
}
