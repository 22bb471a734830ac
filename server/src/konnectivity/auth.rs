//! Service-account token authentication of upstream konnectivity agents.
//!
//! Upstream agents set up for Konnectivity's token authentication present no client
//! certificate; they send `authorization: Bearer <token>` instead. The token is checked with a
//! TokenReview (for the configured audience) and must belong to the configured service account,
//! as konnectivity-server's `--agent-namespace`, `--agent-service-account` and
//! `--authentication-audience` do. Native agents always authenticate with a certificate.

use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use tokio::sync::OnceCell;

/// Where the Kubernetes API is, for token reviews.
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

/// Who may link with a token, and how to ask the API.
pub struct TokenAuth {
    namespace: String,
    service_account: String,
    audience: Option<String>,
    source: ApiSource,
    client: OnceCell<kube::Client>,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata (and no client certificate).
    #[error("a client certificate or an authorization: Bearer token is required")]
    Missing,
    /// The metadata is not `Bearer <token>`.
    #[error("authorization metadata must be \"Bearer <token>\"")]
    Malformed,
    /// The API server does not accept the token, or it is someone else's.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token could not be checked.
    #[error("token review failed: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The gRPC status for the agent.
    pub fn status(&self) -> tonic::Status {
        match self {
            AuthError::Unavailable(_) => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field("user", &self.expected_user())
            .field("audience", &self.audience)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl TokenAuth {
    /// Accepts tokens of `namespace/service_account`, reviewed for `audience` (the API
    /// server's default audiences when `None`).
    pub fn new(
        namespace: String,
        service_account: String,
        audience: Option<String>,
        source: ApiSource,
    ) -> Self {
        TokenAuth {
            namespace,
            service_account,
            audience,
            source,
            client: OnceCell::new(),
        }
    }

    /// The user name a valid token must carry.
    pub fn expected_user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    async fn client(&self) -> Result<&kube::Client, AuthError> {
        self.client
            .get_or_try_init(|| async {
                let config = match &self.source {
                    ApiSource::InCluster => kube::Config::incluster()
                        .map_err(|e| AuthError::Unavailable(format!("in-cluster config: {e}")))?,
                    ApiSource::Kubeconfig(path, kubeconfig) => {
                        kube::Config::from_custom_kubeconfig(
                            (**kubeconfig).clone(),
                            &kube::config::KubeConfigOptions::default(),
                        )
                        .await
                        .map_err(|e| AuthError::Unavailable(format!("{}: {e}", path.display())))?
                    }
                };
                kube::Client::try_from(config).map_err(|e| AuthError::Unavailable(e.to_string()))
            })
            .await
    }

    /// Checks the `authorization` metadata value of an agent.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: self.audience.clone().map(|a| vec![a]),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client().await?.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        let expected = self.expected_user();
        if user != expected {
            return Err(AuthError::Rejected(format!(
                "token of {user:?}, expected {expected:?}"
            )));
        }
        Ok(())
    }
}
