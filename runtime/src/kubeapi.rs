//! The Kubernetes API client: where the API is, settled when the flags are checked, and one
//! client made on first use and shared by whatever needs it.

use std::path::{Path, PathBuf};

use tokio::sync::OnceCell;

use crate::config::ConfigError;

/// The flag naming a kubeconfig, in every binary that takes one.
const KUBECONFIG_FLAG: &str = "kubeconfig";

/// How a binary reaches the Kubernetes API.
#[derive(Clone)]
pub enum ApiSource {
    /// The pod's service account and the in-cluster address.
    InCluster(Box<kube::Config>),
    /// A kubeconfig file, already read.
    Kubeconfig(PathBuf, Box<kube::config::Kubeconfig>),
}

impl std::fmt::Debug for ApiSource {
    // Both hold credentials: only where they come from is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiSource::InCluster(_) => f.write_str("InCluster"),
            ApiSource::Kubeconfig(path, _) => f.debug_tuple("Kubeconfig").field(path).finish(),
        }
    }
}

impl ApiSource {
    /// The file `--kubeconfig` names, else the in-cluster configuration; either is read now so
    /// that a wrong one fails the start rather than every later request.
    pub fn from_flag(kubeconfig: Option<&Path>) -> Result<Self, ConfigError> {
        match kubeconfig {
            Some(path) => kube::config::Kubeconfig::read_from(path)
                .map(|kubeconfig| ApiSource::Kubeconfig(path.to_owned(), Box::new(kubeconfig)))
                .map_err(|e| ConfigError::new(KUBECONFIG_FLAG, format!("{}: {e}", path.display()))),
            None => kube::Config::incluster()
                .map(|config| ApiSource::InCluster(Box::new(config)))
                .map_err(|e| {
                    ConfigError::new(
                        KUBECONFIG_FLAG,
                        format!("not set, and no in-cluster configuration: {e}"),
                    )
                }),
        }
    }
}

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
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
pub struct KubeApi {
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
    /// The API at `source`; no client is made yet.
    pub fn new(source: ApiSource) -> Self {
        KubeApi {
            source,
            client: OnceCell::new(),
        }
    }

    /// The API behind a client made elsewhere (a mocked one in tests).
    pub fn with_client(client: kube::Client) -> Self {
        KubeApi {
            // Never read: the client is already made.
            source: ApiSource::InCluster(Box::new(kube::Config::new(http::Uri::from_static(
                "https://kubernetes.default.svc",
            )))),
            client: OnceCell::new_with(Some(client)),
        }
    }

    /// The client, made now if it was not yet.
    pub async fn client(&self) -> Result<kube::Client, ClientError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubeconfig holding a token (JSON is YAML too).
    fn kubeconfig(dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            r#"{"apiVersion": "v1", "kind": "Config", "current-context": "x",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "sekrit-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}"#,
        )
        .unwrap();
        path
    }

    #[tokio::test]
    async fn a_kubeconfig_is_read_at_once_and_its_client_made_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = kubeconfig(dir.path());
        let source = ApiSource::from_flag(Some(&path)).unwrap();
        assert!(matches!(&source, ApiSource::Kubeconfig(p, _) if *p == path));
        let api = KubeApi::new(source);
        let shown = format!("{api:?}");
        assert!(shown.contains("connected: false"), "{shown}");
        assert!(
            !shown.contains("sekrit"),
            "credentials are not printed: {shown}"
        );

        let client = api.client().await.unwrap();
        assert_eq!(client.default_namespace(), "default");
        assert!(format!("{api:?}").contains("connected: true"));
    }

    #[test]
    fn a_missing_kubeconfig_is_reported_against_the_flag() {
        let err = ApiSource::from_flag(Some(Path::new("/nonexistent/kubeconfig"))).unwrap_err();
        assert_eq!(err.flag, "kubeconfig");
        assert!(err.message.contains("/nonexistent/kubeconfig"), "{err}");
    }

    #[test]
    fn without_a_kubeconfig_the_pod_must_be_in_a_cluster() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return;
        }
        let err = ApiSource::from_flag(None).unwrap_err();
        assert_eq!(err.flag, "kubeconfig");
        assert!(err.message.contains("in-cluster"), "{err}");
    }
}
