//! `cplink-demo`: a local tunnel on loopback, until Ctrl-C.
//!
//! Starts a cplink-server and three cplink-agents for simulated nodes `node-1..3` (host IPs
//! 127.0.1.1-3), each node with a kubelet-like HTTP fixture, sends requests through the
//! tunnel the way kube-apiserver's egress selector does, and prints how to try it by hand.

use std::time::Duration;

use cplink_e2e::client;
use cplink_e2e::fixture::Loopback;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const NODES: u8 = 3;

/// A tiny HTTP server answering every request with the node's name, like a kubelet `/healthz`.
async fn kubelet(ip: &str, node: String) -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let node = node.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("ok from {node}\n");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let lo = Loopback::new()?;
    let server = lo.start_server(&[]).await?;
    println!(
        "cplink-server: agents on {}, CONNECT frontends on {} (TLS) and {} (Unix socket)",
        server.agent_addr,
        server.tls_addr,
        server.uds.display()
    );

    let mut agents = Vec::new();
    let mut kubelets = Vec::new();
    for n in 1..=NODES {
        let node = format!("node-{n}");
        let ip = format!("127.0.1.{n}");
        let kubelet = kubelet(&ip, node.clone()).await?;
        let allow = format!("{ip}/32");
        let agent = lo
            .start_agent(
                &[server.agent_addr],
                &["--node-name", &node, "--host-ip", &ip, "--allow", &allow],
            )
            .await?;
        agents.push(agent);
        kubelets.push((node, kubelet));
    }
    server.wait_for_agents(NODES as usize).await?;
    println!(
        "{} agents linked: {}",
        server.handle.linked_agents(),
        server.handle.agent_ids().join(", ")
    );

    for (node, kubelet) in &kubelets {
        let mut stream = client::tunnel_uds(&server.uds, &kubelet.to_string()).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: kubelet\r\n\r\n")
            .await?;
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await??;
        let body = response
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .trim();
        println!("CONNECT {kubelet} ({node}) -> {body:?}");
    }

    let (node, kubelet) = &kubelets[0];
    println!();
    println!("Try it yourself (the tunnel reaches {node}'s fixture at {kubelet}):");
    println!(
        "  curl --proxytunnel --proxy https://localhost:{} --proxy-cacert {} --proxy-cert {} --proxy-key {} http://{kubelet}/healthz",
        server.tls_addr.port(),
        lo.pki.ca_file().display(),
        lo.frontend_cert.cert.display(),
        lo.frontend_cert.key.display(),
    );
    println!(
        "  curl --silent http://{}/metrics | grep cplink_server_dials",
        server.admin_addr
    );
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    for agent in agents {
        agent.stop().await;
    }
    server.stop().await;
    Ok(())
}
