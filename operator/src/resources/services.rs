//! The frontend Service (kube-apiserver → servers) and the agent Service (agents → servers).
//!
//! Service ports equal the container ports: a headless Service resolves to pod IPs, so agents
//! dial the pods directly on the Service's port.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Component, Plan};
use crate::crd::ServiceType;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// Name of the frontend port on the Service and the server container.
pub const FRONTEND_PORT_NAME: &str = "frontend";
/// Name of the agent port on the Service and the server container.
pub const AGENT_PORT_NAME: &str = "agents";

/// The Service kube-apiserver dials; ready servers only.
pub fn frontend_service(plan: &Plan) -> Service {
    let frontend = &plan.spec.server.frontend;
    Service {
        metadata: plan.meta(plan.names().frontend_service(), Component::Server),
        spec: Some(ServiceSpec {
            type_: Some(frontend.service_type.as_str().to_owned()),
            selector: Some(plan.selector(Component::Server)),
            ports: Some(vec![port(FRONTEND_PORT_NAME, frontend.port)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Service agents dial. As `ClusterIP` it is headless so its DNS name lists every server
/// (agents link to all of them); not-ready servers are published because a server becomes
/// ready only once agents have linked to it.
pub fn agent_service(plan: &Plan) -> Service {
    let endpoint = &plan.spec.server.agent_endpoint;
    let headless = endpoint.service_type == ServiceType::ClusterIP;
    Service {
        metadata: plan.meta(plan.names().agent_service(), Component::Server),
        spec: Some(ServiceSpec {
            type_: Some(endpoint.service_type.as_str().to_owned()),
            cluster_ip: headless.then(|| "None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(plan.selector(Component::Server)),
            ports: Some(vec![port(AGENT_PORT_NAME, endpoint.port)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::ControlPlaneLink;

    #[test]
    fn the_frontend_service_selects_servers_on_the_frontend_port() {
        let svc = frontend_service(&ControlPlaneLink::test().plan());
        assert_eq!(svc.metadata.name.as_deref(), Some("link-frontend"));
        assert_eq!(
            serde_json::to_value(svc.spec).expect("json"),
            json!({
                "type": "ClusterIP",
                "selector": {
                    "app.kubernetes.io/name": "cplink",
                    "app.kubernetes.io/instance": "link",
                    "app.kubernetes.io/component": "server"
                },
                "ports": [{"name": "frontend", "port": 8090, "targetPort": "frontend", "protocol": "TCP"}]
            })
        );
    }

    #[test]
    fn the_agent_service_is_headless_and_publishes_not_ready_servers() {
        let svc = agent_service(&ControlPlaneLink::test().plan());
        assert_eq!(svc.metadata.name.as_deref(), Some("link-agent-endpoint"));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports = spec.ports.expect("ports");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("agents"), 8091)
        );
    }

    #[test]
    fn service_types_and_ports_follow_the_spec() {
        let plan = ControlPlaneLink::test()
            .with_spec(|s| {
                s.server.frontend.service_type = ServiceType::LoadBalancer;
                s.server.frontend.port = 443;
                s.server.agent_endpoint.service_type = ServiceType::NodePort;
                s.server.agent_endpoint.port = 9091;
            })
            .plan();
        let frontend = frontend_service(&plan).spec.expect("spec");
        assert_eq!(frontend.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(frontend.ports.expect("ports")[0].port, 443);
        let agents = agent_service(&plan).spec.expect("spec");
        assert_eq!(agents.type_.as_deref(), Some("NodePort"));
        assert_eq!(
            agents.cluster_ip, None,
            "only a ClusterIP Service can be headless"
        );
        assert_eq!(agents.ports.expect("ports")[0].port, 9091);
    }
}
