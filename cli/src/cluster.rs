//! What the plugin reads from the Kubernetes API, as the kubeconfig's user: links, their pods,
//! workloads, Nodes and Secrets, and the servers' and agents' debug views through the API
//! server's pod proxy (`/api/v1/namespaces/NS/pods/POD:PORT/proxy/...`), so that RBAC on
//! `pods/proxy` decides who reads them and nothing new is exposed.

use std::time::Duration;

use cplink_operator::crd::ControlPlaneLink;
use http_body_util::BodyExt as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use crate::args::Args;

/// The admin port of server pods unless their spec names one (`admin`).
pub const SERVER_ADMIN_PORT: u16 = 8095;
/// The admin port of agent pods unless their spec names one (`admin`).
pub const AGENT_ADMIN_PORT: u16 = 8096;

/// Why something could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The kubeconfig cannot be read or used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The API server refused or failed the request.
    #[error("{0}")]
    Api(String),
    /// The user may not do it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A debug view answered an error of its own.
    #[error("{0}")]
    View(String),
    /// No answer in time.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The answer is not what was expected.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl From<kube::Error> for ReadError {
    fn from(err: kube::Error) -> Self {
        match err {
            kube::Error::Api(status) if status.code == 403 => {
                ReadError::Forbidden(status.message.clone())
            }
            kube::Error::Api(status) => ReadError::Api(status.message.clone()),
            other => ReadError::Api(other.to_string()),
        }
    }
}

/// The API server, as the kubeconfig's user, and the namespace to look in.
pub struct Cluster {
    client: Client,
    /// The links' namespace.
    pub namespace: String,
    timeout: Duration,
}

/// The body of an error a debug view answers.
#[derive(serde::Deserialize)]
struct ViewErrorBody {
    error: String,
}

/// The body of an error the API server answers (a `Status`).
#[derive(serde::Deserialize)]
struct StatusBody {
    message: String,
}

impl Cluster {
    /// Connects as `--kubeconfig`, `--context`, `--cluster` and `--user` say; the namespace is
    /// `--namespace`, else the context's.
    pub async fn connect(args: &Args) -> Result<Self, ReadError> {
        let kubeconfig = match &args.kubeconfig {
            Some(path) => Kubeconfig::read_from(path),
            None => Kubeconfig::read(),
        }
        .map_err(|e| ReadError::Kubeconfig(e.to_string()))?;
        let options = KubeConfigOptions {
            context: args.context.clone(),
            cluster: args.cluster.clone(),
            user: args.user.clone(),
        };
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| ReadError::Kubeconfig(e.to_string()))?;
        config.read_timeout = Some(args.request_timeout);
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| ReadError::Kubeconfig(e.to_string()))?;
        Ok(Cluster {
            client,
            namespace,
            timeout: args.request_timeout,
        })
    }

    async fn timed<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, ReadError>>,
    ) -> Result<T, ReadError> {
        tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or(Err(ReadError::Timeout(self.timeout)))
    }

    /// The links of the namespace, by name, or the one named.
    pub async fn links(&self, name: Option<&str>) -> Result<Vec<ControlPlaneLink>, ReadError> {
        let api: Api<ControlPlaneLink> = Api::namespaced(self.client.clone(), &self.namespace);
        match name {
            Some(name) => match self.timed(async { Ok(api.get_opt(name).await?) }).await? {
                Some(link) => Ok(vec![link]),
                None => Err(ReadError::Api(format!(
                    "controlplanelink {name:?} not found in namespace {}",
                    self.namespace
                ))),
            },
            None => {
                let mut links = self
                    .timed(async { Ok(api.list(&ListParams::default()).await?.items) })
                    .await?;
                links.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                Ok(links)
            }
        }
    }

    /// The one link `name` names, or the namespace's only link.
    pub async fn link(&self, name: Option<&str>) -> Result<ControlPlaneLink, ReadError> {
        let mut links = self.links(name).await?;
        match links.len() {
            0 => Err(ReadError::Api(format!(
                "no ControlPlaneLink in namespace {} (-n selects another)",
                self.namespace
            ))),
            1 => Ok(links.remove(0)),
            _ => Err(ReadError::Api(format!(
                "namespace {} has {} links ({}): name one with --link",
                self.namespace,
                links.len(),
                links
                    .iter()
                    .filter_map(|l| l.metadata.name.as_deref())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The pods of a link's `component` (`server` or `agent`), by name.
    pub async fn pods(&self, link: &str, component: &str) -> Result<Vec<Pod>, ReadError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!(
            "app.kubernetes.io/name=cplink,app.kubernetes.io/instance={link},\
             app.kubernetes.io/component={component}"
        );
        let mut pods = self
            .timed(async {
                Ok(api
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items)
            })
            .await?;
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(pods)
    }

    /// A Deployment of the namespace, if it exists.
    pub async fn deployment(&self, name: &str) -> Result<Option<Deployment>, ReadError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        self.timed(async { Ok(api.get_opt(name).await?) }).await
    }

    /// A DaemonSet of the namespace, if it exists.
    pub async fn daemonset(&self, name: &str) -> Result<Option<DaemonSet>, ReadError> {
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.namespace);
        self.timed(async { Ok(api.get_opt(name).await?) }).await
    }

    /// Every Node.
    pub async fn nodes(&self) -> Result<Vec<Node>, ReadError> {
        let api: Api<Node> = Api::all(self.client.clone());
        self.timed(async { Ok(api.list(&ListParams::default()).await?.items) })
            .await
    }

    /// A Node, if it exists.
    pub async fn node(&self, name: &str) -> Result<Option<Node>, ReadError> {
        let api: Api<Node> = Api::all(self.client.clone());
        self.timed(async { Ok(api.get_opt(name).await?) }).await
    }

    /// A Secret of the namespace, if it exists.
    pub async fn secret(&self, name: &str) -> Result<Option<Secret>, ReadError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        self.timed(async { Ok(api.get_opt(name).await?) }).await
    }

    /// `GET path?query` on `pod`'s admin port through the pod proxy: the status and body.
    pub async fn proxy_get(
        &self,
        pod: &Pod,
        default_port: u16,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(http::StatusCode, bytes::Bytes), ReadError> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let port = admin_port(pod).unwrap_or(default_port);
        let mut path_and_query = path.to_owned();
        if !query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(
                &form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(query)
                    .finish(),
            );
        }
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{name}:{port}/proxy{path_and_query}",
            self.namespace
        );
        let request = http::Request::get(uri)
            .body(kube::client::Body::empty())
            .map_err(|e| ReadError::Api(e.to_string()))?;
        self.timed(async {
            let response = self.client.send(request).await?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ReadError::Api(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        })
        .await
    }

    /// A debug view of `pod`, decoded.
    pub async fn view<T: DeserializeOwned>(
        &self,
        pod: &Pod,
        default_port: u16,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ReadError> {
        let (status, body) = self.proxy_get(pod, default_port, path, query).await?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| ReadError::Decode(e.to_string()));
        }
        Err(answer_error(status, &body))
    }
}

/// What an error answer says: a debug view's `error`, the API server's `Status` message, or
/// the text itself.
pub fn answer_error(status: http::StatusCode, body: &[u8]) -> ReadError {
    if let Ok(view) = serde_json::from_slice::<ViewErrorBody>(body) {
        return ReadError::View(view.error);
    }
    let message = match serde_json::from_slice::<StatusBody>(body) {
        Ok(status) => status.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    if status == http::StatusCode::FORBIDDEN {
        ReadError::Forbidden(message)
    } else {
        ReadError::Api(format!("{status}: {message}"))
    }
}

/// The port the pod's containers name `admin`.
pub fn admin_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("admin"))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_the_view_or_the_api_server_said() {
        let view = answer_error(
            http::StatusCode::BAD_REQUEST,
            br#"{"error":"query parameter \"limit\": must be at least 1"}"#,
        );
        assert_eq!(
            view.to_string(),
            "query parameter \"limit\": must be at least 1"
        );
        let forbidden = answer_error(
            http::StatusCode::FORBIDDEN,
            br#"{"kind":"Status","message":"pods \"s\" is forbidden: User \"bob\" cannot get resource \"pods/proxy\""}"#,
        );
        assert!(matches!(forbidden, ReadError::Forbidden(_)), "{forbidden}");
        assert!(forbidden.to_string().contains("pods/proxy"));
        let raw = answer_error(http::StatusCode::BAD_GATEWAY, b"dial tcp: refused\n");
        assert_eq!(raw.to_string(), "502 Bad Gateway: dial tcp: refused");
    }
}
