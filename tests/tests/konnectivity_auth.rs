//! Upstream konnectivity agents that authenticate with a service-account token instead of a
//! client certificate, reviewed by a real kube-apiserver (TokenReview), as konnectivity-server's
//! `--agent-namespace`, `--agent-service-account` and `--authentication-audience` do.

use cplink_e2e::cluster::{ControlPlane, Options};
use cplink_e2e::fixture::Loopback;
use cplink_e2e::grpc::{self, ScriptedAgent};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;

const AUDIENCE: &str = "system:konnectivity-server";

async fn token(plane: &ControlPlane, account: &str) -> anyhow::Result<String> {
    let accounts: kube::Api<ServiceAccount> =
        kube::Api::namespaced(plane.client().await?, "kube-system");
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(account.to_owned());
    accounts.create(&PostParams::default(), &sa).await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![AUDIENCE.to_owned()],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let issued: TokenRequest = accounts
        .create_subresource("token", account, &PostParams::default(), &request)
        .await?;
    Ok(issued.status.map(|s| s.token).unwrap_or_default())
}

fn refusal(result: anyhow::Result<ScriptedAgent>) -> tonic::Status {
    match result {
        Ok(_) => panic!("the server linked an agent it must refuse"),
        Err(err) => err
            .downcast::<tonic::Status>()
            .unwrap_or_else(|e| panic!("not a gRPC refusal: {e:#}")),
    }
}

#[tokio::test]
async fn agents_without_a_certificate_link_with_their_service_account_token() -> anyhow::Result<()>
{
    let plane = ControlPlane::start(Options::default()).await?;
    let good = token(&plane, "konnectivity-agent").await?;
    let other = token(&plane, "someone-else").await?;

    let lo = Loopback::new()?;
    let kubeconfig = plane.kubeconfig.display().to_string();
    let server = lo
        .start_server(&[
            "--agent-namespace",
            "kube-system",
            "--agent-service-account",
            "konnectivity-agent",
            "--authentication-audience",
            AUDIENCE,
            "--kubeconfig",
            &kubeconfig,
        ])
        .await?;
    let anonymous = grpc::agent_h2_tls_without_certificate(lo.pki.ca_file())?;
    let link = |token: Option<&str>| {
        let tls = anonymous.clone();
        let token = token.map(str::to_owned);
        async move {
            ScriptedAgent::link_with_token(
                server.agent_addr,
                tls,
                "node-1",
                "host=node-1",
                token.as_deref(),
            )
            .await
        }
    };

    let status = refusal(link(None).await);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    let status = refusal(link(Some("not-a-token")).await);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    let status = refusal(link(Some(&other)).await);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    assert!(
        status
            .message()
            .contains("system:serviceaccount:kube-system:someone-else"),
        "{status}"
    );
    assert_eq!(server.handle.linked_agents(), 0);

    let agent = link(Some(&good)).await?;
    assert_eq!(agent.server_id, "server-0");
    server.wait_for_agents(1).await?;

    let metrics = server.handle.metrics_text();
    assert!(
        metrics.contains("cplink_server_link_errors_total{reason=\"unauthenticated\"} 3"),
        "{metrics}"
    );

    // Native agents still need their certificate: tokens are for konnectivity agents.
    let mut native = (*anonymous).clone();
    native.alpn_protocols = vec![cplink_proto::ALPN_LINK.to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.agent_addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(native))
        .connect(name, tcp)
        .await?;
    let mut rest = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut rest).await;
    assert!(
        read.is_err() || rest.is_empty(),
        "the server closes the link: {read:?}"
    );
    let handle = server.handle.clone();
    cplink_e2e::wait::until(
        "the refusal counted",
        std::time::Duration::from_secs(10),
        || {
            handle
                .metrics_text()
                .contains("cplink_server_link_errors_total{reason=\"no_certificate\"} 1")
        },
    )
    .await?;
    assert_eq!(server.handle.linked_agents(), 1);
    Ok(())
}
