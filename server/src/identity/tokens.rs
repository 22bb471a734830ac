//! Service-account tokens, checked with TokenReview.
//!
//! Two kinds of agents send one: upstream konnectivity agents without a client certificate
//! (`authorization: Bearer <token>`, as konnectivity-server's `--agent-namespace`,
//! `--agent-service-account` and `--authentication-audience` accept them), and native agents
//! bound to their node (`--agent-identity token`), whose hello carries their pod's projected
//! token next to the link's client certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cplink_runtime::kubeapi::KubeApi;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use sha2::{Digest, Sha256};

/// How long a review's verdict is reused. Short: a revoked token (its pod deleted) stops
/// working within this time, and a relinking agent costs the API one review, not one per server
/// address it dials.
const VERDICT_TTL: Duration = Duration::from_secs(10);

/// Most verdicts kept. Each is a digest and a user name; a flood of distinct bad tokens evicts
/// others rather than growing the cache.
const MAX_VERDICTS: usize = 4096;

/// The key a token bound to a pod carries in its review's `extra`.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The pod's uid, next to its name.
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Who may link with a token, and how to ask the API.
pub struct TokenAuth {
    namespace: String,
    service_account: String,
    audience: Option<String>,
    api: Arc<KubeApi>,
    verdicts: Mutex<Verdicts>,
}

/// Recent review verdicts by token digest, with when each was made.
type Verdicts = HashMap<[u8; 32], (Instant, Result<Reviewed, AuthError>)>;

/// What a review established about an accepted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The pod the token is bound to, when it is a pod-bound (projected) token.
    pub pod: Option<PodClaim>,
}

/// The pod a bound token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaim {
    /// The pod's name, in the service account's namespace.
    pub name: String,
    /// The pod's uid: a pod deleted and made again under the same name is another pod.
    pub uid: String,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
            .finish_non_exhaustive()
    }
}

impl TokenAuth {
    /// Accepts tokens of `namespace/service_account`, reviewed for `audience` (the API
    /// server's default audiences when `None`).
    pub(crate) fn new(
        namespace: String,
        service_account: String,
        audience: Option<String>,
        api: Arc<KubeApi>,
    ) -> Self {
        TokenAuth {
            namespace,
            service_account,
            audience,
            api,
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// The user name a valid token must carry.
    pub fn expected_user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// The namespace of the accepted service account (and of the pods its tokens name).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Checks the `authorization` metadata value of an upstream agent.
    pub async fn check(&self, authorization: Option<&str>) -> Result<Reviewed, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        self.review(token).await
    }

    /// Reviews `token`, or reuses a verdict of the last [`VERDICT_TTL`]. Failures to reach the
    /// API are not kept: the next attempt asks again.
    pub async fn review(&self, token: &str) -> Result<Reviewed, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            return verdict;
        }
        let verdict = self.ask(token).await;
        if !matches!(verdict, Err(AuthError::Unavailable(_))) {
            self.remember(key, verdict.clone());
        }
        verdict
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Reviewed, AuthError>> {
        let verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        verdicts
            .get(key)
            .filter(|(at, _)| at.elapsed() < VERDICT_TTL)
            .map(|(_, verdict)| verdict.clone())
    }

    fn remember(&self, key: [u8; 32], verdict: Result<Reviewed, AuthError>) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.retain(|_, (at, _)| at.elapsed() < VERDICT_TTL);
        }
        if verdicts.len() >= MAX_VERDICTS {
            // Still full of fresh verdicts: forget one; it costs one more review at worst.
            if let Some(victim) = verdicts.keys().next().copied() {
                verdicts.remove(&victim);
            }
        }
        verdicts.insert(key, (Instant::now(), verdict));
    }

    async fn ask(&self, token: &str) -> Result<Reviewed, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: self.audience.clone().map(|a| vec![a]),
            },
            ..TokenReview::default()
        };
        let client = self
            .api
            .client()
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let api: kube::Api<TokenReview> = kube::Api::all(client);
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let expected = self.expected_user();
        if name != expected {
            return Err(AuthError::Rejected(format!(
                "token of {name:?}, expected {expected:?}"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| {
            extra
                .get(key)
                .and_then(|values| values.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let pod = match (single(POD_NAME_EXTRA), single(POD_UID_EXTRA)) {
            (Some(name), Some(uid)) => Some(PodClaim { name, uid }),
            _ => None,
        };
        Ok(Reviewed { pod })
    }
}
