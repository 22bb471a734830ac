//! The konnectivity (apiserver-network-proxy) wire protocol: gRPC services and packets.
//!
//! Generated at build time from `protos/konnectivity.proto` by tonic and prost (protox parses
//! the file, so no system `protoc` is needed). The file declares no package, as upstream's do,
//! so the method paths are the bare `/ProxyService/Proxy` and `/AgentService/Connect` that
//! kube-apiserver and upstream agents call.
//!
//! Besides the generated code this module names the metadata keys of the agent handshake and
//! builds the packets both ends send, so that field use stays in one place.

#[allow(missing_docs, clippy::all, clippy::pedantic, rust_2018_idioms)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

pub mod mux;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::hello::Identifiers;

pub use generated::agent_service_client::AgentServiceClient;
pub use generated::agent_service_server::{AgentService, AgentServiceServer};
pub use generated::packet::Payload;
pub use generated::proxy_service_client::ProxyServiceClient;
pub use generated::proxy_service_server::{ProxyService, ProxyServiceServer};
pub use generated::{
    CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain, Packet,
    PacketType,
};

/// Request metadata: the agent's id (exactly one value).
pub const AGENT_ID: &str = "agentid";
/// Request metadata: the agent's identifiers as a URL query string
/// (`host=node1&ipv4=10.0.0.5&cidr=10.244.1.0/24&default-route=true`).
pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
/// Request metadata: `Bearer <service-account token>` when token authentication is used.
pub const AUTHORIZATION: &str = "authorization";
/// Response metadata: the server's id.
pub const SERVER_ID: &str = "serverid";
/// Response metadata: how many servers there are, in decimal.
pub const SERVER_COUNT: &str = "servercount";

/// The only protocol a dial request may name.
pub const PROTOCOL_TCP: &str = "tcp";

/// Error text of a close or data packet for a connection the receiver does not know, as
/// upstream words it.
pub const UNRECOGNIZED_CONNECT_ID: &str = "unrecognized connectID";

/// Encodes an agent's node name and identifiers as the `agentidentifiers` metadata value:
/// `host=<node name>`, `ipv4=`/`ipv6=` per host IP, `cidr=` per pod range, and
/// `default-route=true` when set.
pub fn encode_identifiers(node_name: Option<&str>, identifiers: &Identifiers) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(node) = node_name {
        query.append_pair("host", node);
    }
    for ip in &identifiers.host_ips {
        let key = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        query.append_pair(key, &ip.to_string());
    }
    for cidr in &identifiers.pod_cidrs {
        query.append_pair("cidr", &cidr.to_string());
    }
    if identifiers.default_route {
        query.append_pair("default-route", "true");
    }
    query.finish()
}

/// Decodes an `agentidentifiers` metadata value into the node name (the first `host` that is
/// not an address) and the routing identifiers. A `host` that is an address counts as a host IP;
/// unknown keys are ignored, as upstream does; a malformed address or range is an error naming it.
pub fn decode_identifiers(value: &str) -> Result<(Option<String>, Identifiers), String> {
    let mut node_name = None;
    let mut identifiers = Identifiers::default();
    for (key, value) in form_urlencoded::parse(value.as_bytes()) {
        let parse_ip = || {
            value
                .parse::<IpAddr>()
                .map_err(|e| format!("{key}={value}: {e}"))
        };
        match key.as_ref() {
            "host" => match value.parse::<IpAddr>() {
                Ok(ip) => identifiers.host_ips.push(ip),
                Err(_) if node_name.is_none() && !value.is_empty() => {
                    node_name = Some(value.into_owned());
                }
                Err(_) => {}
            },
            "ipv4" | "ipv6" => identifiers.host_ips.push(parse_ip()?),
            "cidr" => identifiers.pod_cidrs.push(
                value
                    .parse::<IpNet>()
                    .map_err(|e| format!("cidr={value}: {e}"))?,
            ),
            "default-route" => identifiers.default_route = value == "true",
            _ => {}
        }
    }
    Ok((node_name, identifiers))
}

impl Packet {
    /// A dial request for `address` (`host:port`), matched to its answer by `random`.
    pub fn dial_request(address: impl Into<String>, random: i64) -> Self {
        Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(DialRequest {
                protocol: PROTOCOL_TCP.to_owned(),
                address: address.into(),
                random,
            })),
        }
    }

    /// A successful dial answer naming the new connection.
    pub fn dial_established(random: i64, connect_id: i64) -> Self {
        Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(DialResponse {
                error: String::new(),
                connect_id,
                random,
            })),
        }
    }

    /// A failed dial answer.
    pub fn dial_failed(random: i64, error: impl Into<String>) -> Self {
        Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(DialResponse {
                error: error.into(),
                connect_id: 0,
                random,
            })),
        }
    }

    /// Bytes of connection `connect_id`.
    pub fn data(connect_id: i64, data: bytes::Bytes) -> Self {
        Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(Data {
                connect_id,
                error: String::new(),
                data: data.into(),
            })),
        }
    }

    /// Asks the peer to close connection `connect_id`.
    pub fn close_request(connect_id: i64) -> Self {
        Packet {
            r#type: PacketType::CloseReq as i32,
            payload: Some(Payload::CloseRequest(CloseRequest { connect_id })),
        }
    }

    /// Confirms (or, with an error, refuses) the close of connection `connect_id`.
    pub fn close_response(connect_id: i64, error: impl Into<String>) -> Self {
        Packet {
            r#type: PacketType::CloseRsp as i32,
            payload: Some(Payload::CloseResponse(CloseResponse {
                error: error.into(),
                connect_id,
            })),
        }
    }

    /// Cancels the pending dial `random`.
    pub fn close_dial(random: i64) -> Self {
        Packet {
            r#type: PacketType::DialCls as i32,
            payload: Some(Payload::CloseDial(CloseDial { random })),
        }
    }

    /// Announces that the sender is draining.
    pub fn drain() -> Self {
        Packet {
            r#type: PacketType::Drain as i32,
            payload: Some(Payload::Drain(Drain {})),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Wire checks against protobuf bytes built by hand from the field numbers in the
    //! konnectivity protocol, so that a renumbered field cannot pass unnoticed.
    use prost::Message;

    use super::*;

    /// A varint-typed field: key = (number << 3) | 0.
    fn varint(number: u8, value: u64) -> Vec<u8> {
        let mut out = vec![number << 3];
        let mut v = value;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// A length-delimited field: key = (number << 3) | 2.
    fn bytes_field(number: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, u8::try_from(value.len()).unwrap()];
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn a_dial_request_uses_type_1_and_payload_field_2() {
        let encoded = Packet::dial_request("node-1:10250", 300).encode_to_vec();
        let inner = [
            bytes_field(1, b"tcp"),
            bytes_field(2, b"node-1:10250"),
            varint(3, 300),
        ]
        .concat();
        // DIAL_REQ is 0, the proto3 default, so the type field is not on the wire.
        assert_eq!(encoded, bytes_field(2, &inner));
    }

    #[test]
    fn a_dial_response_carries_random_3_and_connect_id_2() {
        let wire = [
            varint(1, 1),
            bytes_field(3, &[varint(2, 7), varint(3, 42)].concat()),
        ]
        .concat();
        let packet = Packet::decode(wire.as_slice()).unwrap();
        assert_eq!(packet.r#type(), PacketType::DialRsp);
        assert_eq!(packet, Packet::dial_established(42, 7));
        assert_eq!(Packet::dial_established(42, 7).encode_to_vec(), wire);

        let failed = Packet::dial_failed(42, "refused");
        let wire = [
            varint(1, 1),
            bytes_field(3, &[bytes_field(1, b"refused"), varint(3, 42)].concat()),
        ]
        .concat();
        assert_eq!(failed.encode_to_vec(), wire);
    }

    #[test]
    fn data_uses_type_4_payload_4_connect_id_1_and_bytes_3() {
        let wire = [
            varint(1, 4),
            bytes_field(4, &[varint(1, 9), bytes_field(3, b"hello")].concat()),
        ]
        .concat();
        assert_eq!(
            Packet::data(9, bytes::Bytes::from_static(b"hello")).encode_to_vec(),
            wire
        );
        let decoded = Packet::decode(wire.as_slice()).unwrap();
        match decoded.payload {
            Some(Payload::Data(data)) => {
                assert_eq!(data.connect_id, 9);
                assert_eq!(data.data, b"hello");
            }
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn close_and_cancel_packets_use_their_numbers() {
        assert_eq!(
            Packet::close_request(5).encode_to_vec(),
            [varint(1, 2), bytes_field(5, &varint(1, 5))].concat()
        );
        assert_eq!(
            Packet::close_response(5, UNRECOGNIZED_CONNECT_ID).encode_to_vec(),
            [
                varint(1, 3),
                bytes_field(
                    6,
                    &[
                        bytes_field(1, UNRECOGNIZED_CONNECT_ID.as_bytes()),
                        varint(2, 5)
                    ]
                    .concat()
                )
            ]
            .concat()
        );
        assert_eq!(
            Packet::close_dial(77).encode_to_vec(),
            [varint(1, 5), bytes_field(7, &varint(1, 77))].concat()
        );
        assert_eq!(
            Packet::drain().encode_to_vec(),
            [varint(1, 6), bytes_field(8, &[])].concat()
        );
    }

    #[test]
    fn identifiers_round_trip_through_the_metadata_value() {
        let identifiers = Identifiers {
            host_ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            default_route: true,
        };
        let value = encode_identifiers(Some("node-1"), &identifiers);
        assert_eq!(
            value,
            "host=node-1&ipv4=10.0.0.5&ipv6=fd00%3A%3A5&cidr=10.244.1.0%2F24&default-route=true"
        );
        let (node, decoded) = decode_identifiers(&value).unwrap();
        assert_eq!(node.as_deref(), Some("node-1"));
        assert_eq!(decoded, identifiers);
        // Upstream agents send unescaped values and keys cplink does not use.
        let (node, decoded) =
            decode_identifiers("host=node-2&host=10.0.0.9&cidr=10.244.2.0/24&uid=x").unwrap();
        assert_eq!(node.as_deref(), Some("node-2"));
        assert_eq!(
            decoded.host_ips,
            vec!["10.0.0.9".parse::<IpAddr>().unwrap()]
        );
        assert!(
            decode_identifiers("cidr=10.0.0.0/99")
                .unwrap_err()
                .contains("10.0.0.0/99")
        );
    }

    #[test]
    fn method_paths_are_bare() {
        assert_eq!(
            <ProxyServiceServer<Unimplemented> as tonic::server::NamedService>::NAME,
            "ProxyService"
        );
        assert_eq!(
            <AgentServiceServer<Unimplemented> as tonic::server::NamedService>::NAME,
            "AgentService"
        );
    }

    struct Unimplemented;

    type PacketStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Packet, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl ProxyService for Unimplemented {
        type ProxyStream = PacketStream;
        async fn proxy(
            &self,
            _: tonic::Request<tonic::Streaming<Packet>>,
        ) -> Result<tonic::Response<Self::ProxyStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }

    #[tonic::async_trait]
    impl AgentService for Unimplemented {
        type ConnectStream = PacketStream;
        async fn connect(
            &self,
            _: tonic::Request<tonic::Streaming<Packet>>,
        ) -> Result<tonic::Response<Self::ConnectStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
}
